"""Training checkpoints on disk: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint directory holds `trainable.safetensors` (the trained tensors), `ema.safetensors`,
`optimizer.safetensors` + `state.json` (optimizer scalars and param groups, LR scheduler, step, RNG
states, the training config), and the JSONL log beside it. No pickles: resuming executes no code.

The directory's root holds a marker (`ditkit-checkpoint.json`): only a directory with the marker (or,
from before markers, a `checkpoint/state.json`) is ever cleared, and only the names ditkit writes there.
Starting over (`--force`) is deferred to the run's first write, so a run refused or failing before it
trains deletes nothing. A checkpoint is written into `.checkpoint.tmp` and renamed over `checkpoint/`;
a SIGKILL between the two renames leaves the previous one in `.checkpoint.old`, which loading takes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import CHECKPOINT_MARKER, check_disjoint, disk_full, full_disk_cause, interrupts_raise, is_ditkit_dir
from .errors import ConfigError, FormatError, OutputExistsError
from .safetensors_check import read_header, read_json

CKPT = "checkpoint"
LOG = "log.jsonl"
TMP, OLD = f".{CKPT}.tmp", f".{CKPT}.old"
# what a training run writes into its checkpoint directory (the only names starting over removes)
RUN_FILES = (CKPT, TMP, OLD, LOG, "samples", "validation", "data.safetensors")


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
        self._start_over: tuple[str, ...] | None = None  # names to remove at this run's first write

    @property
    def ckpt(self) -> Path:
        """The committed checkpoint: checkpoint/, or .checkpoint.old when a save was killed between renames."""
        if not (self.root / CKPT / "state.json").is_file() and (self.root / OLD / "state.json").is_file():
            return self.root / OLD
        return self.root / CKPT

    def exists(self) -> bool:
        return (self.ckpt / "state.json").is_file()

    def has_run(self) -> bool:
        """A previous run left its checkpoint or its log here."""
        return self.exists() or (self.root / LOG).is_file()

    # -- the output policy for the checkpoint directory --------------------------------------------------

    def check(self, inputs: Iterable = (), what: str = "--checkpoint-dir") -> None:
        """Before any work: the directory must not overlap an input, must be a directory (or absent), and
        when it holds anything it must be ditkit's (the marker): it is never cleared otherwise."""
        check_disjoint(self.root, inputs, what)
        if os.path.lexists(self.root) and not self.root.is_dir():
            raise ConfigError(f"{what} {self.root} is not a directory; choose a new or empty directory")
        if self.root.is_dir() and any(self.root.iterdir()) and not self.owned():
            raise ConfigError(f"{what} {self.root} holds files ditkit did not write (no {CHECKPOINT_MARKER}); "
                              "choose a new or empty directory (it is never cleared, even with --force)")

    def check_run(self, resume: bool, force: bool) -> None:
        """Before loading (rank 0): --resume needs this directory's checkpoint; without --resume an earlier run
        here is an error, or with --force replaced at this run's first write (`start_over`, then `mark`)."""
        if resume:
            if not self.exists():
                raise ConfigError(f"--resume: no checkpoint in {self.root}; start without --resume (add --force if "
                                  f"{self.root} holds an older run)")
        elif self.has_run() and not force:
            raise OutputExistsError(f"checkpoint directory {self.root} holds an earlier run; pass --resume to "
                                    "continue it or --force to start over")

    def owned(self) -> bool:
        return is_ditkit_dir(self.root) or (self.root / CKPT / "state.json").is_file()

    def start_over(self, keep: Iterable[str] = ()) -> None:
        """--force: the previous run's files go, but only at this run's first write (a run refused before
        it trains, or failing while it loads, deletes nothing). `keep`: names that stay (a keyed data cache)."""
        self._start_over = tuple(n for n in RUN_FILES if n not in set(keep))

    def mark(self) -> None:
        """Create the directory with its marker (and carry out a pending start_over) before the first write."""
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        if self._start_over is not None and not created:
            if not self.owned():  # checked again: only ditkit's own directory is ever cleared
                raise ConfigError(f"{self.root} is not a ditkit checkpoint directory; it was not cleared")
            for name in self._start_over:
                p = self.root / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.lexists(p):
                    p.unlink()
        self._start_over = None
        marker = self.root / CHECKPOINT_MARKER
        if not marker.is_file():
            marker.write_text(json.dumps({"format": "ditkit-checkpoint", "format_version": 1}) + "\n")

    def save(self, *, step: int, trainable: dict, ema: dict | None, optimizer: dict, scheduler: dict,
             config: dict) -> None:
        tmp, old = self.root / TMP, self.root / OLD
        try:
            with interrupts_raise(str(self.root / CKPT)):
                self.mark()
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                          str(tmp / "trainable.safetensors"))
                if ema is not None:
                    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
                opt_tensors, opt_meta = _flatten_optimizer(optimizer)
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
                state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler, "rng": rng_state(),
                         "config": config}
                (tmp / "state.json").write_text(json.dumps(state, default=float))  # last: marks tmp complete
        except BaseException as e:
            written = sum(p.stat().st_size for p in tmp.glob("*") if p.is_file()) if tmp.is_dir() else 0
            shutil.rmtree(tmp, ignore_errors=True)
            cause = full_disk_cause(e) if isinstance(e, Exception) else None
            if cause is not None:
                raise disk_full(cause, self.root / CKPT, written, written) from None
            raise
        # commit: checkpoint/ -> .checkpoint.old, .checkpoint.tmp -> checkpoint/ (a kill in between: load
        # takes .checkpoint.old)
        if (self.root / CKPT / "state.json").is_file():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.root / CKPT, old)
        else:
            shutil.rmtree(self.root / CKPT, ignore_errors=True)  # a half-made one (never committed)
        os.replace(tmp, self.root / CKPT)
        shutil.rmtree(old, ignore_errors=True)

    def load(self) -> dict:
        if not self.exists():
            raise ConfigError(f"--resume: no checkpoint in {self.root}; start without --resume")
        ckpt = self.ckpt
        for f in ("trainable.safetensors", "optimizer.safetensors"):
            read_header(ckpt / f)
        state = read_json(ckpt / "state.json", "checkpoint state")
        try:
            state["trainable"] = load_file(str(ckpt / "trainable.safetensors"))
            ema = ckpt / "ema.safetensors"
            state["ema"] = load_file(str(ema)) if ema.is_file() else None
            state["optimizer"] = _unflatten_optimizer(load_file(str(ckpt / "optimizer.safetensors")),
                                                      state["optimizer"])
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise FormatError(f"checkpoint in {ckpt} is damaged ({e}); start again without --resume")
        return state

    def log(self, row: dict) -> None:
        try:
            self.mark()
            with open(self.root / LOG, "a") as f:
                f.write(json.dumps(row, default=float) + "\n")
        except OSError as e:
            cause = full_disk_cause(e)
            if cause is not None:
                raise disk_full(cause, self.root / LOG) from None
            raise

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
            rows = [l for l in p.read_text().splitlines() if _step(l) is not None and _step(l) <= step]
            p.write_text("".join(r + "\n" for r in rows))  # a line cut by a kill (not JSON) is dropped


def _step(line: str) -> int | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("step", 0) if isinstance(row, dict) and isinstance(row.get("step", 0), int) else None
