"""An ONNX bundle directory (`ditkit export --format onnx`): its layout is described in formats/onnx_bundle.py,
which holds the modules that run its graphs. Loaded as a Bundle of kind "onnx" (an OnnxTransformer)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..atomic import atomic_dir
from ..bundle import Bundle
from ..errors import FormatError
from ..families import detect_family
from ..manifest import MANIFEST, read_manifest, sha256_files
from ..onnx_bundle import TRANSFORMER_CONFIG, TRANSFORMER_ONNX, VAE_DECODER_ONNX, OnnxTransformer, OnnxVaeDecoder, \
    onnx_files
from ..safetensors_check import check_tree, read_json
from .base import Layout


def detect(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / TRANSFORMER_ONNX).is_file()


is_onnx_bundle = detect


def load(path: Path, *, family: str | None = None, config: str | None = None, device: str = "cpu") -> Bundle:
    return load_onnx_bundle(path, device)


def load_onnx_bundle(path: Path, device: str = "cpu") -> Bundle:
    """An ONNX bundle as a Bundle of kind "onnx" (its transformer an OnnxTransformer)."""
    import diffusers

    from ..judge import DIR, load_judge

    path = Path(path)
    check_tree(path)
    manifest = read_manifest(path) or {}
    spec = manifest.get("onnx")
    if not isinstance(spec, dict) or "transformer" not in spec:
        raise FormatError(f"{path} has {TRANSFORMER_ONNX} but its ditkit.json has no \"onnx\" section; "
                          "re-export it with ditkit export --format onnx")
    config = read_json(path / TRANSFORMER_CONFIG, "transformer config")
    fam = detect_family(config, str(path / TRANSFORMER_CONFIG))
    components: dict[str, Any] = {}
    transformer = OnnxTransformer(path / TRANSFORMER_ONNX, spec["transformer"], config, device)
    if (path / VAE_DECODER_ONNX).is_file():
        components["vae"] = OnnxVaeDecoder(path / VAE_DECODER_ONNX, spec.get("vae_decoder", {}).get("config", {}),
                                           device)
    for name in ("vae", "scheduler"):
        sub = path / name
        if name in components or not sub.is_dir():
            continue
        cfg_file = sub / ("scheduler_config.json" if name == "scheduler" else "config.json")
        cls = getattr(diffusers, read_json(cfg_file, f"{name} config").get("_class_name", ""), None)
        if cls is None:
            raise FormatError(f"{cfg_file}: unknown diffusers class; restore it or re-export the bundle")
        try:
            components[name] = cls.from_pretrained(sub) if name == "scheduler" else \
                cls.from_pretrained(sub, use_safetensors=True)
        except Exception as e:
            raise FormatError(f"{sub} could not be loaded ({str(e).splitlines()[0][:200] if str(e) else e}); "
                              "re-export the bundle")
    judge = None
    if (path / DIR).is_dir():
        judge = load_judge(path / DIR).judge
    pipe = spec.get("pipeline", {})
    extra = {k: ({int(i): v for i, v in val.items()} if k == "id2label" else val)
             for k, val in pipe.get("extra", {}).items()}
    return Bundle(family=fam, transformer=transformer, components=components,
                  pipeline_class=pipe.get("class"), pipeline_extra=extra, manifest=manifest, path=path,
                  kind="onnx", judge=judge)


def save(bundle: Bundle, root: Path) -> None:
    """Move the staged graphs of an exported bundle (bundle.path) into `root`, with its other parts."""
    from ..judge import DIR, save_judge

    src = Path(bundle.path)
    tr = bundle.transformer
    for f in onnx_files(src / TRANSFORMER_ONNX) + onnx_files(src / VAE_DECODER_ONNX):
        if f.is_file():
            shutil.move(str(f), root / f.name)
    (root / TRANSFORMER_CONFIG).write_text(json.dumps(dict(tr.config), indent=2, sort_keys=True,
                                                      default=list) + "\n")
    vae = bundle.components.get("vae")
    if isinstance(vae, nn.Module) and not isinstance(vae, OnnxVaeDecoder):
        vae.save_pretrained(root / "vae", safe_serialization=True)
    sched = bundle.components.get("scheduler")
    if sched is not None:
        sched.save_pretrained(root / "scheduler")
    if bundle.judge is not None:
        save_judge(bundle.judge, dir=root / DIR)


def save_onnx_bundle(bundle: Bundle, out: os.PathLike, manifest: dict, force: bool = False) -> Path:
    """Write the exported bundle into `out` atomically; ditkit.json gets its "onnx" section and weight digest."""
    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        save(bundle, tmp)
        manifest = {**manifest, "onnx": bundle.manifest["onnx"]}  # names, axes, opset, precision, call convention
        weights = sorted([*tmp.glob("*.onnx"), *tmp.glob("*.onnx.data"), *tmp.rglob("*.safetensors")])
        manifest["sha256"] = sha256_files(weights)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return out


LAYOUT = Layout("onnx", "an ONNX bundle directory (transformer.onnx; ditkit export --format onnx)", detect, load,
                save)  # no `writes`: export stages the graphs and writes the bundle with save_onnx_bundle
