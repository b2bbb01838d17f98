"""Other libraries' quantizers, applied in-process to a base model so bench can put them beside ditkit's schemes.

    PEERS: name -> Peer; peer_bundle(base, name) -> a quantized copy of the base's transformer, as a Bundle.

Each peer quantizes the same Linear layers ditkit's scheme would (ops.quantize.plan: the block linears, the
family's sensitive layers outside the blocks kept float), with the library's own public API:
  torchao-int8-dynamic      torchao quantize_(Int8DynamicActivationInt8WeightConfig())  (diffusers' TorchAoConfig "int8dq")
  torchao-int8-weight-only  torchao quantize_(Int8WeightOnlyConfig())                   ("int8wo")
  torchao-int4-weight-only  torchao quantize_(IntxWeightOnlyConfig(int4, PerGroup(32))): torchao's
                            Int4WeightOnlyConfig ("int4wo") needs CUDA or the mslk package on this build
  quanto-qint8, quanto-qfloat8  optimum-quanto quantize(weights=...) + freeze (diffusers' QuantoConfig weights_dtype)
  gguf-Q8_0, gguf-Q4_K      each weight encoded by formats/gguf.py and run by diffusers' GGUFLinear (what
                            from_single_file(..., GGUFQuantizationConfig) builds: dequantize, then F.linear)
bitsandbytes is not a peer here: ditkit's bnb-int8 / bnb-nf4 schemes are bitsandbytes' Linear8bitLt / Linear4bit,
the modules diffusers' BitsAndBytesConfig installs.
They are peers, not --scheme choices, because none of them writes plain safetensors + JSON: torchao's and
quanto's weights are tensor subclasses (safetensors' save_file refuses torchao's), and ditkit writes no pickles.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ditkit.formats.errors import ConfigError, choice_error


@dataclass(frozen=True)
class Peer:
    name: str
    package: str  # the pip requirement its error names when absent
    doc: str
    apply: Callable[[nn.Module, set[str]], None]  # (transformer, names of the Linear layers to quantize), in place


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"this peer needs {package}; pip install '{package}' (or pip install 'ditkit[peers]')") from None


def _torchao(make_config):
    def apply(tr, names):
        _need("torchao", "torchao>=0.18")
        from torchao.quantization import quantize_

        quantize_(tr, make_config(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in names)
    return apply


def _int8_dynamic():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    return Int8DynamicActivationInt8WeightConfig()


def _int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig
    return Int8WeightOnlyConfig()


def _int4_weight_only():
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


def _quanto(dtype_name: str):
    def apply(tr, names):
        quanto = _need("optimum.quanto", "optimum-quanto>=0.2.7")
        include = sorted(names)
        quanto.quantize(tr, weights=getattr(quanto, dtype_name), include=include)
        quanto.freeze(tr)
    return apply


def _gguf(quant: str):
    def apply(tr, names):
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
        import gguf

        from ditkit.formats.gguf import quantize

        block = 256 if quant.endswith("_K") else 32
        for name in names:
            m = tr.get_submodule(name)
            if m.in_features % block:
                continue  # city96's rule: rows that do not fill a block stay float
            raw = quantize(m.weight.detach().float().numpy(), quant)
            new = GGUFLinear(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=torch.float32)
            new.weight = GGUFParameter(torch.from_numpy(raw), requires_grad=False,
                                       quant_type=gguf.GGMLQuantizationType[quant])
            if m.bias is not None:
                new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(tr.get_submodule(parent) if parent else tr, child, new)
    return apply


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("torchao-int8-dynamic", "torchao>=0.18", "torchao int8 weights + dynamic int8 activations",
         _torchao(_int8_dynamic)),
    Peer("torchao-int8-weight-only", "torchao>=0.18", "torchao int8 weights, float activations",
         _torchao(_int8_weight_only)),
    Peer("torchao-int4-weight-only", "torchao>=0.18", "torchao int4 weights (groups of 32), float activations",
         _torchao(_int4_weight_only)),
    Peer("quanto-qint8", "optimum-quanto>=0.2.7", "optimum-quanto int8 weights", _quanto("qint8")),
    Peer("quanto-qfloat8", "optimum-quanto>=0.2.7", "optimum-quanto float8 e4m3 weights", _quanto("qfloat8")),
    Peer("gguf-Q8_0", "gguf>=0.10", "GGUF Q8_0 weights through diffusers' GGUFLinear", _gguf("Q8_0")),
    Peer("gguf-Q4_K", "gguf>=0.10", "GGUF Q4_K weights through diffusers' GGUFLinear", _gguf("Q4_K")),
)}


def targets(bundle) -> set[str]:
    """The Linear layers ditkit's int8-dynamic would quantize (ops.quantize.plan, sensitive copies included)."""
    from .quantize import QuantizeConfig, plan

    found, _ = plan(bundle.family, bundle.transformer, QuantizeConfig())
    return {name for name, m, _, _ in found if type(m) is nn.Linear}


def weights_bytes(model: nn.Module) -> int:
    """Bytes the weights hold: parameters and buffers, a tensor subclass (torchao, quanto) by its inner tensors."""
    def size(t) -> int:
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
            inner, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in inner)
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += size(t)
    return total


def peer_bundle(base, name: str):
    """A quantized copy of base's transformer (the base is left as it is), labelled with the peer's name."""
    if name not in PEERS:
        raise choice_error("--peer", name, PEERS)
    from ditkit.formats.quantized import is_quantized

    if is_quantized(base.transformer):
        raise ConfigError(f"--peer quantizes the base, and {base.name} is already quantized; pass the float base first")
    tr = copy.deepcopy(base.transformer).eval().requires_grad_(False)
    PEERS[name].apply(tr, targets(dataclasses.replace(base, transformer=tr)))
    return dataclasses.replace(base, transformer=tr, path=None, kind=f"peer ({name})", label=name,
                               manifest={"op": "peer", "peer": name, "defaults": base.manifest.get("defaults", {})})
