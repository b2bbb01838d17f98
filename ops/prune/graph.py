"""The coupling of width pruning, found by Torch-Pruning's DependencyGraph on the real diffusers module.

`spaces(family, transformer)` traces one forward call (the family's own `predict` on its dummy inputs) with
`torch_pruning.DependencyGraph`, takes every pruning group it finds (`get_all_groups`, the family's
`ignored` layers left out), roots each at a module whose output channels are the group's channels one to one,
and turns it into a `Space`: the state-dict tensors and dimensions that go with each channel, with the index
map the graph worked out (adaLN's 6 x D chunks, Flux's cat(attention, MLP) projection included). A space is
'H' (attention heads: the q / k / v outputs of an attention module), 'F' (MLP units: mlp_mult x D channels)
or 'D' (width D: the residual stream and every space as wide as it).

What the library is told, because it cannot infer it:
- the family's `unwrapped` parameters with their pruning dimension (PixArt's (6, D) / (2, D) scale-shift
  tables: dim 1; SD3's stored position table, a buffer, which is traced as a parameter: dim 2);
- `ignored` layers (the final projection, whose outputs are the latent channels);
- the token-major layout. Torch-Pruning takes dim 1 as the channel dimension of cat / split / slice (the CNN
  convention); these transformers hold (B, tokens, D) and (B, tokens, heads, head_dim) tensors, so a cat of
  text and image tokens (Flux, SD3's joint attention), a chunk of PixArt's (B, 6, D) modulation along its
  chunk axis, or a crop of SD3's position table would be read as a channel split and mapped to the wrong
  indices. `TokenGraph` treats such ops, on any axis but the last of a 3-D or larger tensor, as elementwise
  in channel space, and maps a (B, n x D) -> (B, n, D) view (PixArt's modulation) chunk-major. A split on
  dim 1 of a convolution's (B, C, H, W) output is a channel split and stays Torch-Pruning's (Sana's GLUMBConv
  chunks its depthwise conv's 2 x h channels into value and gate); such a group has no output side with its
  channels one to one, so it is rooted at the pointwise conv's inputs.
Families whose WidthSpec is `mlp_only` get their MLP groups only ('F'); the other groups are not read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency.index_mapping import _ConcatIndexMapping
from torch_pruning import ops as tpops
from torch_pruning.pruner import function as tpf

from ditkit.formats.errors import UnsupportedModelError

_TOKEN_OPS = (tpops.OPTYPE.CONCAT, tpops.OPTYPE.SPLIT, tpops.OPTYPE.UNBIND, tpops.OPTYPE.SLICE)


def _saved_dim(grad_fn, rank: int) -> int | None:
    d = getattr(grad_fn, "_saved_dim", None)
    if d is None:
        return None
    d = d - 2 ** 64 if d >= 2 ** 63 else d  # autograd stores a negative dim as an unsigned int
    return d % rank


def _in_shape(grad_fn):
    for attr in ("_saved_self_sym_sizes", "_saved_self_sizes"):
        s = getattr(grad_fn, attr, None)
        if s is not None:
            return tuple(s)
    return None


def _conv_channel_split(grad_fn, shape) -> bool:
    """A split / slice on dim 1 of a 4-D tensor a convolution made: channels in the CNN layout, which
    Torch-Pruning maps itself."""
    if len(shape) != 4 or _saved_dim(grad_fn, 4) != 1:
        return False
    nxt = [f for f, _ in getattr(grad_fn, "next_functions", ()) if f is not None]
    return bool(nxt) and nxt[0].name().startswith("ConvolutionBackward")


def _out_shape(grad_fn):
    meta = getattr(grad_fn, "_input_metadata", None)
    return tuple(meta[0].shape) if meta else None


class _ChunkMapping:
    """(..., n x D) <-> (..., n, D): channel k of D is channels k, D + k, ... of n x D."""

    def __init__(self, n: int, d: int, expand: bool):
        self.n, self.d, self.expand = n, d, expand

    def __call__(self, idxs):
        if self.expand:
            return [_helpers._HybridIndex(idx=i.idx + j * self.d, root_idx=i.root_idx) for j in range(self.n)
                    for i in idxs]
        return list({_helpers._HybridIndex(idx=i.idx % self.d, root_idx=i.root_idx) for i in idxs})


class TokenGraph(tp.DependencyGraph):
    """Torch-Pruning's DependencyGraph for token-major transformers (features on the last axis)."""

    def _trace(self, model, example_inputs, forward_fn, output_transform):
        module2node = super()._trace(model, example_inputs, forward_fn, output_transform)
        for node in list(module2node.values()):
            if node.type not in _TOKEN_OPS:
                continue
            g = node.grad_fn
            shape = _in_shape(g) or _out_shape(g)
            if shape is None or len(shape) < 3:
                continue
            if _conv_channel_split(g, shape):
                continue  # a conv's (B, C, H, W) output split on C (Sana's GLUMBConv gate): a real channel split
            if _saved_dim(g, len(shape)) != len(shape) - 1:  # along tokens / chunks, not channels
                op = tpops._ElementWiseOp(self._op_id, g.name())
                self._op_id += 1
                del module2node[node.module]
                node.module, node.type, node.module_class = op, tpops.OPTYPE.ELEMENTWISE, op.__class__
                module2node[op] = node
        return module2node

    def build_dependency(self, *args, **kwargs):
        super().build_dependency(*args, **kwargs)
        for node in self.module2node.values():
            if node.type == tpops.OPTYPE.CONCAT:
                self._map_last_dim_cat(node)
            if node.type != tpops.OPTYPE.RESHAPE:
                continue
            src, dst = _in_shape(node.grad_fn), _out_shape(node.grad_fn)
            if not src or not dst or len(src) != 2 or len(dst) != 3 or dst[0] != src[0] or dst[1] * dst[2] != src[1]:
                continue
            n, d = dst[1], dst[2]  # (B, n x D) viewed as (B, n, D): adaLN-single's modulation chunks
            for in_node in node.inputs:
                for dep in node.dependencies:
                    if dep.target == in_node:
                        dep.index_mapping[0] = _ChunkMapping(n, d, expand=True)
                for dep in in_node.dependencies:
                    if dep.target == node:
                        dep.index_mapping[0] = _ChunkMapping(n, d, expand=False)
        return self

    @staticmethod
    def _map_last_dim_cat(node):
        """torch.cat on the feature axis of a (B, tokens, D) tensor (Flux's cat(attention, MLP)): Torch-Pruning
        maps only a cat on dim 1, so the offsets are set here, with its own index mapping."""
        out = _out_shape(node.grad_fn)
        if out is None or len(out) < 3 or _saved_dim(node.grad_fn, len(out)) != len(out) - 1:
            return
        sizes = [(_out_shape(n.grad_fn) or (None,))[-1] if n.grad_fn is not None else None for n in node.inputs]
        if None in sizes or sum(sizes) != out[-1]:
            return
        offsets = [0]
        for c in sizes:
            offsets.append(offsets[-1] + c)
        node.module.concat_sizes, node.module.offsets = sizes, offsets
        for i, in_node in enumerate(node.inputs):
            for dep in node.dependencies:
                if dep.target == in_node:
                    dep.index_mapping[1] = _ConcatIndexMapping(offset=offsets[i:i + 2], reverse=True)
            for dep in in_node.dependencies:
                if dep.target == node:
                    dep.index_mapping[1] = _ConcatIndexMapping(offset=offsets[i:i + 2], reverse=False)


