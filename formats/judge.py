"""A judge on disk: `model.safetensors` (weights + `ref_mu` / `ref_sigma`) and `config.json`.

config.json holds {"architecture": <the Judge config dict>, "input": <the input convention>, ...extra}
(e.g. the judge's training and held-out accuracy). Only safetensors, never pickles.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from .errors import FormatError

DIR = "judge"  # a bundle's judge, beside its weights
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
REF_KEYS = ("ref_mu", "ref_sigma")
INPUT_CONVENTION = {
    "shape": "(N, 3, 32, 32)",
    "dtype": "float32",
    "range": "[0, 1]",
    "polarity": "white digit on black background",
    "channels": "3 equal (grey) channels",
}


class LoadedJudge(NamedTuple):
    judge: "object"  # ditkit.nn.judge.Judge, with its reference statistics set
    ref_mu: "object"  # torch.float64 (D,)
    ref_sigma: "object"  # torch.float64 (D, D)


def save_judge(judge, ref_mu=None, ref_sigma=None, dir=None, extra: dict | None = None) -> Path:
    """Write `judge` (and its reference statistics; default: those set on the judge) into `dir`."""
    import torch
    from safetensors.torch import save_file

    if dir is None:
        raise TypeError("save_judge needs a target dir")
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    mu = judge.ref_mu if ref_mu is None else torch.as_tensor(ref_mu)
    sigma = judge.ref_sigma if ref_sigma is None else torch.as_tensor(ref_sigma)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in judge.state_dict().items()}
    tensors["ref_mu"] = mu.detach().cpu().to(torch.float64).contiguous()
    tensors["ref_sigma"] = sigma.detach().cpu().to(torch.float64).contiguous()
    save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})  # one key: byte-reproducible
    cfg = {"architecture": dict(judge.config), "input": INPUT_CONVENTION}
    cfg.update(extra or {})
    (d / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return d


def load_judge(dir) -> LoadedJudge:
    """Read a judge written by `save_judge`; returns (judge in eval mode, ref_mu, ref_sigma)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ditkit.nn.judge import Judge

    d = Path(dir)
    cfg_path, w_path = d / CONFIG, d / WEIGHTS
    if not d.is_dir():
        raise FormatError(f"judge directory {d} does not exist; rebuild the asset with "
                          f"python tools/tiny_digits.py")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FormatError(f"judge file {p} is missing; rebuild the judge with "
                              f"python tools/tiny_digits.py")
    try:
        cfg = json.loads(cfg_path.read_text())
        arch = cfg["architecture"]
        if not isinstance(arch, dict):
            raise TypeError("architecture is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise FormatError(f"judge config {cfg_path} is corrupt ({e}); restore it or rebuild the judge")
    try:
        tensors = load_file(str(w_path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise FormatError(f"judge weights {w_path} are corrupt ({e}); restore them or rebuild the judge")
    missing_ref = [k for k in REF_KEYS if k not in tensors]
    if missing_ref:
        raise FormatError(f"judge weights {w_path} lack {', '.join(missing_ref)}; rebuild the judge")
    ref_mu, ref_sigma = tensors.pop("ref_mu"), tensors.pop("ref_sigma")
    try:
        judge = Judge(arch)
        judge.load_state_dict(tensors, strict=True)
        judge.set_reference(ref_mu, ref_sigma)
    except Exception as e:  # shape/key mismatch or a bad architecture dict
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"judge weights {w_path} do not match {cfg_path} ({msg}); rebuild the judge")
    judge.eval()
    return LoadedJudge(judge, judge.ref_mu, judge.ref_sigma)


def read_judge_config(dir) -> dict:
    p = Path(dir) / CONFIG
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise FormatError(f"judge file {p} is missing; rebuild the judge with "
                          f"python tools/tiny_digits.py")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"judge config {p} is corrupt ({e}); restore it or rebuild the judge")
