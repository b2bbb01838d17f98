"""A feedback module on disk (distill --mode feedback): `feedback/feedback.safetensors` beside the transformer.

The file holds the module's tensors (`block.*`, the copied backbone block, and `scale`) and, in its header
metadata, `config`: {"source": "<backbone block it copies>", "schedule": {sampler, steps, num_blocks, block,
partial}, "backbone": <fingerprint of the transformer it was trained on>}. A module is only saved with, and
only loaded onto, the backbone whose fingerprint it records: an op that changed the weights (prune, quantize,
a fused LoRA) cannot carry a stale feedback module along. Loading rebuilds the module as a copy of that
backbone block (so its class and settings come from the bundle's own transformer) and loads the tensors
strictly: nothing is executed, only tensors and JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError, FormatError
from .safetensors_check import read_header

DIR = "feedback"
WEIGHTS = "feedback.safetensors"


def fingerprint(module) -> str:
    """sha256 over every tensor's name, shape, dtype and an evenly strided sample of up to 4096 of its values:
    cheap on any model size, and changed by pruning, quantization or a fused adapter (which rewrite whole
    tensors)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // 4096)
            h.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def check_backbone(fb, transformer, where: str) -> None:
    if fb.backbone and fingerprint(transformer) != fb.backbone:
        raise FormatError(f"{where}: the feedback module was trained on other backbone weights than this "
                          "transformer's (pruned, quantized or LoRA-fused since?); train a new one with distill "
                          "--mode feedback, or load the model with its feedback/ folder removed")


def save_feedback(fb, root: Path, transformer) -> Path:
    from safetensors.torch import save_file

    check_backbone(fb, transformer, str(root))
    d = Path(root) / DIR
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in fb.module.state_dict().items()}
    config = {"source": fb.module.source, "schedule": fb.schedule.to_dict(), "backbone": fb.backbone}
    save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt", "config": json.dumps(config, sort_keys=True)})
    return d


def load_feedback(root: Path, family, transformer):
    """The bundle's Feedback (ditkit.nn.feedback) from `root/feedback/`, or None when it has none."""
    from safetensors.torch import load_file

    from ditkit.nn.feedback import Feedback, FeedbackModule, FeedbackSchedule, backbone_blocks

    path = Path(root) / DIR / WEIGHTS
    if not (Path(root) / DIR).exists():
        return None
    if not path.is_file():
        raise FormatError(f"{Path(root) / DIR} has no {WEIGHTS}; restore it or delete the folder to load the "
                          "model without its feedback module")
    meta = read_header(path).get("__metadata__") or {}
    try:
        config = json.loads(meta["config"])
        source, schedule = str(config["source"]), FeedbackSchedule.from_dict(config["schedule"])
        backbone = str(config["backbone"])
    except (KeyError, TypeError, ValueError, RecursionError, ConfigError) as e:
        msg = str(e) if isinstance(e, ConfigError) else repr(e)[:120]
        raise FormatError(f"{path}: its metadata has no valid feedback config ({msg}); re-run distill --mode feedback")
    blocks = backbone_blocks(family, transformer)
    if schedule.num_blocks != len(blocks):
        raise FormatError(f"{path}: the feedback module was trained on a {schedule.num_blocks}-block backbone, "
                          f"this transformer has {len(blocks)}; it belongs to another model")
    try:
        block = transformer.get_submodule(source)
    except AttributeError:
        raise FormatError(f"{path}: its source block {source!r} is not in this transformer")
    module = FeedbackModule(block, source)
    try:
        result = module.load_state_dict(load_file(str(path)), strict=False)
    except Exception as e:  # a size mismatch (RuntimeError) or an unreadable file (SafetensorError)
        raise FormatError(f"{path}: its tensors do not fit a copy of {source} ({str(e).splitlines()[0][:160]}); "
                          "it belongs to another model or is corrupted")
    bad = list(result.missing_keys) + list(result.unexpected_keys)
    if bad:
        raise FormatError(f"{path}: its tensors do not match a copy of {source} ({len(bad)} mismatched keys, e.g. "
                          f"{bad[0]}); it belongs to another model")
    p = next(transformer.parameters())
    module.to(p.device, p.dtype).eval().requires_grad_(False)
    fb = Feedback(module, schedule, backbone)
    check_backbone(fb, transformer, str(path))
    return fb
