"""export(bundle, ExportConfig) -> (bundle, ExportReport): the transformer as a graph or another layout, proven.

Formats (EXPORT_FORMATS):
  onnx          transformer.onnx through torch.export (opset >= 17), dynamic batch / text length /
                resolution where the family's forward allows it, fp32 (fp16 converted after export),
                checked in onnxruntime against PyTorch at two batch sizes and two resolutions;
  diffusers     a plain diffusers directory (LoRA fused, pruned configs kept) that from_pretrained loads;
  safetensors   one .safetensors file: the transformer, its config and family in the header metadata;
  dit-original  a facebookresearch/DiT .pt state dict (dit family only).

The op builds everything in memory or in a staging directory (ONNX: onnxruntime needs files) and checks
it; formats/ writes it (formats.export_files.WRITERS). A failed check is reported (passed = False) and the
CLI exits 1 without writing the output.
"""
from __future__ import annotations

import inspect
import logging
import math
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ditkit.formats.errors import ConfigError, QualityGateError, UnsupportedModelError, choice_error

from .generate import latent_hw

PRECISIONS = ("fp32", "fp16")
# torch.onnx's torchlib is written for opset 18; its down-conversion to 17 produced an invalid graph here
# (Split with num_outputs), and 21 is the newest we have checked
OPSETS = (18, 21)
# per precision: (atol, rtol). fp32 graphs match PyTorch to ~1e-6 on the tiny models; fp16 rounds every
# activation to 11 bits, so its bound is set by the output scale rather than the exporter.
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (5e-2, 2e-2)}
VAE_CHOICES = ("pytorch", "onnx")  # the ONNX bundle's VAE: kept as PyTorch safetensors, or decoder exported
PARITY_BATCHES = (1, 3)  # neither is the traced batch (2), so both exercise the dynamic batch axis
TRACE_BATCH = 2
PARITY_GUIDANCE = 4.0  # guidance-embedding families (flux-dev) take it as an input
# cond entries with a token axis at dim 1 whose length varies with the prompt (exported dynamic)
SEQUENCE_COND = ("prompt_embeds", "prompt_attention_mask")
AXIS_NAMES = {"batch": "batch", "text": "text_tokens"}


@dataclass(frozen=True)
class ExportFormat:
    name: str
    output: str  # "dir" or "file"
    suffix: str | None  # the output file's required suffix
    families: tuple[str, ...] | None  # None: every family
    holds_quantized: bool
    help: str


EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("onnx", "dir", None, None, False,
                 "transformer.onnx (+ vae_decoder.onnx), scheduler, judge, ditkit.json; runs with --backend onnxruntime"),
    ExportFormat("diffusers", "dir", None, None, False,
                 "a plain diffusers directory (LoRA fused) that from_pretrained loads"),
    ExportFormat("safetensors", "file", ".safetensors", None, False,
                 "one file: the transformer with its config and family in the header metadata"),
    ExportFormat("dit-original", "file", ".pt", ("dit",), False,
                 "the facebookresearch/DiT key layout as a .pt state dict of tensors"),
    ExportFormat("gguf", "file", ".gguf", None, False,
                 "one .gguf file quantized with --quant, in the layout ComfyUI-GGUF and diffusers read"),
)}
GGUF_QUANTS = ("Q8_0", "Q5_K", "Q4_K", "Q4_0", "BF16")  # formats.gguf.QUANTS (not imported: keeps gguf lazy)


