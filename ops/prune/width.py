"""width: structured pruning of attention heads, MLP hidden units and the model width, as Torch-Pruning splits it.

Why the model width goes too. diffusers builds every block of these families with width D = heads x head_dim
(DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel all take only
`num_attention_heads` and `attention_head_dim`), and the MLP with 4 x D hidden units. Removing heads alone
(D fixed) or MLP units alone cannot be written in their configs. So a config that diffusers can load fixes
everything from one number, the new head count h': width D' = h' x head_dim, MLP 4 x D', and every space
that has width D (the residual stream, the conditioning embeddings, the caption / context streams, the
embedders' hidden layers) shrinks to D'. `--ratio r` removes round(r x heads) heads in every attention.

Coupling: each family adapter's `width` (a WidthSpec of rules, formats/families/coupling.py) says which
state-dict tensor dimension belongs to which space ('D:' width D, 'H:' attention heads, 'F:' MLP units), with
chunked dimensions (adaLN's 6 x D modulation) handled as repeats.
Scoring: per channel, the L2 magnitude of every tensor slice that would go with it (each tensor normalized by
its mean so that large tensors do not dominate) -- or first-order Taylor, (sum of w * dL/dw)^2 on the
calibration set's denoising loss. Heads score as the sum of their channels. Policy: uniform (every block
keeps h' heads and 4 x D' units), because a diffusers config has one head count and one MLP width.
Surgery: tensors are sliced and the model is rebuilt from the rewritten config (rebuild.py).

One constraint is not a choice: DiT and PixArt do not store their 2-D sin-cos position table; diffusers
recomputes it for width D' on load. Their residual channels are therefore kept frequency-aligned with that
table (channel k of each sin/cos quarter of D' <- channel round(k x D/D') of D: exact when D/D' is an integer,
the nearest frequency otherwise), so the positions each kept channel carries stay (nearly) the same. SD3
stores its (cropped) table, and Flux uses rotary embeddings on the head dimension, so their residual channels
are chosen by importance like everything else.

This is hand-written coupling rather than Torch-Pruning's DependencyGraph: on these models the graph maps
PixArt's (6, D) scale-shift tables and its (B, 2, D) final modulation chunk to the wrong indices, and the
modules it shrinks are not what diffusers rebuilds from a config (head counts, sin-cos tables); slicing the
state dict and rebuilding from the config makes the pruned model the one that reloads, by construction.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ditkit.formats.errors import ConfigError, UnsupportedModelError
from ditkit.formats.families.coupling import WidthSpec

from .calibration import Calibration
from .rebuild import rebuild


# -- coupling ------------------------------------------------------------------------------------------

@dataclass
class Member:
    key: str
    dim: int
    spaces: tuple[str, ...]  # concatenated along `dim`; a single space may repeat (chunks)


def members(spec: WidthSpec, state: dict) -> list[Member]:
    compiled = [(re.compile(p), d, sp) for p, d, sp in spec.rules]
    out = []
    for key in state:
        for rx, dim, spaces in compiled:
            m = rx.search(key)
            if m is None:
                continue
            b = m.groupdict().get("b")
            out.append(Member(key, dim, tuple(s.replace("{b}", b) if b is not None else s for s in spaces)))
    return out


def space_sizes(spec: WidthSpec, tr) -> dict[str, int]:
    """Channels per space kind before pruning."""
    c = tr.config
    d = c.num_attention_heads * c.attention_head_dim
    return {"D": d, "H": d, "F": spec.mlp_mult * d}


def _segments(m: Member, dim_size: int, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
    """(space, chunks, channels per chunk) for each segment of the member's dimension."""
    if len(m.spaces) == 1:
        per = sizes[m.spaces[0][0]]
        if dim_size % per:
            raise UnsupportedModelError(f"{m.key}: dimension {m.dim} has {dim_size} channels, not a multiple of "
                                        f"{per}; width pruning supports only the standard layout of this family")
        return [(m.spaces[0], dim_size // per, per)]
    segs = [(s, 1, sizes[s[0]]) for s in m.spaces]
    if sum(per for _, _, per in segs) != dim_size:
        raise UnsupportedModelError(f"{m.key}: dimension {m.dim} has {dim_size} channels; expected "
                                    f"{sum(per for _, _, per in segs)}")
    return segs


# -- scoring -------------------------------------------------------------------------------------------

def channel_scores(state: dict, mems: list[Member], sizes: dict[str, int],
                   grads: dict | None = None) -> dict[str, torch.Tensor]:
    """Per space, a score per channel, summed over every tensor slice that goes with the channel.

    Magnitude: sum of squares of the slice, each tensor normalized by its mean channel score. Taylor (grads
    given): the signed sum of w * dL/dw (squared later, per channel or per head: the first-order loss change of
    removing the whole group).
    """
    scores: dict[str, torch.Tensor] = {}
    for m in mems:
        w = state[m.key].detach().float()
        g = None if grads is None else grads.get(m.key)
        if grads is not None and g is None:
            continue  # buffers (SD3's position table) carry no gradient
        t = (w * g.float()) if g is not None else w
        t = t.movedim(m.dim, 0).reshape(w.shape[m.dim], -1)
        start = 0
        for space, chunks, per in _segments(m, w.shape[m.dim], sizes):
            part = t[start:start + chunks * per].reshape(chunks, per, -1)
            start += chunks * per
            if g is not None:
                s = part.sum(dim=(0, 2))
            else:
                s = (part ** 2).sum(dim=(0, 2))
                s = s / s.mean().clamp_min(1e-30)
            scores[space] = scores.get(space, torch.zeros(per)) + s
    return scores


def taylor_grads(bundle, calib: Calibration) -> dict[str, torch.Tensor]:
    """dL/dw of the denoising loss against the trajectory-implied targets, summed over the calibration set."""
    fam, tr = bundle.family, bundle.transformer
    params = dict(tr.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    grads: dict[str, torch.Tensor] = {}
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for b in calib.batches:
                y = fam.predict(tr, b.latents, b.t, b.cond, calib.guidance).float()
                loss = ((y - b.target) ** 2).mean() / len(calib.batches)
                loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                grads[n] = p.grad.detach().clone()
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])
    return grads


def sincos_aligned(d: int, d_new: int) -> torch.Tensor:
    """Channels of a D-wide 2-D sin-cos table that reproduce the D'-wide one (nearest frequency per channel)."""
    q, q_new = d // 4, d_new // 4
    idx = [quarter * q + round(k * q / q_new) for quarter in range(4) for k in range(q_new)]
    return torch.tensor(idx, dtype=torch.long)


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


# -- surgery -------------------------------------------------------------------------------------------

def _index(segs, keep: dict[str, torch.Tensor], head_dim: int) -> torch.Tensor:
    idx, offset = [], 0
    for space, chunks, per in segs:
        k = keep[space]
        if space.startswith("H:"):  # head indices -> their channels
            k = (k[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
        for c in range(chunks):
            idx.append(k + offset + c * per)
        offset += chunks * per
    return torch.cat(idx)


def slice_state(state: dict, mems: list[Member], sizes: dict[str, int], keep: dict[str, torch.Tensor],
                head_dim: int) -> dict:
    sliced: dict[str, torch.Tensor] = {}
    for m in mems:
        w = sliced.get(m.key, state[m.key])
        idx = _index(_segments(m, state[m.key].shape[m.dim], sizes), keep, head_dim).to(w.device)
        sliced[m.key] = w.index_select(m.dim, idx)
    return {k: (sliced[k] if k in sliced else v.clone()).contiguous() for k, v in state.items()}


def new_heads(heads: int, ratio: float) -> int:
    h = heads - round(ratio * heads)
    if h < 1:
        raise ConfigError(f"--ratio {ratio} removes all {heads} heads; use a smaller --ratio")
    if h == heads:
        raise ConfigError(f"--ratio {ratio} removes no head of {heads}; raise it (one head is {1 / heads:.3f})")
    return h


def check(bundle, cfg) -> tuple[WidthSpec, int]:
    """(the family's spec, the new head count); rejects what cannot be width-pruned before any work."""
    fam, tr = bundle.family, bundle.transformer
    spec = fam.width
    why = fam.width_unsupported(tr)
    if spec is None:
        because = f": {why} are not supported" if why else ""
        raise UnsupportedModelError(f"width pruning does not support the {fam.name} family{because}; "
                                    "use --method depth")
    if why:
        raise UnsupportedModelError(f"width pruning of {fam.name}: {why} are not supported; use --method depth")
    heads, hd = tr.config.num_attention_heads, tr.config.attention_head_dim
    h_new = new_heads(heads, cfg.ratio)
    if spec.sincos_residual and (h_new * hd) % 4:
        raise ConfigError(f"--ratio {cfg.ratio}: width {h_new * hd} ({h_new} heads x {hd}) is not a multiple of 4, "
                          "which the sin-cos position table needs; choose another --ratio")
    return spec, h_new


def run(bundle, cfg, calib: Calibration, say=None):
    """(pruned transformer, plan)."""
    tr = bundle.transformer
    spec, h_new = check(bundle, cfg)
    heads, hd = tr.config.num_attention_heads, tr.config.attention_head_dim
    d, d_new = heads * hd, h_new * hd
    state = tr.state_dict()
    sizes = space_sizes(spec, tr)
    mult = spec.mlp_mult
    mems = members(spec, state)
    grads = taylor_grads(bundle, calib) if cfg.importance == "taylor" else None
    scores = channel_scores(state, mems, sizes, grads)
    target = {"D": d_new, "F": mult * d_new, "H": h_new}
    keep: dict[str, torch.Tensor] = {}
    for space, s in scores.items():
        kind = space[0]
        if kind == "H":
            s = s.reshape(heads, hd).sum(1)
        if grads is not None:
            s = s ** 2
        keep[space] = top(s, target[kind])
    if spec.sincos_residual:
        keep["D:res"] = sincos_aligned(d, d_new)
    updates = {"num_attention_heads": h_new, **spec.config(d_new)}
    pruned = rebuild(tr, updates, slice_state(state, mems, sizes, keep, hd))

    def removed(space, total):
        k = set(keep[space].tolist())
        return [i for i in range(total) if i not in k]

    plan = {
        "heads": [heads, h_new], "head_dim": hd, "width": [d, d_new], "mlp_hidden": [mult * d, mult * d_new],
        "importance": cfg.importance, "scope": "uniform",
        "residual_channels": "sin-cos frequency-aligned (position table recomputed on load)"
        if spec.sincos_residual else cfg.importance,
        "config": updates,
        "removed_heads": {s[2:]: removed(s, heads) for s in sorted(keep) if s.startswith("H:")},
        "removed_mlp_units": {s[2:]: removed(s, mult * d) for s in sorted(keep) if s.startswith("F:")},
        "removed_channels": {s[2:]: removed(s, d) for s in sorted(keep) if s.startswith("D:")},
    }
    return pruned, plan
