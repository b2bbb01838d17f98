"""The model authors' key layouts for Flux (Black Forest Labs) and SD3 (Stability), mapped to and from diffusers.

One table per family: a regex over diffusers keys -> the original key and the diffusers key's place in it.
Original tensors that diffusers splits (Flux's `img_attn.qkv`, `single_blocks.N.linear1` = q, k, v, mlp;
SD3's `x_block.attn.qkv`) are the diffusers pieces concatenated on dim 0 in the table's order; the final
adaLN projections are stored (shift, scale) where diffusers stores (scale, shift), as diffusers' own
converters (`convert_flux_transformer_checkpoint_to_diffusers`, `convert_sd3_transformer_checkpoint_to_diffusers`)
undo. Mapping back splits each original tensor by the diffusers model's own shapes, so it holds at any width
(diffusers' Flux converter hard-codes width 3072).

    to_original(family, state) -> state in the authors' keys (no `model.diffusion_model.` prefix)
    from_original(family, state, shapes) -> state in diffusers keys; shapes: diffusers key -> shape
"""
from __future__ import annotations

import re

import torch

from .errors import FormatError

from .families import FAMILIES
from .families.keys import SWAP


PREFIX = "model.diffusion_model."


def _layout(family: str, layout: tuple | None = None) -> tuple[str, list] | None:
    """(layout name, key table) of a family with an original single-file layout (its adapter says), else None;
    `layout` given: that table (an authors' layout the family does not write into GGUF, e.g. PixArt's)."""
    if layout is not None:
        return layout
    fam = FAMILIES.get(family)
    return fam.original_layout if fam is not None else None


def has_original_layout(family: str) -> bool:
    return _layout(family) is not None


def layout_name(family: str, default: str = "diffusers", layout: tuple | None = None) -> str:
    lay = _layout(family, layout)
    return lay[0] if lay else default


def _plan(family: str, keys, layout: tuple | None = None) -> dict[str, list[tuple[object, str]]]:
    """original key -> [(part, diffusers key)] in concatenation order."""
    keys = set(keys)
    table = [(re.compile(rx), tmpl, part) for rx, tmpl, part in _layout(family, layout)[1]]
    plan: dict[str, list[tuple[object, str]]] = {}
    for k in sorted(keys):
        for rx, tmpl, part in table:
            m = rx.match(k)
            if m is None:
                continue
            if part == "swap-if-last":  # the last SD3 block has no context feed-forward
                part = SWAP if f"transformer_blocks.{m.group(1)}.ff_context.net.2.weight" not in keys else None
            plan.setdefault(m.expand(tmpl), []).append((part, k))
            break
        else:
            raise FormatError(f"the {family} key {k!r} has no place in the {layout_name(family, layout=layout)} layout; "
                              "export it with --format safetensors or diffusers")
    for group in plan.values():
        group.sort(key=lambda pk: pk[0] if isinstance(pk[0], int) else -1)
    return plan


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_original(family: str, state: dict[str, torch.Tensor], layout: tuple | None = None) -> dict[str, torch.Tensor]:
    """diffusers keys -> the authors' keys (Flux: BFL, SD3: Stability; `layout`: another table)."""
    out = {}
    for okey, group in _plan(family, state, layout).items():
        if len(group) > 1:
            out[okey] = torch.cat([state[k] for _, k in group], dim=0)
        else:
            part, k = group[0]
            out[okey] = _swap(state[k]) if part == SWAP else state[k]
    return out


def from_original(family: str, state: dict[str, torch.Tensor], shapes: dict[str, tuple],
                  layout: tuple | None = None) -> dict[str, torch.Tensor]:
    """The authors' keys -> diffusers keys, split by `shapes` (the diffusers model's state-dict shapes)."""
    state = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in state.items()}
    plan = _plan(family, shapes, layout)
    missing = [k for k in plan if k not in state]
    unexpected = [k for k in state if k not in plan]
    if missing or unexpected:
        raise FormatError(f"weights do not match the {family} config in the {layout_name(family, layout=layout)} layout "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")
    out = {}
    for okey, group in plan.items():
        t = state[okey]
        if len(group) > 1:
            sizes = [shapes[k][0] for _, k in group]
            if sum(sizes) != t.shape[0]:
                raise FormatError(f"{okey} has {t.shape[0]} rows where the config needs {sum(sizes)}")
            for (_, k), piece in zip(group, torch.split(t, sizes, dim=0)):
                out[k] = piece
        else:
            part, k = group[0]
            out[k] = _swap(t) if part == SWAP else t
    return out


def module_groups(family: str, modules, layout: tuple | None = None) -> dict[str, list[tuple[object, str]]]:
    """original module -> [(part, diffusers module)] for the Linear modules `modules` of a model (foreign LoRA
    files name the authors' modules: one fused original module is several diffusers ones, split by rows)."""
    plan = _plan(family, [f"{m}.weight" for m in modules], layout)
    return {o[:-len(".weight")]: [(p, k[:-len(".weight")]) for p, k in g] for o, g in plan.items()
            if o.endswith(".weight")}