@dataclass
class ExportConfig:
    format: str = "onnx"
    precision: str = "fp32"  # onnx only: fp16 is converted from the verified fp32 graph (fp16 export is fragile)
    opset: int = 18  # torch.onnx's native opset (OPSETS: the range checked)
    height: int | None = None  # pixels; the resolution traced, and the only one for fixed-resolution graphs
    width: int | None = None
    vae: str = "pytorch"  # onnx only: "onnx" also exports the VAE decoder
    atol: float | None = None  # default: TOLERANCE[precision]
    rtol: float | None = None  # max |onnx - torch| / max |torch|
    workdir: str | None = None  # where graphs are staged (the CLI passes the output's parent: moving is a rename)
    device: str = "cpu"  # onnxruntime's execution provider for the parity check (cuda: CUDA EP)
    quant: str | None = None  # gguf only: Q8_0 when not given (the near-lossless GGUF type)
    min_sqnr: float | None = None  # gguf only: fail (write nothing) under this output SQNR in dB

    def __post_init__(self):
        if self.format not in EXPORT_FORMATS:
            raise choice_error("format", self.format, EXPORT_FORMATS)
        if self.format == "gguf":
            self.quant = self.quant or "Q8_0"
            if self.quant not in GGUF_QUANTS:
                raise choice_error("--quant", self.quant, GGUF_QUANTS)
        elif self.quant is not None or self.min_sqnr is not None:
            raise ConfigError(f"--quant and --min-sqnr apply to --format gguf; drop them for {self.format}")
        if self.min_sqnr is not None and not math.isfinite(self.min_sqnr):
            raise ConfigError(f"--min-sqnr must be a finite number of dB (got {self.min_sqnr})")
        if self.precision not in PRECISIONS:
            raise choice_error("precision", self.precision, PRECISIONS)
        if self.vae not in VAE_CHOICES:
            raise choice_error("--vae", self.vae, VAE_CHOICES)
        if self.format != "onnx" and (self.precision != "fp32" or self.vae != "pytorch"):
            raise ConfigError(f"--precision and --vae apply to --format onnx; {self.format} keeps the checkpoint's "
                              "own weights (drop them)")
        if not OPSETS[0] <= self.opset <= OPSETS[1]:
            raise ConfigError(f"--opset must be in {OPSETS[0]}..{OPSETS[1]} (got {self.opset})")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise ConfigError(f"--{name} must be a positive multiple of 8 (got {v})")
        for name in ("atol", "rtol"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"--{name} must be a finite number >= 0 (got {v})")

    def tolerance(self) -> tuple[float, float]:
        atol, rtol = TOLERANCE[self.precision]
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("workdir")
        return d


@dataclass
class ExportReport:
    format: str
    family: str
    precision: str
    output: str  # "dir" or "file"
    lora_fused: int = 0  # LoRA layers merged into their base weights before export
    num_blocks: int = 0
    params: int = 0
    # onnx
    opset: int | None = None
    resolution: str | None = None  # "dynamic" or "fixed"
    resolution_note: str | None = None  # why fixed
    latent_hw: list[int] = field(default_factory=list)  # the traced (fixed: the only) latent size
    inputs: list[dict] = field(default_factory=list)  # name, dtype, shape (axis names for dynamic dims)
    outputs: list[dict] = field(default_factory=list)
    dynamic_axes: dict = field(default_factory=dict)  # input -> {dim: axis name}
    external_data: bool = False
    graph_bytes: int = 0
    vae_decoder: dict | None = None  # its inputs, axes and parity when exported
    # the check: onnx parity against PyTorch, or the reload round trip of the other formats
    parity: list[dict] = field(default_factory=list)  # per case: batch, latent_hw, text_tokens, max_abs, max_rel
    max_abs_error: float | None = 0.0  # None when a case did not run (its error is in parity and failures)
    max_rel_error: float | None = 0.0  # max |got - ref| / max |ref|
    atol: float = 0.0
    rtol: float = 0.0
    bit_exact: bool | None = None  # non-onnx formats: the reloaded model's outputs are identical
    # gguf: the quant type, the GGML type of each tensor written (counts), the key layout, output SQNR (dB)
    quant: str | None = None
    tensor_types: dict = field(default_factory=dict)
    layout: str | None = None
    sqnr_db: float | None = None
    passed: bool = True
    failures: list[str] = field(default_factory=list)
    seconds_export: float = 0.0
    seconds_check: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_gate(report: ExportReport) -> None:
    """QualityGateError when the exported artifact failed its check (the CLI prints the report first)."""
    if not report.passed:
        raise QualityGateError(f"export check failed: {'; '.join(report.failures)}")


# -- model preparation -------------------------------------------------------------------------------

