"""The ONNX bundle: graphs exported by `ditkit export --format onnx`, and the modules that run them.

Layout of an ONNX bundle directory:
    transformer.onnx            the transformer graph (fp32, or fp16 with fp32 inputs/outputs)
    transformer.onnx.data       its weights, only when the graph is over 2 GB (protobuf's limit)
    transformer_config.json     the diffusers config of the exported transformer (shapes, class count)
    vae_decoder.onnx            the VAE decoder graph (only with `--vae onnx`)
    vae/                        the PyTorch VAE (config.json + safetensors) when its decoder was not exported
    scheduler/                  the diffusers scheduler config
    judge/                      the bundle's judge, when it has one
    ditkit.json                 the manifest: op "export" + an "onnx" section (input/output names, dynamic
                                axes, opset, precision, how the graph's inputs map to the model's call)

Reading and writing the directory: ditkit.formats.layouts.onnx. `OnnxTransformer` stands in for the diffusers transformer: it has the same `config`, takes the same
keyword arguments as the call each family's `predict` makes, and returns `(sample,)`. So the sampler,
`generate` and `bench` run an ONNX bundle unchanged, through `family.predict(bundle.transformer, ...)`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, FormatError, HardwareError, choice_error

TRANSFORMER_ONNX = "transformer.onnx"
VAE_DECODER_ONNX = "vae_decoder.onnx"
TRANSFORMER_CONFIG = "transformer_config.json"
PROTOBUF_LIMIT = 2 * 1024**3  # a single .onnx file cannot hold more; larger graphs keep weights beside it

# generation backends: which runtime runs the transformer
BACKENDS = {
    "pytorch": "the PyTorch modules of a diffusers / ditkit checkpoint",
    "onnxruntime": "an ONNX bundle (ditkit export --format onnx) run by onnxruntime",
}

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


# -- the call convention: one graph input per tensor the model is called with ---------------------

def flatten_call(signature: list[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    """{"hidden_states": x, "added_cond_kwargs.resolution": None, ...}: a call's leaves by dotted name."""
    if len(args) > len(signature):
        raise ConfigError(f"the ONNX transformer takes at most {len(signature)} positional arguments")
    bound = dict(zip(signature, args))
    bound.update(kwargs)
    flat: dict[str, Any] = {}

    def walk(name: str, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{name}.{k}", v)
        else:
            flat[name] = value

    for k, v in bound.items():
        walk(k, v)
    return flat


def as_real(x):
    """A complex tensor as torch.view_as_real (ONNX has no complex type); anything else as it is."""
    return torch.view_as_real(x).contiguous() if isinstance(x, torch.Tensor) and x.is_complex() else x


def rebuild_call(template: dict, values: dict[str, Any]) -> dict:
    """The inverse of flatten_call on a bound-arguments template: replace leaves by name."""
    def walk(name: str, value):
        if isinstance(value, dict):
            return {k: walk(f"{name}.{k}", v) for k, v in value.items()}
        return values.get(name, value)

    return {k: walk(k, v) for k, v in template.items()}


# -- onnxruntime sessions ------------------------------------------------------------------------------

def providers(device: str) -> list[str]:
    """CUDA execution provider for a CUDA device (needs onnxruntime-gpu), else CPU."""
    import onnxruntime as ort

    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise HardwareError(f"--device {device}: this onnxruntime has no CUDA execution provider; install "
                                "onnxruntime-gpu (pip install 'ditkit[gpu]') or use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path: Path, device: str = "cpu"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()  # the same thread budget PyTorch uses
    opts.log_severity_level = 3  # errors only; ORT's warnings about unused initializers are noise here
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers(device))
    except HardwareError:
        raise
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph types
        msg = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path} could not be loaded by onnxruntime ({msg}); re-export it with ditkit export")


class OnnxModule(nn.Module):
    """An onnxruntime session as a module. It holds no weights, only an empty `device_marker` parameter, so
    code that reads a module's device and dtype from `next(m.parameters())` works on it unchanged."""

    def __init__(self, path: Path, device: str = "cpu"):
        super().__init__()
        self.path = Path(path)
        self.ort_device = device  # the execution provider's device (cpu, cuda:N)
        self.threads = torch.get_num_threads()
        self.session = make_session(self.path, device)
        self.device_marker = nn.Parameter(torch.empty(0), requires_grad=False)
        self.graph_inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_name = self.session.get_outputs()[0].name

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # graphs take and return fp32 (fp16 graphs keep fp32 inputs/outputs)

    def check_shapes(self, feeds: dict[str, torch.Tensor]) -> None:
        for name, x in feeds.items():
            want = self.graph_inputs[name].shape
            fixed = [(i, d) for i, d in enumerate(want) if isinstance(d, int)]
            if x.dim() != len(want) or any(x.shape[i] != d for i, d in fixed):
                shown = [d if isinstance(d, int) else "*" for d in want]
                raise ConfigError(f"{self.path.name}: input {name} has shape {list(x.shape)} but the graph takes "
                                  f"{shown}{self.shape_hint(name)}")

    def shape_hint(self, name: str) -> str:
        return ""

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_shapes(feeds)
        if self.threads != torch.get_num_threads():  # follow torch's thread budget (bench --threads sets it late)
            self.threads = torch.get_num_threads()
            self.session = make_session(self.path, self.ort_device)
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy(),
                                          dtype=_ORT_TYPES.get(self.graph_inputs[k].type, np.float32))
                  for k, v in feeds.items()}
        out = self.session.run([self.output_name], arrays)[0]
        return torch.from_numpy(out)