@dataclass
class Space:
    """One group of channels that go together: kind 'D' / 'H' / 'F', its channels, and its tensors."""
    name: str  # the root module (and pruning side) the group is indexed by
    kind: str
    size: int  # channels (root indices)
    # (state-dict key, dim) -> (size, reps) long tensor: the tensor indices of each channel along dim
    members: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    group: object = None  # the torch_pruning Group (for the importance criteria)


_OUT = (tpf.prune_linear_out_channels, tpf.prune_conv_out_channels)
_IN = (tpf.prune_linear_in_channels, tpf.prune_conv_in_channels)


def _params(graph, item, names: dict, pnames: dict, unwrapped_dims: dict) -> list[tuple[str, int]]:
    """The (state-dict key, dim) pairs a group item prunes."""
    mod, fn = item.dep.target.module, item.dep.handler
    is_out, is_in = graph.is_out_channel_pruning_fn(fn), graph.is_in_channel_pruning_fn(fn)
    if isinstance(mod, nn.Parameter):
        name = pnames[mod]
        if unwrapped_dims.get(name) is None:
            raise UnsupportedModelError(f"width pruning: the dependency graph prunes the bare parameter {name}; "
                                        "its family must declare it (WidthSpec.unwrapped or ignored_params)")
        return [(name, unwrapped_dims[name])]
    name = names.get(mod)
    if name is None:
        return []
    pre = f"{name}." if name else ""
    out = []
    if isinstance(mod, (nn.Linear, nn.Conv2d)):
        if is_out:
            out = [("weight", 0)] + ([("bias", 0)] if mod.bias is not None else [])
        elif is_in:
            out = [("weight", 1)]
    elif isinstance(mod, nn.Embedding):
        if is_out:
            out = [("weight", 1)]
    elif isinstance(mod, nn.LayerNorm):
        if mod.elementwise_affine:
            out = [("weight", 0)] + ([("bias", 0)] if mod.bias is not None else [])
    elif isinstance(mod, nn.Module) and any(True for _ in mod.parameters(recurse=False)):
        raise UnsupportedModelError(f"width pruning: the dependency graph prunes {name} "
                                    f"({type(mod).__name__}), which it has no rule to slice")
    return [(pre + k, d) for k, d in out]