def fuse_lora_(model: nn.Module) -> int:
    """Merge every PEFT LoRA layer into its base layer and put the base layer back; returns how many."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, no LoRA layers
        return 0
    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer) or not name:
            continue
        module.merge()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.get_base_layer())
        n += 1
    return n


def check_exportable(bundle, fmt: ExportFormat) -> None:
    from ditkit.formats.quantized import is_quantized

    fam = bundle.family
    if bundle.kind == "onnx":
        raise UnsupportedModelError(f"{bundle.name} is already an ONNX bundle (no PyTorch weights); export the "
                                    "checkpoint it was made from")
    if fmt.families is not None and fam.name not in fmt.families:
        raise UnsupportedModelError(f"--format {fmt.name} holds the {', '.join(fmt.families)} family only "
                                    f"(this model is {fam.name}); choose another --format")
    if is_quantized(bundle.transformer) and not fmt.holds_quantized:
        raise UnsupportedModelError(
            f"--format {fmt.name} cannot hold ditkit-quantized modules; export the unquantized checkpoint "
            "(for a quantized ONNX graph, quantize the exported fp32 graph with onnxruntime.quantization)")


def _forward_inputs(fam, tr, batch: int, hw: tuple[int, int], text_tokens: int | None, seed: int):
    """(latents, t, cond) with per-row timesteps, and text conditioning cut to `text_tokens`."""
    latents, t, cond = fam.dummy_inputs(tr, batch, hw, seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = (torch.rand(batch, generator=g) * 999.0).to(t.device, t.dtype)  # distinct per row
    if text_tokens is not None:
        cond = {k: (v[:, :text_tokens] if k in SEQUENCE_COND else v) for k, v in cond.items()}
    return latents, t, cond


def capture_call(fam, tr, batch: int, hw: tuple[int, int], text_tokens: int | None = None, seed: int = 0) -> dict:
    """The arguments `family.predict` passes to the transformer, bound to its forward's parameter names."""
    latents, t, cond = _forward_inputs(fam, tr, batch, hw, text_tokens, seed)
    seen = {}

    def hook(module, args, kwargs):
        seen["call"] = (args, kwargs)

    handle = tr.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            fam.predict(tr, latents, t, cond, PARITY_GUIDANCE)
    finally:
        handle.remove()
    args, kwargs = seen["call"]
    return dict(inspect.signature(tr.forward).bind(*args, **kwargs).arguments)


def _tensor_shapes(call: dict) -> dict[str, tuple[int, ...]]:
    from ditkit.formats.onnx_bundle import flatten_call

    return {k: tuple(v.shape) for k, v in flatten_call([], (), call).items() if isinstance(v, torch.Tensor)}


# -- ONNX ------------------------------------------------------------------------------------------

class _Call(nn.Module):
    """The transformer called with a flat tuple of tensors, rebuilt into the captured call's structure."""

    def __init__(self, transformer: nn.Module, template: dict, names: list[str]):
        super().__init__()
        self.transformer, self.template, self.names = transformer, template, names

    def forward(self, *tensors):
        from ditkit.formats.onnx_bundle import rebuild_call

        out = self.transformer(**rebuild_call(self.template, dict(zip(self.names, tensors))))
        return out[0] if isinstance(out, tuple) else out.sample


class _Decode(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, *tensors):  # (latent_sample,): varargs like _Call, so both take the same dynamic_shapes
        return self.vae.decode(tensors[0], return_dict=False)[0]


def _drop_noop_squeezes(ep) -> int:
    """torch.onnx maps aten.squeeze.dim to ONNX Squeeze, which fails unless the dim is 1, where PyTorch's
    squeeze of a longer dim does nothing (PixArt's `proj_out(...).squeeze(1)`). Remove those no-ops."""
    graph, n = ep.graph_module.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims):
            continue
        x = node.args[0]
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        shape = x.meta["val"].shape
        if all(not (isinstance(shape[d], int) and shape[d] == 1) for d in dims):
            node.replace_all_uses_with(x)
            graph.erase_node(node)
            n += 1
    if n:
        ep.graph_module.recompile()
    return n


def infer_axes(base: dict, variants: dict[str, dict], hw_pair: tuple | None) -> dict[str, dict[int, str]]:
    """input -> {dim: axis name}: the dims whose size changed between the traced call and a variant call."""
    b = _tensor_shapes(base)
    axes: dict[str, dict[int, str]] = {}
    for vname, call in variants.items():
        s = _tensor_shapes(call)
        for k, shape in b.items():
            for d, (x, y) in enumerate(zip(shape, s[k])):
                if x == y:
                    continue
                if vname != "resolution":
                    name = AXIS_NAMES[vname]
                elif hw_pair and len(shape) == 4 and d in (2, 3) and (x, y) == hw_pair[d - 2]:
                    name = ("latent_height", "latent_width")[d - 2]
                else:
                    name = "image_tokens"
                axes.setdefault(k, {})[d] = name
    return axes