class OnnxTransformer(OnnxModule):
    """Runs transformer.onnx; called exactly like the diffusers transformer it was exported from."""

    def __init__(self, path: Path, spec: dict, config: dict, device: str = "cpu"):
        from diffusers.configuration_utils import FrozenDict

        super().__init__(path, device)
        self.spec = spec
        self.config = FrozenDict(config)
        for k, v in spec.get("attributes", {}).items():  # attributes the families' predict reads
            setattr(self, k, v)
        self.signature = list(spec["signature"])
        self.input_names = [i["name"] for i in spec["inputs"]]
        missing = set(self.input_names) - set(self.graph_inputs)
        if missing:
            raise FormatError(f"{path}: the graph lacks inputs {sorted(missing)} named in ditkit.json; re-export it")

    def shape_hint(self, name: str) -> str:
        hw = self.spec.get("latent_hw")
        if self.spec.get("resolution") == "fixed" and hw:
            return (f" (this {self.spec.get('family', '')} graph was exported at fixed {hw[0]}x{hw[1]} latents; "
                    f"re-export with ditkit export --height/--width for another size)")
        return ""

    def forward(self, *args, **kwargs):
        flat = flatten_call(self.signature, args, kwargs)
        tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
        if set(tensors) != set(self.input_names):
            raise ConfigError(f"{self.path.name} takes tensors {sorted(self.input_names)} but was called with "
                              f"{sorted(tensors)}; re-export it from a model called this way")
        tensors = {k: as_real(v) for k, v in tensors.items()}
        first = tensors[self.input_names[0]]
        rows = self.spec.get("batch_inputs")  # a graph traced at batch 1: run the batch row by row
        if rows and tensors[rows[0]].shape[0] != 1:
            n = tensors[rows[0]].shape[0]
            out = torch.cat([self.run({k: (v[i:i + 1] if k in rows else v) for k, v in tensors.items()})
                             for i in range(n)]).to(first.device)
        else:
            out = self.run(tensors).to(first.device)
        if first.is_floating_point():
            out = out.to(first.dtype)
        if flat.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)


class OnnxVaeDecoder(OnnxModule):
    """Runs vae_decoder.onnx with AutoencoderKL's `decode(z, return_dict=False) -> (images,)` interface."""

    def __init__(self, path: Path, config: dict, device: str = "cpu"):
        from diffusers.configuration_utils import FrozenDict

        super().__init__(path, device)
        self.config = FrozenDict(config)
        self.input_name = next(iter(self.graph_inputs))

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        out = self.run({self.input_name: z}).to(z.device)
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=out)
        return (out,)

    def forward(self, z: torch.Tensor):
        return self.decode(z, return_dict=False)[0]


# -- writing graphs --------------------------------------------------------------------------------

def write_onnx(program, path: Path) -> list[Path]:
    """Save a torch.onnx ONNXProgram; weights go to `<name>.data` beside it when over 2 GB. Returns the files."""
    nbytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize
                 for v in program.model.graph.initializers.values() if v.const_value is not None)
    external = nbytes >= PROTOBUF_LIMIT - 64 * 1024**2  # leave room for the graph itself
    program.save(str(path), external_data=external)
    return onnx_files(path)


def write_model_proto(model, path: Path) -> list[Path]:
    """Save an onnx.ModelProto (e.g. after fp16 conversion), with external data when over 2 GB."""
    import onnx

    external = model.ByteSize() >= PROTOBUF_LIMIT - 64 * 1024**2 if _proto_size_ok(model) else True
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return onnx_files(path)


def _proto_size_ok(model) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False


def onnx_files(path: Path) -> list[Path]:
    """The graph file and its external-data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path] + ([data] if data.is_file() else [])


def staging_dir(workdir: str | os.PathLike | None) -> Path:
    """A private directory to build graphs in (beside the output, so moving them in is a rename)."""
    root = Path(workdir) if workdir else None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".ditkit-export-", dir=root))


def resolve_backend(bundle, backend: str | None) -> str:
    """The backend that runs `bundle`: its own by default; a mismatch is an error naming the fix."""
    own = "onnxruntime" if bundle.kind == "onnx" else "pytorch"
    if backend is None:
        return own
    if backend not in BACKENDS:
        raise choice_error("backend", backend, BACKENDS)
    if backend == "onnxruntime" and own != "onnxruntime":
        raise ConfigError(f"--backend onnxruntime runs ONNX bundles; {bundle.name} is a PyTorch checkpoint: "
                          f"export it first (ditkit export {bundle.path or 'SRC'} -o OUT --format onnx)")
    if backend == "pytorch" and own != "pytorch":
        raise ConfigError(f"{bundle.name} is an ONNX bundle (no PyTorch weights): use --backend onnxruntime, "
                          "or generate from the checkpoint it was exported from")
    return backend
