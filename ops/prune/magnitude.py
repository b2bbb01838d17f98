"""magnitude: unstructured L1-magnitude pruning to a target sparsity ("Efficient Pruning of Text-to-Image
Models": SD2 keeps its quality to 38.5%).

Prunable: the weight matrices of the transformer's nn.Linear layers, except the family's protected ones
(embeddings, adaLN modulation producers, final projection: `Family.is_full_precision` / `is_modulation`).
Scope: "per-layer" zeroes the same fraction of every prunable matrix; "global" zeroes the smallest |w| over
all of them at once (one threshold: layers with small weights lose more). The zeros are stored densely, so
the model keeps its size and speed unless a sparse kernel serves it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def prunable_linears(family, tr) -> tuple[dict[str, nn.Linear], list[str]]:
    """(name -> Linear to prune, names of protected Linears)."""
    keep, protected = {}, []
    for name, mod in tr.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if family.is_full_precision(name) or family.is_modulation(name):
            protected.append(name)
        else:
            keep[name] = mod
    return keep, protected


def _kth_abs(values: list[torch.Tensor], k: int) -> float:
    """The k-th smallest |w| over several tensors (k >= 1)."""
    flat = torch.cat([v.detach().abs().flatten().float() for v in values])
    return float(flat.kthvalue(k).values)


def sparsify_(layers: dict[str, nn.Linear], sparsity: float, scope: str) -> dict[str, float]:
    """Zero the smallest-|w| weights in place; returns the sparsity reached per layer."""
    if scope == "global":
        total = sum(m.weight.numel() for m in layers.values())
        k = int(round(sparsity * total))
        if k >= 1:
            thr = _kth_abs([m.weight for m in layers.values()], k)
            for m in layers.values():
                m.weight.data[m.weight.data.abs() <= thr] = 0
    else:
        for m in layers.values():
            w = m.weight.data
            k = int(round(sparsity * w.numel()))
            if k < 1:
                continue
            idx = w.abs().flatten().argsort()[:k]  # exactly k zeros, ties broken by position
            w.view(-1)[idx] = 0
    return {n: float((m.weight == 0).sum()) / m.weight.numel() for n, m in layers.items()}


def run(bundle, cfg, calib=None, say=None):
    fam = bundle.family
    pruned = copy.deepcopy(bundle.transformer)
    layers, protected = prunable_linears(fam, pruned)
    per_layer = sparsify_(layers, cfg.sparsity, cfg.scope)
    n = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    plan = {
        "scope": cfg.scope, "target_sparsity": cfg.sparsity, "prunable_layers": len(layers),
        "prunable_weights": n, "zeroed_weights": zeros, "sparsity_prunable": zeros / max(n, 1),
        "protected_layers": protected,
        "per_layer_sparsity": {k: round(v, 4) for k, v in per_layer.items()},
    }
    return pruned, plan