def _dims(axes: dict[str, dict[int, str]], names: list[str]) -> tuple:
    """torch.export dynamic_shapes: a named Dim for an axis several inputs share (so they stay equal),
    Dim.DYNAMIC for an axis one input has (torch.export then infers its divisibility, e.g. by the patch)."""
    from torch.export import Dim

    count = Counter(a for k in axes for a in axes[k].values())
    named: dict[str, object] = {}

    def dim(axis: str):
        if count[axis] == 1:
            return Dim.DYNAMIC
        return named.setdefault(axis, Dim(axis, min=1))

    return (tuple({d: dim(a) for d, a in axes.get(k, {}).items()} for k in names),)


def _rename_dims(model, axes: dict[str, dict[int, str]]) -> None:
    """Give the graph's symbolic dims the axis names (batch, text_tokens, ...) instead of s0, s13, ..."""
    import onnx_ir as ir

    mapping: dict[str, str] = {}
    for v in model.graph.inputs:
        for d, axis in axes.get(v.name, {}).items():
            dim = v.shape[d] if v.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                mapping.setdefault(dim.value, axis)
    if not mapping:
        return

    def rename(text: str) -> str:
        return re.sub(r"[A-Za-z_]\w*", lambda m: mapping.get(m.group(), m.group()), text)

    def fix(v) -> None:
        if v.shape is None:
            return
        dims = [ir.SymbolicDim(rename(d.value)) if isinstance(d, ir.SymbolicDim) and d.value else d for d in v.shape]
        v.shape = ir.Shape(dims)

    values = list(model.graph.inputs) + list(model.graph.outputs)
    values += [o for node in ir.traversal.RecursiveGraphIterator(model.graph) for o in node.outputs]
    for v in values:
        fix(v)


def _describe(values) -> list[dict]:
    out = []
    for v in values:
        shape = [d if isinstance(d, int) else str(d) for d in v.shape]
        out.append({"name": v.name, "dtype": str(v.type).replace("tensor(", "").rstrip(")"), "shape": shape})
    return out


def export_graph(module: nn.Module, tensors: tuple, names: list[str], axes: dict, opset: int, path: Path,
                 output_name: str) -> list[Path]:
    """torch.export -> ONNX (opset `opset`) with the given dynamic axes; writes `path` (+ .data)."""
    from ditkit.formats.onnx_bundle import write_onnx

    # torch.onnx warns once per missing torchvision op (nms, roi_align, ...): not ours, not actionable
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad():
        ep = torch.export.export(module.eval(), tensors, dynamic_shapes=_dims(axes, names))
    _drop_noop_squeezes(ep)
    program = torch.onnx.export(ep, dynamo=True, opset_version=opset, input_names=names,
                                output_names=[output_name], verbose=False)
    _rename_dims(program.model, axes)
    return write_onnx(program, path)


def _compare(run: Callable[[], torch.Tensor], ref: torch.Tensor) -> dict:
    """{"max_abs", "max_rel"} of run() against ref; both None and an "error" when it fails or mismatches."""
    try:
        got = run().detach().float().cpu()
    except Exception as e:  # onnxruntime refuses shapes a graph baked in, with its own exception types
        return {"max_abs": None, "max_rel": None, "error": _first_line(e)}
    ref = ref.detach().float().cpu()
    if got.shape != ref.shape:
        return {"max_abs": None, "max_rel": None, "error": f"output shape {list(got.shape)} != {list(ref.shape)}"}
    if not torch.isfinite(got).all():
        return {"max_abs": None, "max_rel": None, "error": "non-finite outputs"}
    max_abs = float((got - ref).abs().max())
    return {"max_abs": max_abs, "max_rel": max_abs / max(float(ref.abs().max()), 1e-12)}


