"""Which Linears a LoRA adapts, derived from module types (TARGETS), not from model ids."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ditkit.formats.errors import UnsupportedModelError
from ditkit.nn.quantized import KIND_ATTR, KINDS


def _attention_types() -> tuple[type, ...]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return (Attention, AttentionModuleMixin)


def _base(module: nn.Module) -> nn.Module:
    """The plain layer under a peft LoRA wrapper (or the module itself)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _is_linear(m: nn.Module) -> bool:
    """An nn.Linear, or a quantized module that replaced one (its adapter runs beside it: nn/quantized/lora.py)."""
    if isinstance(m, nn.Linear):
        return True
    kind = KINDS.get(getattr(m, KIND_ATTR, None) or "")
    return kind is not None and kind.source is nn.Linear


def linear_modules(tr: nn.Module) -> dict[str, tuple[int, int]]:
    """{name: (out_features, in_features)} of every Linear, quantized ones included (LoRA-wrapped ones by their
    own name)."""
    out = {}
    for name, m in tr.named_modules():
        if ".base_layer" in name or re.search(r"\.lora_[AB]\.", name + "."):
            continue
        b = _base(m)
        if _is_linear(b) and not name.endswith((".lora_A", ".lora_B")):
            out[name] = (b.out_features, b.in_features)
    return out


def _linears_under(tr: nn.Module, types: tuple[type, ...]) -> list[str]:
    lin = linear_modules(tr)
    owners = [n for n, m in tr.named_modules() if isinstance(m, types)]
    return [n for n in lin if any(n.startswith(o + ".") for o in owners)]


def attention_targets(family, tr) -> list[str]:
    return _linears_under(tr, _attention_types())


def mlp_targets(family, tr) -> list[str]:
    import diffusers.models.attention as attention

    # the family's MLP classes (Family.mlp_types: FeedForward, Lumina's LuminaFeedForward; Sana's MLP is
    # convolutions, so it has no Linear there)
    names = set(_linears_under(tr, tuple(getattr(attention, t) for t in family.mlp_types)))
    blocks = [f"{n}.{i}" for n, c in tr.named_children() if isinstance(c, nn.ModuleList) for i in range(len(c))]
    for n in linear_modules(tr):  # Linears a block owns directly (Flux single-stream proj_mlp / proj_out)
        parent = n.rsplit(".", 1)[0]
        if parent in blocks and not family.is_modulation(n):
            names.add(n)
    return sorted(names, key=list(linear_modules(tr)).index)


def modulation_targets(family, tr) -> list[str]:
    return [n for n in linear_modules(tr) if family.is_modulation(n)]


@dataclass(frozen=True)
class Target:
    help: str
    modules: Callable  # (family, transformer) -> module names


TARGETS: dict[str, Target] = {
    "attention": Target("q/k/v/out projections of every attention (self, cross, joint)", attention_targets),
    "mlp": Target("feed-forward Linears of every block", mlp_targets),
    "modulation": Target("adaLN modulation Linears (the family's modulation layers)", modulation_targets),
}


def resolve_targets(family, tr, targets) -> list[str]:
    names: list[str] = []
    for t in targets:
        found = TARGETS[t].modules(family, tr)
        if not found:
            raise UnsupportedModelError(f"--targets {t}: this {family.name} transformer has no such layers; "
                                        f"choose among: {', '.join(TARGETS)}")
        names += [n for n in found if n not in names]
    return names
