"""depth: remove whole transformer blocks, chosen by their measured effect on the output (LD-Pruner).

Scoring (one shot): each candidate block is taken out alone and the transformer's output over the calibration
set is compared with the base's (relative MSE); the blocks whose removal moves the output least go. Surgery:
the state dict loses those blocks, the rest are renumbered, and the depth field(s) of the config are rewritten,
so diffusers (DiTPipeline.from_pretrained included) builds the shallower model from the config alone.
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from ditkit.formats.errors import ConfigError

from .calibration import Calibration, output_error
from .rebuild import rebuild


def block_names(family, tr) -> list[str]:
    """Every block as 'attr.i', in execution order (what --blocks indexes); the family's `stacks` say where."""
    return [f"{s.attr}.{i}" for s in family.stacks for i in range(len(getattr(tr, s.attr)))]


def protected(family, tr) -> set[str]:
    out = set()
    for s in family.stacks:
        n = len(getattr(tr, s.attr))
        if s.keep_last and n:
            out.add(f"{s.attr}.{n - 1}")
    return out


def _without(tr, family, removed: set[str], replay: dict[str, nn.Module] | None = None):
    """Context: the transformer runs with the `removed` blocks taken out of its ModuleLists (and the blocks named
    in `replay` swapped for those stand-ins)."""
    replay = replay or {}

    class _Ctx:
        def __enter__(self):
            self.saved = {}
            for s in family.stacks:
                blocks = getattr(tr, s.attr)
                self.saved[s.attr] = blocks
                setattr(tr, s.attr, nn.ModuleList([replay.get(f"{s.attr}.{i}", b) for i, b in enumerate(blocks)
                                                   if f"{s.attr}.{i}" not in removed]))

        def __exit__(self, *exc):
            for attr, blocks in self.saved.items():
                setattr(tr, attr, blocks)

    return _Ctx()


# base block outputs kept while scoring: DiT-XL/2's 28 at the default calibration (3 x 8 rows) take 0.8 GB
CACHE_BYTES = 2 * 2**30


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0


class _Prefix:
    """The base's output of each of its first `depth` blocks (execution order) on every calibration batch.

    With block k removed, blocks 0..k-1 still compute exactly what they compute in the base, so scoring
    replays their outputs instead of recomputing them: about half the block calls of scoring every block
    (the result is the same, bit for bit). Blocks are kept in order while they fit in `budget` bytes."""

    def __init__(self, family, tr, calib: Calibration, names: list[str], budget: int | None = None):
        self.batch = 0
        self.outputs: list[list] = []
        self.blocks = blocks = [blk for s in family.stacks for blk in getattr(tr, s.attr)]
        per_batch = (CACHE_BYTES if budget is None else budget) // max(len(calib.batches), 1)
        self.depth = len(names)
        for b in calib.batches:
            outs: list = []
            used = 0

            def keep(j):
                def hook(module, args, out):
                    nonlocal used
                    if j == len(outs) and used + _nbytes(out) <= per_batch:
                        outs.append(out)
                        used += _nbytes(out)
                return hook

            handles = [blk.register_forward_hook(keep(j)) for j, blk in enumerate(blocks)]
            try:
                with torch.no_grad():
                    family.predict(tr, b.latents, b.t, b.cond, calib.guidance)
            finally:
                for h in handles:
                    h.remove()
            self.outputs.append(outs)
            self.depth = min(self.depth, len(outs))
        self.outputs = [outs[:self.depth] for outs in self.outputs]
        self.bytes = sum(_nbytes(o) for outs in self.outputs for o in outs)

    @contextlib.contextmanager
    def on_batch(self, i: int):
        self.batch = i
        yield

    def stand_ins(self, names: list[str], k: int) -> dict[str, nn.Module]:
        """Replays for the blocks before block k (as far as they are kept)."""
        return {names[j]: _Replay(self, j, self.blocks[j]) for j in range(min(k, self.depth))}


class _Replay(nn.Module):
    """Stands in for an unchanged block: returns the base's output of that block on the current batch. Other
    attributes are the block's own (DiT's final layer reads `transformer_blocks[0].norm1.emb`)."""

    def __init__(self, prefix: _Prefix, j: int, block: nn.Module):
        super().__init__()
        self.prefix, self.j, self.block = prefix, j, block

    def forward(self, *args, **kwargs):
        return self.prefix.outputs[self.prefix.batch][self.j]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)