def transformer_parity(fam, tr, onnx_tr, cases: list[tuple[int, tuple[int, int], int | None]]) -> list[dict]:
    """Run `family.predict` on the PyTorch and the ONNX transformer on the same inputs, per case."""
    rows = []
    for i, (batch, hw, text) in enumerate(cases):
        latents, t, cond = _forward_inputs(fam, tr, batch, hw, text, seed=100 + i)
        with torch.no_grad():
            ref = fam.predict(tr, latents, t, cond, PARITY_GUIDANCE)
            errors = _compare(lambda: fam.predict(onnx_tr, latents, t, cond, PARITY_GUIDANCE), ref)
        rows.append({"batch": batch, "latent_hw": list(hw), "text_tokens": text, **errors})
    return rows


def _alt_hw(tr, hw: tuple[int, int]) -> tuple[int, int]:
    """A second, non-square resolution for the dynamic-resolution trace: a few patches taller and wider."""
    step = 2 * max(2, int(getattr(tr.config, "patch_size", None) or 2))
    return hw[0] + step, hw[1] + 2 * step


def _text_tokens(fam, tr) -> tuple[int, int] | None:
    """(traced, shorter) prompt lengths for text families."""
    if fam.conditioning != "text":
        return None
    _, _, cond = fam.dummy_inputs(tr, 1)
    n = cond["prompt_embeds"].shape[1]
    return n, max(1, n - 3)


def _trace_transformer(fam, tr, trace_hw, other_hw, text, opset, path):
    """Capture the calls, infer the axes, export. Returns (names, template, axes, files)."""
    from ditkit.formats.onnx_bundle import flatten_call

    n_text = text[0] if text else None
    base = capture_call(fam, tr, TRACE_BATCH, trace_hw, n_text)
    variants = {"batch": capture_call(fam, tr, TRACE_BATCH + 1, trace_hw, n_text)}
    if text:
        variants["text"] = capture_call(fam, tr, TRACE_BATCH, trace_hw, text[1])
    if other_hw is not None:
        variants["resolution"] = capture_call(fam, tr, TRACE_BATCH, other_hw, n_text)
    pair = ((trace_hw[0], other_hw[0]), (trace_hw[1], other_hw[1])) if other_hw else None
    axes = infer_axes(base, variants, pair)
    flat = flatten_call([], (), base)
    names = [k for k, v in flat.items() if isinstance(v, torch.Tensor)]
    files = export_graph(_Call(tr, base, names), tuple(flat[k] for k in names), names, axes, opset, path, "sample")
    return names, base, axes, files


