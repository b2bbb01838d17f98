"""Tracing the transformer for ONNX: the call family.predict makes, its dynamic axes, torch.export -> ONNX."""
from __future__ import annotations

import inspect
import logging
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ditkit.formats.errors import UnsupportedModelError

from .config import AXIS_NAMES, PARITY_GUIDANCE, SEQUENCE_COND, TRACE_BATCH, ExportFormat


def fuse_lora_(model: nn.Module) -> int:
    """Merge every PEFT LoRA layer into its base layer and put the base layer back; returns how many."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, no LoRA layers
        return 0
    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer) or not name:
            continue
        module.merge()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.get_base_layer())
        n += 1
    return n


def check_exportable(bundle, fmt: ExportFormat) -> None:
    from ditkit.formats.quantized import is_quantized

    fam = bundle.family
    if bundle.kind == "onnx":
        raise UnsupportedModelError(f"{bundle.name} is already an ONNX bundle (no PyTorch weights); export the "
                                    "checkpoint it was made from")
    if fmt.families is not None and fam.name not in fmt.families:
        raise UnsupportedModelError(f"--format {fmt.name} holds the {', '.join(fmt.families)} family only "
                                    f"(this model is {fam.name}); choose another --format")
    if is_quantized(bundle.transformer) and not fmt.holds_quantized:
        raise UnsupportedModelError(
            f"--format {fmt.name} cannot hold ditkit-quantized modules; export the unquantized checkpoint "
            "(for a quantized ONNX graph, quantize the exported fp32 graph with onnxruntime.quantization)")


def _forward_inputs(fam, tr, batch: int, hw: tuple[int, int], text_tokens: int | None, seed: int):
    """(latents, t, cond) with per-row timesteps, and text conditioning cut to `text_tokens`."""
    latents, t, cond = fam.dummy_inputs(tr, batch, hw, seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = (torch.rand(batch, generator=g) * 999.0).to(t.device, t.dtype)  # distinct per row
    if text_tokens is not None:
        cond = {k: (v[:, :text_tokens] if k in SEQUENCE_COND else v) for k, v in cond.items()}
    return latents, t, cond


def capture_call(fam, tr, batch: int, hw: tuple[int, int], text_tokens: int | None = None, seed: int = 0) -> dict:
    """The arguments `family.predict` passes to the transformer, bound to its forward's parameter names."""
    latents, t, cond = _forward_inputs(fam, tr, batch, hw, text_tokens, seed)
    seen = {}

    def hook(module, args, kwargs):
        seen["call"] = (args, kwargs)

    handle = tr.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            fam.predict(tr, latents, t, cond, PARITY_GUIDANCE)
    finally:
        handle.remove()
    args, kwargs = seen["call"]
    return dict(inspect.signature(tr.forward).bind(*args, **kwargs).arguments)


def _tensor_shapes(call: dict) -> dict[str, tuple[int, ...]]:
    from ditkit.formats.onnx_bundle import flatten_call

    return {k: tuple(v.shape) for k, v in flatten_call([], (), call).items() if isinstance(v, torch.Tensor)}


class _Call(nn.Module):
    """The transformer called with a flat tuple of tensors, rebuilt into the captured call's structure."""

    def __init__(self, transformer: nn.Module, template: dict, names: list[str]):
        super().__init__()
        self.transformer, self.template, self.names = transformer, template, names

    def forward(self, *tensors):
        from ditkit.formats.onnx_bundle import rebuild_call

        out = self.transformer(**rebuild_call(self.template, dict(zip(self.names, tensors))))
        return out[0] if isinstance(out, tuple) else out.sample


class _Decode(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, *tensors):  # (latent_sample,): varargs like _Call, so both take the same dynamic_shapes
        return self.vae.decode(tensors[0], return_dict=False)[0]


def _drop_noop_squeezes(ep) -> int:
    """torch.onnx maps aten.squeeze.dim to ONNX Squeeze, which fails unless the dim is 1, where PyTorch's
    squeeze of a longer dim does nothing (PixArt's `proj_out(...).squeeze(1)`). Remove those no-ops."""
    graph, n = ep.graph_module.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims):
            continue
        x = node.args[0]
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        shape = x.meta["val"].shape
        if all(not (isinstance(shape[d], int) and shape[d] == 1) for d in dims):
            node.replace_all_uses_with(x)
            graph.erase_node(node)
            n += 1
    if n:
        ep.graph_module.recompile()
    return n


def infer_axes(base: dict, variants: dict[str, dict], hw_pair: tuple | None) -> dict[str, dict[int, str]]:
    """input -> {dim: axis name}: the dims whose size changed between the traced call and a variant call."""
    b = _tensor_shapes(base)
    axes: dict[str, dict[int, str]] = {}
    tokens: dict[tuple[int, int], str] = {}  # a resolution-dependent size change -> its axis (one per change)
    for vname, call in variants.items():
        s = _tensor_shapes(call)
        for k, shape in b.items():
            for d, (x, y) in enumerate(zip(shape, s[k])):
                if x == y:
                    continue
                if vname != "resolution":
                    name = AXIS_NAMES[vname]
                elif hw_pair and len(shape) == 4 and d in (2, 3) and (x, y) == hw_pair[d - 2]:
                    name = ("latent_height", "latent_width")[d - 2]
                else:  # dims that changed alike share an axis; other changes (a RoPE table's h and w) do not
                    name = tokens.setdefault((x, y), "image_tokens" + (f"_{len(tokens) + 1}" if tokens else ""))
                axes.setdefault(k, {})[d] = name
    return axes


