"""Precomputed text embeddings on disk: one safetensors file, a row per prompt.

Keys: the family's condition names (prompt_embeds, prompt_attention_mask, pooled_prompt_embeds) and the
same with a `negative_` prefix for the unconditional branch; metadata `prompts` is a JSON list.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import FormatError
from .reading import loads, regular_file
from .safetensors_check import read_header


def load_embeddings(path: Path) -> tuple[list[str], dict, dict | None]:
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise FormatError(f"embeddings file {path} does not exist")
    regular_file(path, "embeddings file")  # a FIFO or device is refused before it is opened
    meta = read_header(path).get("__metadata__") or {}
    try:
        prompts = loads(meta["prompts"], f"{path} metadata")
    except (KeyError, FormatError):
        prompts = None
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise FormatError(f"{path}: no 'prompts' list in its metadata; write it with ditkit's save_embeddings")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises several types for damaged files
        raise FormatError(f"embeddings file {path} could not be read ({str(e)[:120]}); re-copy it")
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise FormatError(f"{path}: {k} holds NaN or inf values; recompute the embeddings")
        if v.ndim == 0:
            raise FormatError(f"{path}: {k} is a scalar; tensors must have one row per prompt")
    cond = {k: v for k, v in tensors.items() if not k.startswith("negative_")}
    uncond = {k[len("negative_"):]: v for k, v in tensors.items() if k.startswith("negative_")} or None
    if any(v.shape[0] != len(prompts) for v in cond.values()):
        raise FormatError(f"{path}: tensors must have one row per prompt ({len(prompts)})")
    return prompts, cond, uncond


def save_embeddings(path: Path, prompts: list[str], cond: dict, uncond: dict | None) -> None:
    tensors = {k: v.contiguous().cpu() for k, v in cond.items()}
    if uncond:
        tensors.update({f"negative_{k}": v.contiguous().cpu() for k, v in uncond.items()})
    save_file(tensors, str(path), metadata={"prompts": json.dumps(prompts)})