def _export_onnx(bundle, cfg: ExportConfig, report: ExportReport, log: Callable[[str], None]):
    from ditkit.formats.bundle import Bundle
    from ditkit.formats.onnx_bundle import (TRANSFORMER_ONNX, VAE_DECODER_ONNX, OnnxTransformer, OnnxVaeDecoder,
                                            staging_dir, write_model_proto)

    fam, tr = bundle.family, bundle.transformer
    hw = latent_hw(bundle, cfg.height, cfg.width)
    text = _text_tokens(fam, tr)
    atol, rtol = cfg.tolerance()
    stage = staging_dir(cfg.workdir)
    path = stage / TRANSFORMER_ONNX
    t0 = time.perf_counter()
    try:
        # 1. Dynamic resolution when the PyTorch forward runs at a second, non-square size: trace there (so a
        #    pos-embed table computed from the input size is in the graph), and check both sizes below.
        alt = _alt_hw(tr, hw)
        note = None
        try:
            capture_call(fam, tr, 1, alt, text[0] if text else None)
        except Exception as e:  # the PyTorch model itself rejects other sizes
            note = f"{tr.__class__.__name__} does not run at {alt[0]}x{alt[1]} latents ({_first_line(e)})"
        attempts = [(alt, hw)] if note is None else []
        attempts.append((hw, None))
        # whether the dynamic-resolution graph is right: fp32 defaults (a baked-in size errs by O(1), not 1e-5)
        check_tol = tuple(max(a, b) for a, b in zip(cfg.tolerance(), TOLERANCE["fp32"])) \
            if cfg.precision == "fp32" else TOLERANCE["fp32"]
        for trace_hw, other_hw in attempts:
            last = other_hw is None
            log(f"exporting the transformer at {trace_hw[0]}x{trace_hw[1]} latents, "
                f"{'dynamic' if not last else 'fixed'} resolution (torch.export + torch.onnx, opset {cfg.opset})")
            try:
                names, template, axes, files = _trace_transformer(fam, tr, trace_hw, other_hw, text, cfg.opset, path)
            except Exception as e:
                if last:
                    raise UnsupportedModelError(f"torch.export could not export this {fam.name} transformer "
                                                f"({_first_line(e)}); rerun with DITKIT_DEBUG=1 and report it")
                note = f"the dynamic-resolution export failed ({_first_line(e)})"
                continue
            spec = _transformer_spec(fam, tr, names, template, axes, hw, not last)
            onnx_tr = OnnxTransformer(path, spec, _config_dict(tr), cfg.device)
            sizes = [hw] if last else [hw, trace_hw]
            cases = [(b, s, (text[0] if b == PARITY_BATCHES[0] else text[1]) if text else None)
                     for s in sizes for b in PARITY_BATCHES]
            log(f"checking {len(cases)} cases in onnxruntime against PyTorch")
            t1 = time.perf_counter()
            rows = transformer_parity(fam, tr, onnx_tr, cases)
            report.seconds_check += time.perf_counter() - t1
            bad = [r for r in rows if not _ok(r, *check_tol)]
            if last or not bad:
                break
            # a size-dependent value got baked in (e.g. a pos-embed table): export at one fixed resolution
            note = (f"the dynamic-resolution graph failed parity at {bad[0]['latent_hw'][0]}x"
                    f"{bad[0]['latent_hw'][1]} latents ({bad[0].get('error') or 'max abs %.2e' % bad[0]['max_abs']})")
            del onnx_tr
        report.resolution = "fixed" if last else "dynamic"
        report.resolution_note = note if last else None
        report.latent_hw = list(hw)
        # 2. fp16: convert the verified fp32 graph, keep fp32 inputs/outputs, check it again
        if cfg.precision == "fp16":
            del onnx_tr
            log("converting the checked fp32 graph to fp16 and checking it again")
            _to_fp16(path, write_model_proto)
            onnx_tr = OnnxTransformer(path, spec, _config_dict(tr), cfg.device)
            t1 = time.perf_counter()
            rows = transformer_parity(fam, tr, onnx_tr, cases)
            report.seconds_check += time.perf_counter() - t1
        report.parity = rows
        report.inputs = _describe(onnx_tr.session.get_inputs())
        report.outputs = _describe(onnx_tr.session.get_outputs())
        spec["inputs"], spec["outputs"] = report.inputs, report.outputs
        report.dynamic_axes = {k: {str(d): a for d, a in v.items()} for k, v in axes.items()}
        from ditkit.formats.onnx_bundle import onnx_files

        report.graph_bytes = sum(f.stat().st_size for f in onnx_files(path))
        report.external_data = len(onnx_files(path)) > 1
        # 3. the VAE decoder, optionally
        components = dict(bundle.components)
        vae_spec = None
        if cfg.vae == "onnx":
            if bundle.vae is None:
                raise ConfigError(f"{bundle.name} has no VAE to export; drop --vae onnx")
            log("exporting and checking the VAE decoder")
            vae_spec, vae_rows = _export_vae(bundle.vae, hw, alt, cfg, stage / VAE_DECODER_ONNX)
            components["vae"] = OnnxVaeDecoder(stage / VAE_DECODER_ONNX, vae_spec["config"], cfg.device)
            report.vae_decoder = {k: vae_spec[k] for k in ("inputs", "outputs", "dynamic_axes")}
            report.vae_decoder["parity"] = vae_rows
            rows = rows + vae_rows
        report.seconds_export = round(time.perf_counter() - t0 - report.seconds_check, 2)
        report.seconds_check = round(report.seconds_check, 2)
        _summarize(report, rows, atol, rtol)
        manifest = {"onnx": {
            "opset": cfg.opset, "precision": cfg.precision,
            "exporter": f"torch.export + torch.onnx (torch {torch.__version__})",
            "transformer": spec, "vae_decoder": vae_spec,
            "pipeline": {"class": bundle.pipeline_class, "extra": bundle.pipeline_extra},
        }, "defaults": bundle.manifest.get("defaults", {})}
        out = Bundle(family=fam, transformer=onnx_tr, components=components, pipeline_class=bundle.pipeline_class,
                     pipeline_extra=bundle.pipeline_extra, manifest=manifest, path=stage, kind="onnx",
                     judge=bundle.judge)
        return out, report
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _ok(row: dict, atol: float, rtol: float) -> bool:
    return row["max_abs"] is not None and row["max_abs"] <= atol and row["max_rel"] <= rtol


