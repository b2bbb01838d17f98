"""width: structured pruning of attention heads, MLP hidden units and the model width, as Torch-Pruning splits it.

Why the model width goes too. diffusers builds every block of these families with width D = heads x head_dim
(DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel all take only
`num_attention_heads` and `attention_head_dim`), and the MLP with 4 x D hidden units. Removing heads alone
(D fixed) or MLP units alone cannot be written in their configs. So a config that diffusers can load fixes
everything from one number, the new head count h': width D' = h' x head_dim, MLP 4 x D', and every space
that has width D (the residual stream, the conditioning embeddings, the caption / context streams, the
embedders' hidden layers) shrinks to D'. `--ratio r` removes round(r x heads) heads in every attention.

Policy: uniform (every block keeps h' heads and 4 x D' units), because a diffusers config has one head count
and one MLP width; heads score as the sum of their channels' importance.

One constraint is not a choice: DiT and PixArt do not store their 2-D sin-cos position table; diffusers
recomputes it for width D' on load. Their residual channels are therefore kept frequency-aligned with that
table (channel k of each sin/cos quarter of D' <- channel round(k x D/D') of D: exact when D/D' is an integer,
the nearest frequency otherwise), so the positions each kept channel carries stay (nearly) the same. SD3
stores its (cropped) table, and Flux uses rotary embeddings on the head dimension, so their residual channels
are chosen by importance like everything else.

Coupling and scoring are Torch-Pruning's: ops/prune/graph.py traces the real diffusers module with its
DependencyGraph (the family adapter declares only what the graph cannot infer: unwrapped parameters and
their pruning dim, ignored layers, parameters on a fixed axis) and each group is scored with a Torch-Pruning
importance criterion (`--importance`: magnitude = GroupMagnitudeImportance, taylor = GroupTaylorImportance,
hessian = GroupHessianImportance (OBD), lamp = LAMPImportance; group reduction "mean"; per-group normalizer
"mean", LAMP's own for lamp). Taylor and Hessian take their gradients from the calibration set's denoising
loss. ditkit keeps the plan (one head count, MLP 4 x D', residual width D', sin-cos alignment) and the
surgery: slicing the state dict and rebuilding from the rewritten config makes the pruned model the one that
reloads, by construction.

Families whose WidthSpec is `mlp_only` (Lumina-Next, Lumina 2, Sana) have configs that write the MLP width
beside D (ffn_dim_multiplier, a float mlp_ratio) but tie head_dim to D: there `--ratio r` removes round(r x h) of
the h MLP hidden units of every MLP (rounded down to what the config writes, `Family.mlp_multiple`), heads and
D stay, and `Family.mlp_config` rewrites the config (`run_mlp`).
"""
from __future__ import annotations

import torch
import torch_pruning as tp

from ditkit.formats.errors import ConfigError, UnsupportedModelError

from . import graph
from .calibration import Calibration
from .rebuild import rebuild


def _criterion(name: str):
    imp = tp.importance
    return {"magnitude": lambda: imp.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean"),
            "taylor": lambda: imp.GroupTaylorImportance(group_reduction="mean", normalizer="mean"),
            "hessian": lambda: imp.GroupHessianImportance(group_reduction="mean", normalizer="mean"),
            "lamp": lambda: imp.LAMPImportance(p=2, group_reduction="mean", normalizer="lamp")}[name]()


def _losses(bundle, calib: Calibration):
    """The denoising loss of each calibration batch against the trajectory-implied targets."""
    fam, tr = bundle.family, bundle.transformer
    for b in calib.batches:
        y = fam.predict(tr, b.latents, b.t, b.cond, calib.guidance).float()
        yield ((y - b.target) ** 2).mean() / len(calib.batches)


def _scorer(bundle, calib: Calibration, name: str):
    """The Torch-Pruning criterion, with the gradients it needs in place (.grad: taylor; accumulated squared
    gradients: hessian). Returns (scorer, cleanup)."""
    tr = bundle.transformer
    scorer = _criterion(name)
    params = dict(tr.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}

    def cleanup():
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])

    if name not in ("taylor", "hessian"):
        return scorer, cleanup
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    with torch.enable_grad():
        if name == "taylor":
            for loss in _losses(bundle, calib):
                loss.backward()
        else:
            # squared gradients of each calibration batch, summed (Fisher / OBD). Filled here rather than with
            # scorer.accumulate_grad: in 1.6.1 it checks names but keys by parameter, so it keeps the last
            # batch only.
            scorer.zero_grad()
            for loss in _losses(bundle, calib):
                for p in params.values():
                    p.grad = None
                loss.backward()
                for p in params.values():
                    if p.grad is not None:
                        g2 = p.grad.detach().pow(2)
                        scorer._accu_grad[p] = scorer._accu_grad.get(p, 0) + g2
                        scorer._counter[p] = scorer._counter.get(p, 0) + 1
    return scorer, cleanup


