"""The model bundle: a transformer plus whatever else its checkpoint holds, and every way to load/save it.

Sources (load_bundle):
  - an embedded default by name (tiny-digits), or no SRC at all;
  - a diffusers pipeline directory (model_index.json);
  - a bare transformer directory (config.json + safetensors);
  - a single .safetensors file (--family, plus --config when the keys don't determine it);
  - a facebookresearch/DiT .pt checkpoint (read with weights_only=True, converted to diffusers keys).
  - a .gguf file (formats/gguf.py: dequantized to float tensors);
  - an ONNX bundle directory (transformer.onnx; formats/onnx_bundle.py), run by onnxruntime.
"""
from __future__ import annotations

import re

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import dit_original, quantized
from .atomic import atomic_dir
from .errors import ConfigError, FormatError, UnsupportedModelError
from .families import FAMILIES, Family, detect_family, get_family
from .manifest import parse_manifest, read_manifest, weights_sha256, write_manifest
from .safetensors_check import check_tree, read_header, read_json

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODELS = {"tiny-digits": ASSETS / "tiny-digits", "tiny-digits-text": ASSETS / "tiny-digits-text"}
DEFAULT_MODEL = "tiny-digits"
JUDGE_DIR = "judge"


@dataclass
class Bundle:
    family: Family
    transformer: nn.Module
    components: dict[str, Any] = field(default_factory=dict)  # vae, scheduler, text encoders, tokenizers
    pipeline_class: str | None = None  # diffusers pipeline that saves/loads it; None for a bare transformer
    pipeline_extra: dict = field(default_factory=dict)  # non-module pipeline args (DiT's id2label)
    manifest: dict = field(default_factory=dict)  # the ditkit.json it was loaded with
    path: Path | None = None
    kind: str = "pipeline"
    judge: Any = None
    feedback: Any = None  # ops.feedback.Feedback (distill --mode feedback): module + schedule, in feedback/

    @property
    def vae(self):
        return self.components.get("vae")

    @property
    def scheduler(self):
        return self.components.get("scheduler")

    @property
    def name(self) -> str:
        return self.path.name if self.path else "<memory>"

    def defaults(self) -> dict:
        """Sampling defaults: the bundle's own (manifest), else its family's."""
        f = self.family
        d = {"sampler": f.default_sampler, "steps": f.default_steps, "guidance": f.default_guidance}
        d.update(self.manifest.get("defaults", {}))
        return d

    def parent_record(self) -> dict:
        """What a child's manifest records about this bundle (location, weight digest, lineage)."""
        m = self.manifest
        sha = m.get("sha256")
        if sha is None and self.path is not None:
            sha = weights_sha256(self.path)
        return {"path": str(self.path) if self.path else None, "sha256": sha, "op": m.get("op", "import"),
                "lineage": m.get("lineage", [])}

    def transformer_bytes_on_disk(self) -> int:
        if self.path is None:
            return 0
        if self.path.is_file():
            return self.path.stat().st_size
        sub = self.path / "transformer" if (self.path / "transformer").is_dir() else self.path
        return sum(p.stat().st_size for p in sub.glob("*.safetensors"))

    def bytes_on_disk(self) -> int:
        if self.path is None:
            return 0
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


# -- loading ---------------------------------------------------------------------------------------

def resolve_source(src: str | os.PathLike | None) -> Path:
    if src is None or str(src) in DEFAULT_MODELS:
        name = DEFAULT_MODEL if src is None else str(src)
        path = DEFAULT_MODELS[name]
        if not (path / "model_index.json").is_file():
            raise FormatError(f"the embedded model {name} is missing from the installation ({path}); reinstall ditkit")
        return path
    path = Path(src).expanduser()
    if not path.exists():
        raise FormatError(f"{path} does not exist; give a checkpoint directory, a .safetensors/.pt file, "
                          f"or one of: {', '.join(DEFAULT_MODELS)}")
    return path