def _summarize(report: ExportReport, rows: list[dict], atol: float, rtol: float) -> None:
    report.atol, report.rtol = atol, rtol
    failed_to_run = any(r["max_abs"] is None for r in rows)
    report.max_abs_error = None if failed_to_run else max((r["max_abs"] for r in rows), default=0.0)
    report.max_rel_error = None if failed_to_run else max((r["max_rel"] for r in rows), default=0.0)
    for r in rows:
        if _ok(r, atol, rtol):
            continue
        where = f"{r.get('graph', 'transformer')} at batch {r['batch']}, {r['latent_hw'][0]}x{r['latent_hw'][1]} latents"
        if r["max_abs"] is None:
            report.failures.append(f"{where}: {r['error']}")
        else:
            report.failures.append(f"{where}: max abs {r['max_abs']:.3g} (atol {atol:g}), rel {r['max_rel']:.3g} "
                                   f"(rtol {rtol:g})")
    report.passed = not report.failures


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if line.strip() and not line.startswith("Traceback"):
            return line.strip()[:200]
    return type(e).__name__


def _config_dict(module) -> dict:
    import json

    return json.loads(module.to_json_string())


def _transformer_spec(fam, tr, names, template, axes, hw, dynamic_res) -> dict:
    from ditkit.formats.onnx_bundle import flatten_call

    consts = {k: v for k, v in flatten_call([], (), template).items() if not isinstance(v, torch.Tensor)}
    attributes = {}
    if hasattr(tr, "use_additional_conditions"):  # read by PixArt's predict
        attributes["use_additional_conditions"] = bool(tr.use_additional_conditions)
    return {
        "file": "transformer.onnx", "family": fam.name,
        "signature": list(inspect.signature(tr.forward).parameters),
        "inputs": [{"name": n} for n in names], "outputs": [{"name": "sample"}],
        "constants": {k: v for k, v in consts.items() if v is None or isinstance(v, (bool, int, float, str))},
        "dynamic_axes": {k: {str(d): a for d, a in v.items()} for k, v in axes.items()},
        "resolution": "dynamic" if dynamic_res else "fixed", "latent_hw": list(hw),
        "attributes": attributes,
    }


def _to_fp16(path: Path, write_model_proto) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path), load_external_data=True)
    big = len(list(path.parent.glob(path.name + ".data"))) > 0
    model16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=big)
    for f in path.parent.glob(path.name + "*"):
        f.unlink()
    write_model_proto(model16, path)


def _export_vae(vae, hw, alt, cfg: ExportConfig, path: Path):
    """vae_decoder.onnx: dynamic batch, height and width; checked at two batch sizes and two sizes."""
    from ditkit.formats.onnx_bundle import OnnxVaeDecoder

    c = vae.config.latent_channels
    g = torch.Generator().manual_seed(7)
    z = torch.randn(TRACE_BATCH, c, *hw, generator=g)
    axes = {"latent_sample": {0: "batch", 2: "latent_height", 3: "latent_width"}}
    export_graph(_Decode(vae), (z,), ["latent_sample"], axes, cfg.opset, path, "sample")
    config = _config_dict(vae)
    if cfg.precision == "fp16":
        from ditkit.formats.onnx_bundle import write_model_proto

        _to_fp16(path, write_model_proto)
    dec = OnnxVaeDecoder(path, config, cfg.device)
    rows = []
    for size in (hw, alt):
        for b in PARITY_BATCHES:
            zz = torch.randn(b, c, *size, generator=g)
            with torch.no_grad():
                ref = vae.decode(zz, return_dict=False)[0]
            errors = _compare(lambda: dec.decode(zz, return_dict=False)[0], ref)
            rows.append({"graph": "vae_decoder", "batch": b, "latent_hw": list(size), "text_tokens": None, **errors})
    spec = {"file": "vae_decoder.onnx", "config": config, "inputs": _describe(dec.session.get_inputs()),
            "outputs": _describe(dec.session.get_outputs()),
            "dynamic_axes": {k: {str(d): a for d, a in v.items()} for k, v in axes.items()}}
    del dec
    return spec, rows


