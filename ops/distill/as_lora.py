"""distill --as-lora: the few-step student as a LoRA over its base (how Hyper-SD, TDD and the Turbo/Flash LoRAs ship).

The student trains with only its Linear weights free (biases, norms, embeddings and convolutions stay the
base's), so the whole difference between student and base lives in the Linears a LoRA can carry. After
training, each Linear's weight delta D = W_student - W_base is cut to rank R by truncated SVD (Eckart-Young:
the best rank-R approximation in Frobenius norm), split evenly between the factors:

    D ~ B A,  B = U_R sqrt(S_R)  (out, R),  A = sqrt(S_R) V_R^T  (R, in),  alpha = R (scale 1)

and the relative error ||D - B A||_F / ||D||_F is reported per module and over all of them. The adapter
carries the student's sampling settings in its `ditkit_lora` metadata (`sampler_defaults`: sampler, steps,
guidance; `scheduler`: the student's scheduler class and config), so `generate BASE --lora FILE` samples as
the student does (ops.lora.adapters.apply_lora reads them; explicit --steps / --sampler / --guidance win).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ditkit.formats.lora import Adapter
from ditkit.ops.lora.targets import linear_modules


def train_linear_weights_only(tr: nn.Module) -> int:
    """Freeze everything but the weights of the Linear layers (what a LoRA can carry); returns their count."""
    tr.requires_grad_(False)
    n = 0
    for name in linear_modules(tr):
        w = tr.get_submodule(name).weight
        w.requires_grad_(True)
        n += w.numel()
    return n


@torch.no_grad()
def delta_adapter(base: nn.Module, student: nn.Module, rank: int, **adapter_kw) -> tuple[Adapter, dict]:
    """The rank-`rank` LoRA whose product approximates student - base on every Linear that changed, and its
    report: relative Frobenius error overall and worst, and the largest relative change outside the Linears'
    weights (0 when the student trained with train_linear_weights_only)."""
    A, B, errors = {}, {}, {}
    err2 = total2 = 0.0
    base_sd = dict(base.named_parameters())
    linear_weights = set()
    for name in linear_modules(base):
        linear_weights.add(f"{name}.weight")
        wb = base.get_submodule(name).weight.double().cpu()
        ws = student.get_submodule(name).weight.double().cpu()
        d = ws - wb
        norm2 = float((d * d).sum())
        if norm2 == 0.0:
            continue  # unchanged: the adapter leaves it out
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        b = torch.zeros(d.shape[0], rank, dtype=torch.float64)
        a = torch.zeros(rank, d.shape[1], dtype=torch.float64)
        b[:, :r], a[:r] = u[:, :r] * root, root[:, None] * vh[:r]
        B[name], A[name] = b.float().contiguous(), a.float().contiguous()
        rest2 = float((s[r:] ** 2).sum())
        errors[name] = math.sqrt(rest2 / norm2)
        err2 += rest2
        total2 += norm2
    outside = {}
    for n, p in student.named_parameters():
        if n in linear_weights or n not in base_sd:
            continue
        q = base_sd[n].detach().double().cpu()
        diff = float((p.detach().double().cpu() - q).norm())
        if diff:
            outside[n] = diff / max(float(q.norm()), 1e-12)
    worst = max(errors, key=errors.get) if errors else None
    report = {"rank": rank, "modules": len(A), "params": sum(t.numel() for t in A.values()) + sum(
              t.numel() for t in B.values()),
              "relative_error": round(math.sqrt(err2 / total2), 6) if total2 else 0.0,
              "worst_module": worst, "worst_relative_error": round(errors[worst], 6) if worst else 0.0,
              "outside_linears_max_relative_change": round(max(outside.values()), 6) if outside else 0.0,
              "outside_linears_changed": len(outside)}
    return Adapter(A=A, B=B, rank=rank, alpha=float(rank), **adapter_kw), report


def sampling_info(defaults: dict, scheduler) -> dict:
    """What the adapter's metadata carries so that generate samples base + adapter as the student."""
    keep = {k: defaults[k] for k in ("sampler", "steps", "guidance") if k in defaults}
    info = {"sampler_defaults": keep}
    if scheduler is not None:
        config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        info["scheduler"] = {"class": type(scheduler).__name__, "config": config}
    return info