def load_bundle(src: str | os.PathLike | None = None, *, family: str | None = None, config: str | None = None,
                device: str = "cpu", dtype: torch.dtype = torch.float32) -> Bundle:
    path = resolve_source(src)
    if path.is_dir():
        if (path / "transformer.onnx").is_file():  # an ONNX bundle (ditkit export --format onnx)
            from .onnx_bundle import load_onnx_bundle

            bundle = load_onnx_bundle(path, device)
        elif (path / "model_index.json").is_file():
            bundle = _load_pipeline(path, device)
        elif (path / "config.json").is_file():
            bundle = _load_transformer_dir(path, device)
        else:
            raise FormatError(f"{path} is not a checkpoint: expected model_index.json (diffusers pipeline) "
                              "or config.json + safetensors (transformer)")
    elif path.suffix == ".safetensors":
        bundle = _load_single_file(path, family, config)
    elif path.suffix in (".pt", ".pth"):
        bundle = _load_dit_original(path, family)
    elif path.suffix == ".gguf":  # formats/gguf.py: dequantized to float on load
        from .gguf import load_gguf_bundle

        bundle = load_gguf_bundle(path, family, config)
    else:
        raise FormatError(f"{path}: unknown checkpoint file type {path.suffix!r}; use .safetensors, .gguf or a DiT .pt")
    for name, comp in [("transformer", bundle.transformer), *bundle.components.items()]:
        if isinstance(comp, nn.Module):
            comp.eval().requires_grad_(False)
            place(comp, device, dtype if name in ("transformer", "vae") else None)
    if path.is_dir() and bundle.kind in ("pipeline", "transformer"):
        from .feedback import load_feedback

        bundle.feedback = load_feedback(path, bundle.family, bundle.transformer)
    return bundle


def place(module: nn.Module, device: str, dtype: torch.dtype | None = None) -> None:
    """Move a module only where it is not already (diffusers warns on no-op dtype casts)."""
    p = next(module.parameters(), None)
    if p is None:
        return
    if p.device.type != torch.device(device).type:
        module.to(device)
    if dtype is not None and p.dtype != dtype:
        module.to(dtype)


def _wrap_load_error(path: Path, e: Exception) -> FormatError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return FormatError(f"{path} could not be loaded ({msg[:200]}); check that it is a complete, uncorrupted checkpoint")


def _load_pipeline(path: Path, device: str = "cpu") -> Bundle:
    import diffusers

    check_tree(path)
    index = read_json(path / "model_index.json", "pipeline index")
    tconf = read_json(path / "transformer" / "config.json", "transformer config")
    fam = detect_family(tconf, str(path / "transformer" / "config.json"))
    cls = getattr(diffusers, index.get("_class_name", ""), None)
    if cls is None:
        raise UnsupportedModelError(f"{path}: pipeline class {index.get('_class_name')!r} is not in diffusers")
    expected, _ = cls._get_signature_keys(cls)
    absent = {k: None for k in expected if k not in index or index[k] in (None, [None, None])}
    absent.pop("transformer", None)
    if quantized.is_quantized_dir(path / "transformer"):  # `ditkit quantize` output: rebuilt for the device
        absent["transformer"] = quantized.load_transformer(path / "transformer", fam, device)
    try:
        pipe = cls.from_pretrained(path, use_safetensors=True, **absent)
    except Exception as e:  # diffusers raises many types for bad checkpoints
        raise _wrap_load_error(path, e) from e
    components = {k: v for k, v in pipe.components.items() if k != "transformer" and v is not None}
    extra = {}
    if "id2label" in index:
        extra["id2label"] = {int(k): v for k, v in index["id2label"].items()}
    judge = None
    if (path / JUDGE_DIR).is_dir():
        from .judge import load_judge

        judge = load_judge(path / JUDGE_DIR).judge  # a Judge with its reference statistics set
    return Bundle(family=fam, transformer=pipe.transformer, components=components,
                  pipeline_class=index.get("_class_name", fam.pipeline_class), pipeline_extra=extra,
                  manifest=read_manifest(path) or {}, path=path, kind="pipeline", judge=judge)


def _load_transformer_dir(path: Path, device: str = "cpu") -> Bundle:
    check_tree(path)
    conf = read_json(path / "config.json", "transformer config")
    fam = detect_family(conf, str(path / "config.json"))
    if not list(path.glob("*.safetensors")):
        raise FormatError(f"{path} has a config.json but no .safetensors weights (pickled .bin weights are not loaded)")
    if quantized.is_quantized_dir(path):
        model = quantized.load_transformer(path, fam, device)
    else:
        try:
            model = fam.transformer_cls().from_pretrained(path, use_safetensors=True)
        except Exception as e:
            raise _wrap_load_error(path, e) from e
    return Bundle(family=fam, transformer=model, manifest=read_manifest(path) or {}, path=path, kind="transformer")


