"""Training checkpoints on disk: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint directory holds `trainable.safetensors` (the trained tensors), `ema.safetensors`,
`optimizer.safetensors` + `state.json` (optimizer scalars and param groups, LR scheduler, step, RNG
states, the training config), and the JSONL log beside it. No pickles: resuming executes no code.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError, FormatError
from .safetensors_check import read_header, read_json

CKPT = "checkpoint"
LOG = "log.jsonl"


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state().tolist(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(s["python"]), None))


class CheckpointStore:
    """Where a training run keeps its resumable state and its JSONL log (one directory)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def ckpt(self) -> Path:
        return self.root / CKPT

    def exists(self) -> bool:
        return (self.ckpt / "state.json").is_file()

    def save(self, *, step: int, trainable: dict, ema: dict | None, optimizer: dict, scheduler: dict,
             config: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{CKPT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler, "rng": rng_state(), "config": config}
        (tmp / "state.json").write_text(json.dumps(state, default=float))
        old = self.root / f".{CKPT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.ckpt.exists():
            os.replace(self.ckpt, old)
        os.replace(tmp, self.ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def load(self) -> dict:
        if not self.exists():
            raise ConfigError(f"--resume: no checkpoint in {self.root}; start without --resume")
        for f in ("trainable.safetensors", "optimizer.safetensors"):
            read_header(self.ckpt / f)
        state = read_json(self.ckpt / "state.json", "checkpoint state")
        try:
            state["trainable"] = load_file(str(self.ckpt / "trainable.safetensors"))
            ema = self.ckpt / "ema.safetensors"
            state["ema"] = load_file(str(ema)) if ema.is_file() else None
            state["optimizer"] = _unflatten_optimizer(load_file(str(self.ckpt / "optimizer.safetensors")),
                                                      state["optimizer"])
        except (KeyError, ValueError) as e:
            raise FormatError(f"checkpoint in {self.ckpt} is damaged ({e}); start again without --resume")
        return state

    def log(self, row: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOG, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")

    def logged_plan(self) -> dict | None:
        """The plan the run logged before its step 1 (what a --resume must keep, e.g. a timed schedule)."""
        p = self.root / LOG
        if not p.is_file():
            return None
        for line in p.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("event") == "plan" and isinstance(row.get("plan"), dict):
                return row["plan"]
        return None

    def truncate_log(self, step: int) -> None:
        """On resume, drop log rows written after the checkpoint's step (they will be written again)."""
        p = self.root / LOG
        if p.is_file():
            rows = [l for l in p.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
            p.write_text("".join(r + "\n" for r in rows))