def _dims(axes: dict[str, dict[int, str]], names: list[str]) -> tuple:
    """torch.export dynamic_shapes: a named Dim for an axis several inputs share (so they stay equal),
    Dim.DYNAMIC for an axis one input has (torch.export then infers its divisibility, e.g. by the patch)."""
    from torch.export import Dim

    count = Counter(a for k in axes for a in axes[k].values())
    named: dict[str, object] = {}

    def dim(axis: str):
        if count[axis] == 1:
            return Dim.DYNAMIC
        return named.setdefault(axis, Dim(axis, min=1))

    return (tuple({d: dim(a) for d, a in axes.get(k, {}).items()} for k in names),)


def _rename_dims(model, axes: dict[str, dict[int, str]]) -> None:
    """Give the graph's symbolic dims the axis names (batch, text_tokens, ...) instead of s0, s13, ..."""
    import onnx_ir as ir

    mapping: dict[str, str] = {}
    for v in model.graph.inputs:
        for d, axis in axes.get(v.name, {}).items():
            dim = v.shape[d] if v.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                mapping.setdefault(dim.value, axis)
    if not mapping:
        return

    def rename(text: str) -> str:
        return re.sub(r"[A-Za-z_]\w*", lambda m: mapping.get(m.group(), m.group()), text)

    def fix(v) -> None:
        if v.shape is None:
            return
        dims = [ir.SymbolicDim(rename(d.value)) if isinstance(d, ir.SymbolicDim) and d.value else d for d in v.shape]
        v.shape = ir.Shape(dims)

    values = list(model.graph.inputs) + list(model.graph.outputs)
    values += [o for node in ir.traversal.RecursiveGraphIterator(model.graph) for o in node.outputs]
    for v in values:
        fix(v)


def _describe(values) -> list[dict]:
    out = []
    for v in values:
        shape = [d if isinstance(d, int) else str(d) for d in v.shape]
        out.append({"name": v.name, "dtype": str(v.type).replace("tensor(", "").rstrip(")"), "shape": shape})
    return out


def export_graph(module: nn.Module, tensors: tuple, names: list[str], axes: dict, opset: int, path: Path,
                 output_name: str) -> list[Path]:
    """torch.export -> ONNX (opset `opset`) with the given dynamic axes; writes `path` (+ .data)."""
    from ditkit.formats.onnx_bundle import write_onnx

    # torch.onnx warns once per missing torchvision op (nms, roi_align, ...): not ours, not actionable
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad():
        ep = torch.export.export(module.eval(), tensors, dynamic_shapes=_dims(axes, names))
    _drop_noop_squeezes(ep)
    program = torch.onnx.export(ep, dynamo=True, opset_version=opset, input_names=names,
                                output_names=[output_name], verbose=False)
    _rename_dims(program.model, axes)
    return write_onnx(program, path)


def _alt_hw(tr, hw: tuple[int, int]) -> tuple[int, int]:
    """A second, non-square resolution for the dynamic-resolution trace: a few patches taller and wider."""
    step = 2 * max(2, int(getattr(tr.config, "patch_size", None) or 2))
    return hw[0] + step, hw[1] + 2 * step


def _text_tokens(fam, tr) -> tuple[int, int] | None:
    """(traced, shorter) prompt lengths for text families."""
    if fam.conditioning != "text":
        return None
    _, _, cond = fam.dummy_inputs(tr, 1)
    n = cond["prompt_embeds"].shape[1]
    return n, max(1, n - 3)


def _trace_transformer(fam, tr, trace_hw, other_hw, text, opset, path):
    """Capture the calls, infer the axes, export. Returns (names, template, axes, files, batch_inputs):
    batch_inputs None for a dynamic batch axis, else the inputs whose dim 0 is the batch of a graph traced at
    batch 1 (a family with `onnx_fixed_batch`: onnxruntime then runs a batch row by row). Complex inputs
    travel as torch.view_as_real (the family's `onnx_tracing` makes the traced code take them so)."""
    from ditkit.formats.onnx_bundle import as_real, flatten_call

    n_text = text[0] if text else None
    batch = 1 if fam.onnx_fixed_batch else TRACE_BATCH
    base = capture_call(fam, tr, batch, trace_hw, n_text)
    variants = {"batch": capture_call(fam, tr, batch + 1, trace_hw, n_text)}
    if text:
        variants["text"] = capture_call(fam, tr, batch, trace_hw, text[1])
    if other_hw is not None:
        variants["resolution"] = capture_call(fam, tr, batch, other_hw, n_text)
    pair = ((trace_hw[0], other_hw[0]), (trace_hw[1], other_hw[1])) if other_hw else None
    axes = infer_axes(base, variants, pair)
    batch_inputs = None
    if fam.onnx_fixed_batch:
        batch_inputs = sorted(k for k, a in axes.items() if a.get(0) == AXIS_NAMES["batch"])
        axes = {k: a for k, a in ((k, {d: n for d, n in a.items() if n != AXIS_NAMES["batch"]})
                                  for k, a in axes.items()) if a}
    flat = flatten_call([], (), base)
    names = [k for k, v in flat.items() if isinstance(v, torch.Tensor)]
    with fam.onnx_tracing():
        files = export_graph(_Call(tr, base, names), tuple(as_real(flat[k]) for k in names), names, axes, opset,
                             path, "sample")
    return names, base, axes, files, batch_inputs


def _config_dict(module) -> dict:
    import json

    return json.loads(module.to_json_string())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if line.strip() and not line.startswith("Traceback"):
            return line.strip()[:200]
    return type(e).__name__