def _from_state_dict(fam: Family, config: dict, state: dict, where: Path) -> nn.Module:
    cls = fam.transformer_cls()
    try:
        model = cls.from_config(config)
    except Exception as e:
        raise FormatError(f"{where}: the config does not build a {cls.__name__} ({str(e)[:200]}); fix --config")
    missing, unexpected = model.load_state_dict(state, strict=False), None
    missing, unexpected = missing.missing_keys, missing.unexpected_keys
    if missing or unexpected:
        raise FormatError(f"{where}: weights do not match the {fam.name} config ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]}); pass the right --config")
    return model


def _load_single_file(path: Path, family: str | None, config: str | None) -> Bundle:
    from safetensors.torch import load_file

    header = read_header(path)
    meta = header.get("__metadata__") or {}
    conf = None
    if config is not None:
        conf = read_json(Path(config), "--config")
    elif "config" in meta:  # files ditkit writes carry their config
        try:
            conf = json.loads(meta["config"])
        except json.JSONDecodeError:
            raise FormatError(f"{path}: the config in its metadata is not JSON; pass --config")
    if family is None:
        family = meta.get("family") or (detect_family(conf).name if conf else None)
    if family is None:
        raise ConfigError(f"{path}: cannot tell the model family from a bare .safetensors file; "
                          f"pass --family ({', '.join(FAMILIES)})")
    fam = get_family(family)
    state = load_file(path)
    if conf is None:
        if fam.name != "dit":
            raise ConfigError(f"{path}: the {fam.name} architecture cannot be read from its keys; pass --config config.json")
        conf = dit_original.config_from_diffusers_state(state)
    model = _from_state_dict(fam, conf, state, path)
    return Bundle(family=fam, transformer=model, path=path, kind="safetensors",
                  manifest=parse_manifest(meta["ditkit"], f"{path} metadata") if "ditkit" in meta else {})


def _load_dit_original(path: Path, family: str | None) -> Bundle:
    if family not in (None, "dit"):
        raise ConfigError(f"{path}: .pt checkpoints are read as facebookresearch/DiT only; drop --family {family}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything that is not plain tensors/containers
        m = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \d+|Unsupported class \S+", str(e))
        what = (f"it references {m.group(1)}" if m.group(1) else m.group(0)) if m else type(e).__name__
        raise FormatError(f"{path} holds objects other than tensors and is refused without running them ({what}); "
                          "re-save the state dict alone (torch.save(model.state_dict(), ...))")
    state = dit_original.unwrap(obj, path)
    conf, converted = dit_original.to_diffusers(state, path)
    model = _from_state_dict(get_family("dit"), conf, converted, path)
    return Bundle(family=get_family("dit"), transformer=model, path=path, kind="dit-original")


# -- saving ----------------------------------------------------------------------------------------

def save_bundle(bundle: Bundle, out: os.PathLike, manifest: dict, force: bool = False) -> Path:
    """Write the bundle atomically as a diffusers directory + judge + ditkit.json; returns the path."""
    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        write_bundle_dir(bundle, tmp)
        write_manifest(tmp, manifest)
    return out


def write_bundle_dir(bundle: Bundle, root: Path) -> None:
    import diffusers

    if bundle.feedback is not None:  # refuse before writing anything: a stale module must not be carried along
        from .feedback import check_backbone

        check_backbone(bundle.feedback, bundle.transformer, str(root))
    if quantized.is_quantized(bundle.transformer):  # quantized modules: tensors + quantization.json
        return quantized.write_bundle_dir(bundle, root)

    if bundle.pipeline_class is not None:
        cls = getattr(diffusers, bundle.pipeline_class)
        expected, _ = cls._get_signature_keys(cls)
        parts = {k: None for k in expected if k not in bundle.components and k != "transformer"}
        parts.update(bundle.components)
        pipe = cls(transformer=bundle.transformer, **parts, **bundle.pipeline_extra)
        pipe.save_pretrained(root, safe_serialization=True)
        if bundle.pipeline_extra:  # keep non-module args (DiT's id2label) in model_index.json
            index_path = root / "model_index.json"
            index = json.loads(index_path.read_text())
            index.update({k: v for k, v in bundle.pipeline_extra.items()})
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    else:
        bundle.transformer.save_pretrained(root, safe_serialization=True)
    if bundle.judge is not None:
        from .judge import save_judge

        save_judge(bundle.judge, dir=root / JUDGE_DIR)
    if bundle.feedback is not None:
        from .feedback import save_feedback

        save_feedback(bundle.feedback, root, bundle.transformer)