def _is_head_member(name: str, tr) -> bool:
    parent_name, _, leaf = name.rpartition(".")
    if leaf not in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        return False
    parent = tr.get_submodule(parent_name)
    return hasattr(parent, "heads")


class _BufferAsParameter:
    """Declared unwrapped tensors that are buffers (SD3's position table) become parameters while tracing."""

    def __init__(self, tr, names):
        self.tr, self.swapped = tr, []
        for n in names:
            mod_name, _, leaf = n.rpartition(".")
            mod = tr.get_submodule(mod_name)
            if leaf in mod._buffers and mod._buffers[leaf] is not None:
                self.swapped.append((mod, leaf, mod._buffers[leaf]))

    def __enter__(self):
        for mod, leaf, buf in self.swapped:
            del mod._buffers[leaf]
            mod.register_parameter(leaf, nn.Parameter(buf, requires_grad=True))
        return self

    def __exit__(self, *exc):
        for mod, leaf, buf in self.swapped:
            del mod._parameters[leaf]
            mod.register_buffer(leaf, buf)
        return False


def _unwrapped_dim(spec, name: str) -> int | None:
    for rx, dim in spec.unwrapped:
        if re.fullmatch(rx, name):
            return dim
    return None


def build_graph(fam, tr) -> TokenGraph:
    """The dependency graph of one forward call, with the family's unwrapped parameters."""
    spec = fam.width
    inputs = fam.dummy_inputs(tr, 1)
    params = dict(tr.named_parameters())
    unwrapped = [(p, dim) for n, p in params.items() if (dim := _unwrapped_dim(spec, n)) is not None]
    ignored_params = [p for n, p in params.items() if any(re.fullmatch(r, n) for r in spec.ignored_params)]
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            graph = TokenGraph().build_dependency(tr, example_inputs=inputs, forward_fn=lambda m, x: fam.predict(m, *x),
                                                  unwrapped_parameters=unwrapped, ignored_params=ignored_params,
                                                  verbose=False)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return graph


def spaces(fam, tr, graph: TokenGraph | None = None) -> list[Space]:
    """Every group of channels width pruning cuts together, as the dependency graph finds them."""
    buffers = [n for n, _ in tr.named_buffers() if _unwrapped_dim(fam.width, n) is not None]
    with _BufferAsParameter(tr, buffers):
        if graph is None:
            graph = build_graph(fam, tr)
        return _spaces(fam, tr, graph)