def sincos_aligned(d: int, d_new: int) -> torch.Tensor:
    """Channels of a D-wide 2-D sin-cos table that reproduce the D'-wide one (nearest frequency per channel)."""
    q, q_new = d // 4, d_new // 4
    idx = [quarter * q + round(k * q / q_new) for quarter in range(4) for k in range(q_new)]
    return torch.tensor(idx, dtype=torch.long)


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def slice_state(state: dict, spaces: list, keep: dict[str, torch.Tensor]) -> dict:
    """Every tensor a space touches, cut to the kept channels of each space along that dim (ascending)."""
    idx: dict[tuple[str, int], list[torch.Tensor]] = {}
    for s in spaces:
        for key, m in s.members.items():
            idx.setdefault(key, []).append(m[keep[s.name]].reshape(-1))
    sliced = {k: v for k, v in state.items()}
    for (k, dim), parts in sorted(idx.items()):
        w = sliced[k]
        sliced[k] = w.index_select(dim, torch.cat(parts).sort().values.to(w.device))
    return {k: (v if k in {key for key, _ in idx} else v.clone()).contiguous() for k, v in sliced.items()}


def new_heads(heads: int, ratio: float) -> int:
    h = heads - round(ratio * heads)
    if h < 1:
        raise ConfigError(f"--ratio {ratio} removes all {heads} heads; use a smaller --ratio")
    if h == heads:
        raise ConfigError(f"--ratio {ratio} removes no head of {heads}; raise it (one head is {1 / heads:.3f})")
    return h


def new_mlp(fam, tr, ratio: float) -> int:
    """MLP-only width pruning: the hidden units each MLP keeps (a multiple of what the config can write)."""
    f, m = fam.mlp_hidden(tr), fam.mlp_multiple(tr)
    f_new = (f - round(ratio * f)) // m * m
    if f_new < m:
        raise ConfigError(f"--ratio {ratio} removes all {f} MLP hidden units; use a smaller --ratio")
    if f_new == f:
        raise ConfigError(f"--ratio {ratio} removes no MLP hidden unit of {f} (the config writes multiples of {m}); "
                          "raise it")
    fam.mlp_config(tr, f_new)  # a width the config cannot write raises here, before any work
    return f_new


def check(bundle, cfg):
    """(the family's spec, the new head count, or the new MLP width of an mlp_only family); rejects what cannot
    be width-pruned before any work."""
    fam, tr = bundle.family, bundle.transformer
    spec = fam.width
    why = fam.width_unsupported(tr)
    if spec is None:
        because = f": {why} are not supported" if why else ""
        raise UnsupportedModelError(f"width pruning does not support the {fam.name} family{because}; "
                                    "use --method depth")
    if why:
        raise UnsupportedModelError(f"width pruning of {fam.name}: {why} are not supported; use --method depth")
    if spec.mlp_only is not None:
        return spec, new_mlp(fam, tr, cfg.ratio)
    heads, hd = tr.config.num_attention_heads, tr.config.attention_head_dim
    h_new = new_heads(heads, cfg.ratio)
    if spec.sincos_residual and (h_new * hd) % 4:
        raise ConfigError(f"--ratio {cfg.ratio}: width {h_new * hd} ({h_new} heads x {hd}) is not a multiple of 4, "
                          "which the sin-cos position table needs; choose another --ratio")
    return spec, h_new


def _label(s) -> str:
    """A space's name in the plan: the attention / MLP / width space by the module it is rooted at."""
    name = s.name[2:]
    if s.kind == "H":
        return name.rpartition(".")[0]  # the attention module
    return name


def _scored(bundle, cfg, calib, say):
    fam, tr = bundle.family, bundle.transformer
    if say:
        say("width: tracing the dependency graph (torch-pruning)")
    spaces = graph.spaces(fam, tr)
    graph.check_cover(spaces, tr.state_dict())
    scorer, cleanup = _scorer(bundle, calib, cfg.importance)
    try:
        scores = {s.name: scorer(s.group) for s in spaces}
    finally:
        cleanup()
    return spaces, {n: sc.detach().float().cpu() for n, sc in scores.items() if sc is not None}


