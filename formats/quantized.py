"""A quantized transformer on disk: plain tensors in safetensors + quantization.json. No pickles.

    transformer/config.json                          the diffusers config (the architecture, unchanged)
    transformer/quantization.json                    {"format": "ditkit-quantized", "version": 1,
                                                      "scheme": ..., "modules": {name: {"kind", "spec"}}}
    transformer/diffusion_pytorch_model.safetensors  full-precision tensors under their usual names, and
                                                     each quantized module's tensors as "<module>.<part>"
                                                     (e.g. int8 "weight" + fp32 "weight_scale")

Reloading builds the architecture from config.json with empty weights, rebuilds every quantized
module from its tensors for the target device (ditkit.nn.quantized.KINDS: the kernel is chosen then,
e.g. torch.ao fbgemm on CPU, torch._int_mm on CUDA, for the same int8 tensors), swaps them in and
assigns the remaining tensors. Any tensor missing or left over is a FormatError. The bundle around it (the
other pipeline components, ditkit.json) is written and read by ditkit.formats.layouts.quantized.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import FormatError
from .safetensors_check import read_header, read_json

FORMAT = "ditkit-quantized"
VERSION = 1
QUANT_CONFIG = "quantization.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEME_ATTR = "ditkit_quantization"  # on the transformer: {"scheme": ..., ...} written into quantization.json


def is_quantized(model) -> bool:
    """True when a module tree holds ditkit-quantized modules (export/prune can refuse it by this)."""
    return model is not None and any(getattr(m, "ditkit_kind", None) for m in model.modules())


def is_quantized_dir(path: Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def quantized_modules(model) -> dict:
    """name -> module for every quantized module (their subtrees are theirs alone)."""
    return {n: m for n, m in model.named_modules() if getattr(m, "ditkit_kind", None)}


def param_count(model) -> int:
    """Parameters as the float model had them: quantized modules count their logical weights and biases
    (torch.ao keeps its int8 weights outside .parameters(), so a plain count would miss them)."""
    from torch import nn

    qmods = quantized_modules(model)
    total = sum(t.numel() for name, t in _plain_tensors(model, set(qmods)).items() if isinstance(t, nn.Parameter))
    for m in qmods.values():
        s = m.ditkit_spec
        if "in_features" in s:
            total += s["in_features"] * s["out_features"] + (s["out_features"] if s.get("bias") else 0)
        else:
            total += s["num_embeddings"] * s["embedding_dim"]
    return total


def _plain_tensors(model, skip: set[str]) -> dict:
    """Parameters and persistent buffers of every module outside the quantized ones."""
    out = {}

    def walk(m, prefix: str):
        if prefix.rstrip(".") in skip:
            return
        nonpersistent = getattr(m, "_non_persistent_buffers_set", set())
        for n, p in m._parameters.items():
            if p is not None:
                out[prefix + n] = p
        for n, b in m._buffers.items():
            if b is not None and n not in nonpersistent:
                out[prefix + n] = b
        for n, c in m.named_children():
            walk(c, f"{prefix}{n}.")

    walk(model, "")
    return out


# -- writing ---------------------------------------------------------------------------------------

def write_transformer(model, root: Path) -> None:
    from safetensors.torch import save_file

    from ditkit.nn.quantized import KINDS

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model.save_config(root)  # config.json, exactly as diffusers writes it
    qmods = quantized_modules(model)
    tensors, seen = {}, set()
    for name, t in _plain_tensors(model, set(qmods)).items():
        t = t.detach().cpu().contiguous()
        if t.data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t
    modules = {}
    for name, m in qmods.items():
        for part, t in KINDS[m.ditkit_kind].tensors(m).items():
            tensors[f"{name}.{part}"] = t
        modules[name] = {"kind": m.ditkit_kind, "spec": m.ditkit_spec}
    info = dict(getattr(model, SCHEME_ATTR, {}))
    save_file(tensors, root / WEIGHTS, metadata={"format": "pt", "ditkit": FORMAT, "scheme": str(info.get("scheme"))})
    doc = {"format": FORMAT, "version": VERSION, **info, "modules": modules}
    (root / QUANT_CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def transformer_bytes(root: Path) -> int:
    root = Path(root)
    sub = root / "transformer" if (root / "transformer").is_dir() else root
    return sum(p.stat().st_size for p in sub.glob("*.safetensors"))


# -- loading ---------------------------------------------------------------------------------------

def load_transformer(root: Path, family, device: str = "cpu"):
    """Rebuild a quantized transformer directory (config.json + quantization.json + safetensors)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from ditkit.nn.quantized import KINDS

    root = Path(root)
    doc = read_json(root / QUANT_CONFIG, "quantization config")
    if doc.get("format") != FORMAT or not isinstance(doc.get("modules"), dict):
        raise FormatError(f"{root / QUANT_CONFIG} is not a ditkit quantization config; restore it from the original output")
    if doc.get("version", 0) > VERSION:
        raise FormatError(f"{root} was written by a newer ditkit (quantized format {doc['version']}); upgrade ditkit")
    conf = read_json(root / "config.json", "transformer config")
    weights = root / WEIGHTS
    if not weights.is_file():
        raise FormatError(f"{root} has {QUANT_CONFIG} but no {WEIGHTS}; the quantized checkpoint is incomplete")
    read_header(weights)
    cls = family.transformer_cls()
    with init_empty_weights():  # parameters on the meta device: nothing allocated, nothing initialized
        model = cls.from_config(conf)
    state = load_file(weights, device="cpu")
    for name, entry in doc["modules"].items():
        kind = KINDS.get(entry.get("kind"))
        if kind is None:
            raise FormatError(f"{root}: module {name} has unknown quantized kind {entry.get('kind')!r}; "
                              f"this ditkit knows {', '.join(sorted(KINDS))} (upgrade ditkit)")
        prefix = name + "."
        parts = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        try:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            getattr(parent, child)
            setattr(parent, child, kind.rebuild(entry.get("spec", {}), parts, device))
        except (AttributeError, KeyError, RuntimeError, ValueError) as e:
            raise FormatError(f"{root}: quantized module {name} cannot be rebuilt ({type(e).__name__}: "
                              f"{str(e)[:160]}); the checkpoint does not match its config")
    expected = set(_plain_tensors(model, set(doc["modules"])))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise FormatError(f"{weights}: tensors do not match the config ({len(missing)} missing, {len(unexpected)} "
                          f"unexpected, e.g. {(missing or unexpected)[0]}); the checkpoint is damaged")
    for name, t in state.items():  # assigned directly: load_state_dict would run torch.ao's own state hooks
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if attr in owner._parameters:
            owner._parameters[attr] = torch.nn.Parameter(t.to(device), requires_grad=False)
        else:
            owner._buffers[attr] = t.to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise FormatError(f"{root}: no weights for {left[0]} ({len(left)} tensors); the checkpoint is incomplete")
    for m in model.modules():  # non-persistent buffers (e.g. positional tables) were built on the CPU
        for n, b in m._buffers.items():
            if b is not None and b.device != torch.device(device):
                m._buffers[n] = b.to(device)
    setattr(model, SCHEME_ATTR, {k: v for k, v in doc.items() if k not in ("format", "version", "modules")})
    model.eval().requires_grad_(False)
    return model