def _root(group, names):
    """(size, name, module, handler) of the module whose channels are the group's one to one: an output side
    (a Linear / Conv2d's outputs), else an input side (GLUMBConv's pointwise conv: the gated hidden channels,
    each of which is two of the inverted conv's outputs); None when neither exists."""
    outs, ins = [], []
    for it in group:
        mod, fn = it.dep.target.module, it.dep.handler
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or mod not in names:
            continue
        if fn in _OUT:
            n = mod.weight.shape[0]
            if len(set(it.idxs)) == n and len(set(it.root_idxs)) == n:
                outs.append((n, names[mod], mod, fn))
        elif fn in _IN and getattr(mod, "groups", 1) == 1:
            n = mod.weight.shape[1]
            if len(set(it.idxs)) == n and len(set(it.root_idxs)) == n:
                ins.append((n, names[mod], mod, fn))
    roots = outs or ins
    return min(roots, key=lambda r: (r[0], r[1])) if roots else None


def _spaces(fam, tr, graph) -> list[Space]:
    spec = fam.width
    names = {m: n for n, m in tr.named_modules()}
    pnames = {p: n for n, p in tr.named_parameters()}
    udims = {n: _unwrapped_dim(spec, n) for n in pnames.values()}
    ignored = [m for n, m in tr.named_modules() if any(re.fullmatch(p, n) for p in spec.ignored)]
    d, f = fam.hidden_size(tr), fam.mlp_hidden(tr)
    found = []
    for group in graph.get_all_groups(ignored_layers=ignored):
        root = _root(group, names)
        if root is None:
            continue
        size, root_name, root, fn = root
        g = graph.get_pruning_group(root, fn, list(range(size)))
        head = any(not isinstance(it.dep.target.module, nn.Parameter) and it.dep.target.module in names
                   and it.dep.handler in _OUT and _is_head_member(names[it.dep.target.module], tr) for it in g)
        kind = "H" if head else "F" if size == f and size != d else "D" if size == d else None
        if spec.mlp_only is not None and kind != "F":
            continue  # heads and the width D stay: their groups are not cut, so not read
        if kind is None:
            raise UnsupportedModelError(f"width pruning: the dependency graph groups {size} channels at {root_name}, "
                                        f"neither the width {d} nor the MLP's {f}")
        members: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for it in g:
            for key in _params(graph, it, names, pnames, udims):
                members.setdefault(key, []).extend(zip(it.root_idxs, it.idxs))
        space = Space(f"{kind}:{root_name}", kind, size, group=g)
        for key, pairs in members.items():
            per = [sorted({i for r, i in pairs if r == c}) for c in range(size)]
            reps = {len(p) for p in per}
            if len(reps) != 1:
                raise UnsupportedModelError(f"width pruning: {key[0]} dim {key[1]} takes an uneven number of "
                                            f"channels per channel of {root_name}")
            space.members[key] = torch.tensor(per, dtype=torch.long)
        found.append(space)
    return found


def check_cover(found: list[Space], state: dict) -> None:
    """Every dimension a space touches is covered exactly once by the spaces (nothing half-pruned)."""
    cover: dict[tuple[str, int], list[torch.Tensor]] = {}
    for s in found:
        for key, idx in s.members.items():
            cover.setdefault(key, []).append(idx.reshape(-1))
    for (k, dim), parts in cover.items():
        if k not in state:
            raise UnsupportedModelError(f"width pruning: the dependency graph names {k}, which is not in the state dict")
        allidx = torch.cat(parts).sort().values
        n = state[k].shape[dim]
        if allidx.numel() != n or not torch.equal(allidx, torch.arange(n)):
            raise UnsupportedModelError(f"width pruning: {k} dim {dim} ({n} channels) is covered by "
                                        f"{allidx.numel()} channels of the dependency graph's groups")


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Kept head indices -> their channels."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