def run_mlp(bundle, cfg, calib: Calibration, say=None):
    """MLP-only width pruning (WidthSpec.mlp_only): every MLP keeps the same f' hidden units, by importance;
    heads and the width D stay. (pruned transformer, plan)."""
    fam, tr = bundle.family, bundle.transformer
    spec, f_new = check(bundle, cfg)
    f, d = fam.mlp_hidden(tr), fam.hidden_size(tr)
    spaces, scores = _scored(bundle, cfg, calib, say)
    if not spaces:
        raise UnsupportedModelError(f"width pruning of {fam.name}: the dependency graph found no MLP of {f} units")
    keep = {s.name: top(scores.get(s.name, torch.zeros(s.size)), f_new) for s in spaces}
    updates = fam.mlp_config(tr, f_new)
    pruned = rebuild(tr, updates, slice_state(tr.state_dict(), spaces, keep))
    heads = tr.config.num_attention_heads
    plan = {
        "heads": [heads, heads], "head_dim": d // heads, "width": [d, d], "mlp_hidden": [f, f_new],
        "importance": cfg.importance, "scope": "uniform", "cut": f"MLP hidden units only: {spec.mlp_only}",
        "coupling": f"torch-pruning DependencyGraph, {len(spaces)} groups", "config": updates,
        "removed_heads": {}, "removed_channels": {},
        "removed_mlp_units": {_label(s): [i for i in range(s.size) if i not in set(keep[s.name].tolist())]
                              for s in spaces},
    }
    return pruned, plan


def run(bundle, cfg, calib: Calibration, say=None):
    """(pruned transformer, plan)."""
    fam, tr = bundle.family, bundle.transformer
    if fam.width is not None and fam.width.mlp_only is not None:
        return run_mlp(bundle, cfg, calib, say)
    spec, h_new = check(bundle, cfg)
    heads, hd = tr.config.num_attention_heads, tr.config.attention_head_dim
    d, d_new = heads * hd, h_new * hd
    mult = spec.mlp_mult
    state = tr.state_dict()
    if say:
        say("width: tracing the dependency graph (torch-pruning)")
    spaces = graph.spaces(fam, tr)
    graph.check_cover(spaces, state)
    scorer, cleanup = _scorer(bundle, calib, cfg.importance)
    try:
        scores = {s.name: scorer(s.group) for s in spaces}
    finally:
        cleanup()
    residual = next((s.name for s in spaces if (f"{spec.patch_embed}.weight", 0) in s.members), None)
    keep: dict[str, torch.Tensor] = {}
    for s in spaces:
        sc = scores[s.name]
        if sc is None:
            sc = torch.zeros(s.size)
        sc = sc.detach().float().cpu()
        if s.kind == "H":
            keep[s.name] = graph.head_channels(top(sc.reshape(heads, hd).sum(1), h_new), hd)
        else:
            keep[s.name] = top(sc, {"D": d_new, "F": mult * d_new}[s.kind])
    if spec.sincos_residual:
        if residual is None:
            raise UnsupportedModelError(f"width pruning of {fam.name}: no group holds {spec.patch_embed}'s outputs")
        keep[residual] = sincos_aligned(d, d_new)
    updates = {"num_attention_heads": h_new, **spec.config(d_new)}
    pruned = rebuild(tr, updates, slice_state(state, spaces, keep))

    def removed(s):
        k = set(keep[s.name].tolist())
        gone = [i for i in range(s.size) if i not in k]
        return sorted({i // hd for i in gone}) if s.kind == "H" else gone

    plan = {
        "heads": [heads, h_new], "head_dim": hd, "width": [d, d_new], "mlp_hidden": [mult * d, mult * d_new],
        "importance": cfg.importance, "scope": "uniform", "coupling": f"torch-pruning DependencyGraph, {len(spaces)} groups",
        "residual_channels": "sin-cos frequency-aligned (position table recomputed on load)"
        if spec.sincos_residual else cfg.importance,
        "config": updates,
        "removed_heads": {_label(s): removed(s) for s in spaces if s.kind == "H"},
        "removed_mlp_units": {_label(s): removed(s) for s in spaces if s.kind == "F"},
        "removed_channels": {("res" if s.name == residual else _label(s)): removed(s) for s in spaces if s.kind == "D"},
    }
    return pruned, plan