def score_blocks(family, tr, calib: Calibration, candidates: list[str], say=None) -> dict[str, float]:
    """Relative output MSE with each candidate block removed alone (higher = more important)."""
    names = block_names(family, tr)
    prefix = _Prefix(family, tr, calib, names)
    if say is not None:
        say(f"scoring {len(candidates)} blocks; the base's outputs of its first {prefix.depth} blocks are replayed "
            f"({prefix.bytes / 2**20:.0f} MiB), not recomputed")
    scores = {}
    for i, name in enumerate(candidates):
        with _without(tr, family, {name}, prefix.stand_ins(names, names.index(name))):
            scores[name] = output_error(family, tr, calib, around=prefix.on_batch)["rel_mse"]
        if say is not None:
            say(f"scored {name} ({i + 1}/{len(candidates)}): output rel. MSE {scores[name]:.4g} without it")
    return scores


def choose(cfg, names: list[str], keep_fixed: set[str]) -> int | None:
    """How many blocks to remove (None when --blocks names them)."""
    total = len(names)
    if cfg.blocks is not None:
        return None
    if cfg.keep is not None:
        if not 1 <= cfg.keep <= total:
            raise ConfigError(f"--keep {cfg.keep} is out of range: this model has {total} blocks (keep 1..{total})")
        n = total - cfg.keep
    else:
        n = round(cfg.ratio * total)
    n = min(n, total - max(1, len(keep_fixed)))
    if n < 1:
        raise ConfigError(f"--ratio {cfg.ratio} removes no block of {total}; raise it (or use --keep / --blocks)")
    return n


def pick_by_hand(cfg, names: list[str], fixed: set[str]) -> list[str]:
    bad = [i for i in cfg.blocks if not 0 <= i < len(names)]
    if bad:
        raise ConfigError(f"--blocks {bad} out of range: this model has blocks 0..{len(names) - 1}")
    chosen = [names[i] for i in sorted(set(cfg.blocks))]
    if fixed & set(chosen):
        raise ConfigError(f"--blocks: {sorted(fixed & set(chosen))} cannot be removed (built differently from the "
                          "others); choose other blocks")
    if len(chosen) >= len(names):
        raise ConfigError("--blocks names every block; keep at least one")
    return chosen


def remove_blocks(family, tr, removed: list[str]) -> nn.Module:
    """The transformer without `removed`, rebuilt from a config with the new depth(s)."""
    stacks = family.stacks
    gone = set(removed)
    renumber: dict[str, dict[int, int]] = {}
    updates = {}
    for s in stacks:
        kept = [i for i in range(len(getattr(tr, s.attr))) if f"{s.attr}.{i}" not in gone]
        renumber[s.attr] = {old: new for new, old in enumerate(kept)}
        updates[s.config_key] = len(kept)
    updates.update(family.depth_config(tr, renumber))  # SD3.5's dual_attention_layers follow their blocks
    state = {}
    pattern = re.compile(r"^(" + "|".join(re.escape(s.attr) for s in stacks) + r")\.(\d+)\.(.*)$")
    for k, v in tr.state_dict().items():
        m = pattern.match(k)
        if m is None:
            state[k] = v.clone()
            continue
        attr, i, rest = m.group(1), int(m.group(2)), m.group(3)
        if i in renumber[attr]:
            state[f"{attr}.{renumber[attr][i]}.{rest}"] = v.clone()
    return rebuild(tr, updates, state)


def check(bundle, cfg) -> None:
    """Reject impossible requests before any calibration work."""
    fam, tr = bundle.family, bundle.transformer
    names, fixed = block_names(fam, tr), protected(fam, tr)
    if choose(cfg, names, fixed) is None:
        pick_by_hand(cfg, names, fixed)


def run(bundle, cfg, calib: Calibration, say=None):
    """(pruned transformer, plan)."""
    fam, tr = bundle.family, bundle.transformer
    names = block_names(fam, tr)
    fixed = protected(fam, tr)
    candidates = [n for n in names if n not in fixed]
    n_remove = choose(cfg, names, fixed)
    scores = {}
    if n_remove is None:
        removed = pick_by_hand(cfg, names, fixed)
        criterion = "by hand (--blocks)"
    else:
        scores = score_blocks(fam, tr, calib, candidates, say)
        removed = sorted(sorted(candidates, key=lambda n: (scores[n], names.index(n)))[:n_remove], key=names.index)
        criterion = "calibration output rel. MSE with the block removed alone (LD-Pruner), lowest removed"
    pruned = remove_blocks(fam, tr, removed)
    plan = {
        "blocks_before": len(names), "blocks_after": len(names) - len(removed),
        "removed_blocks": removed, "removed_indices": [names.index(n) for n in removed],
        "kept_blocks": [n for n in names if n not in removed], "protected": sorted(fixed),
        "criterion": criterion, "scores": {k: (None if v is None else round(v, 6)) for k, v in scores.items()},
        "config": {s.config_key: pruned.config[s.config_key] for s in fam.stacks},
    }
    return pruned, plan