# -- the other formats: an in-memory reload of exactly what will be written -------------------------

def _same_outputs(fam, a: nn.Module, b: nn.Module, hw) -> tuple[bool, float]:
    latents, t, cond = _forward_inputs(fam, a, 2, hw, None, seed=3)
    with torch.no_grad():
        x, y = fam.predict(a, latents, t, cond, PARITY_GUIDANCE), fam.predict(b, latents, t, cond, PARITY_GUIDANCE)
    return torch.equal(x, y), float((x - y).abs().max())


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _reloaded(fmt: str, bundle) -> nn.Module:
    """The transformer as a reader of `fmt` would rebuild it from the bytes the writer produces."""
    import json

    from safetensors.torch import load as st_load

    from ditkit.formats import dit_original
    from ditkit.formats.export_files import single_file_bytes

    fam, tr = bundle.family, bundle.transformer
    if fmt == "dit-original":
        state = dit_original.from_diffusers(tr)  # raises FormatError when the blocks' embedders differ
        conf, converted = dit_original.to_diffusers(state, Path(f"<{bundle.name} as dit-original>"))
    elif fmt == "safetensors":
        data, meta = single_file_bytes(bundle, {})
        conf, converted = json.loads(meta["config"]), st_load(data)
    else:  # diffusers: config.json + the state dict
        conf, converted = _config_dict(tr), {k: v.detach().clone() for k, v in tr.state_dict().items()}
    model = fam.transformer_cls().from_config(conf)
    result = model.load_state_dict(converted, strict=True)
    del result
    return model.eval().requires_grad_(False)


def _export_layout(bundle, cfg: ExportConfig, report: ExportReport):
    fam, tr = bundle.family, bundle.transformer
    t0 = time.perf_counter()
    model = _reloaded(cfg.format, bundle)
    hw = latent_hw(bundle, cfg.height, cfg.width)
    same_state = _same_state(tr, model)
    equal, max_abs = _same_outputs(fam, tr, model, hw)
    report.seconds_check = round(time.perf_counter() - t0, 2)
    report.bit_exact = same_state and equal
    report.parity = [{"batch": 2, "latent_hw": list(hw), "text_tokens": None, "max_abs": max_abs, "max_rel": 0.0}]
    report.max_abs_error = max_abs
    report.latent_hw = list(hw)
    if not report.bit_exact:
        report.failures.append(f"the {cfg.format} round trip changed the model (weights identical: {same_state}, "
                               f"max abs output difference {max_abs:.3g})")
        report.passed = False
    return bundle, report


def export(bundle, cfg: ExportConfig, log: Callable[[str], None] | None = None):
    """Build `cfg.format` from `bundle` and check it. Returns (the exported bundle, report).

    LoRA layers are fused into the bundle's transformer first (in place: the bundle is consumed).
    ONNX: the returned bundle's path is a staging directory holding the graphs (formats.export_files.WRITERS
    moves them into the output); other formats return the (fused) input bundle. `log` gets one line per phase.
    """
    log = log or (lambda msg: None)
    fmt = EXPORT_FORMATS[cfg.format]
    check_exportable(bundle, fmt)
    if fmt.name != "diffusers":
        from ditkit.ops.feedback import refuse

        refuse(bundle, "export", f"--format {fmt.name} cannot carry this bundle's feedback module (distill --mode "
                                 "feedback); use --format diffusers, or export the model it was distilled from")
    tr = bundle.transformer
    report = ExportReport(format=fmt.name, family=bundle.family.name, precision=cfg.precision, output=fmt.output,
                          lora_fused=fuse_lora_(tr), num_blocks=len(bundle.family.blocks(tr)),
                          params=sum(p.numel() for p in tr.parameters()))
    if fmt.name == "onnx":
        report.opset = cfg.opset
        return _export_onnx(bundle, cfg, report, log)
    if fmt.name == "gguf":
        from .export_gguf import check_gguf

        log(f"quantizing to {cfg.quant} and checking the dequantized model's output against the source")
        return check_gguf(bundle, cfg, report, latent_hw(bundle, cfg.height, cfg.width), _forward_inputs,
                          PARITY_GUIDANCE)
    log(f"checking that the {fmt.name} layout reloads bit-exact")
    return _export_layout(bundle, cfg, report)
