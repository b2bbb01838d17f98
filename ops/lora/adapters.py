"""Adapters in a model: inject (peft), apply with per-adapter scales, unload to the exact base, fuse, extract."""
from __future__ import annotations

import copy
import dataclasses
import hashlib

import torch
from torch import nn

from ditkit.formats.errors import ConfigError, FormatError, UnsupportedModelError
from ditkit.formats.lora import Adapter, adapter_from_peft_state, effective_scale, match
from ditkit.formats.quantized import is_quantized

from .config import LoraConfig
from .targets import linear_modules


ADAPTER_NAME = "ditkit"  # peft adapter name of the adapter being trained


def adapter_scales(scale: float | list[float] | None, n: int) -> list[float]:
    """The user's scale of each of `n` adapters (--lora-scale): None or [] is 1 for all, one value is for all,
    else one each; the layer's factor is then effective_scale(alpha, rank, scale) (formats.lora)."""
    scales = [1.0] if scale is None or (isinstance(scale, list) and not scale) else scale
    scales = list(scales) if isinstance(scales, (list, tuple)) else [scales]
    if len(scales) == 1:
        scales = scales * n
    if len(scales) != n:
        raise ConfigError(f"{len(scales)} --lora-scale values for {n} adapters; give one, or one each")
    return [float(s) for s in scales]


def _lora_layers(tr: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in tr.named_modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(tr: nn.Module) -> list[str]:
    names: list[str] = []
    for _, m in _lora_layers(tr):
        names += [k for k in m.lora_A.keys() if k not in names]
    return names


def _inject(tr: nn.Module, modules: list[str], rank: int, alpha: float, name: str) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    conf = PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=list(modules), lora_dropout=0.0, bias="none",
                          init_lora_weights=True)
    if is_quantized(tr):  # ditkit's own quantized Linears: the adapter in float beside them (QLoRA)
        from ditkit.nn.quantized.lora import custom_modules

        conf._register_custom_module(custom_modules())
    inject_adapter_in_model(conf, tr, adapter_name=name)


def base_digest(tr: nn.Module) -> str:
    """sha256 over the base weights (LoRA factors excluded; peft's base_layer names folded back)."""
    h = hashlib.sha256()
    sd = tr.state_dict()
    items = sorted((k.replace(".base_layer.", "."), v) for k, v in sd.items()
                   if ".lora_" not in k and isinstance(v, torch.Tensor))  # torch.ao's packed tuple: its tensors
    # are in the module's own entries (weight, weight_scale, bias: nn/quantized/torch_dynamic.py)
    for k, v in items:
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def apply_lora(bundle, adapter: Adapter | list[Adapter], scale: float | list[float] = 1.0):
    """Load adapter(s) into the bundle's transformer (in place), each active with its own scale; returns the
    bundle. An adapter for another family, or with keys that match no module, raises FormatError."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = adapter if isinstance(adapter, list) else [adapter]
    scales = adapter_scales(scale, len(adapters))
    tr, fam = bundle.transformer, bundle.family
    for i, ad in enumerate(adapters):
        if ad.family is not None and ad.family != fam.name:
            raise FormatError(f"adapter {ad.path or i} was trained for the {ad.family} family; this model is "
                              f"{fam.name}")
    modules = linear_modules(tr)
    adapters = [match(ad, modules) for ad in adapters]  # every adapter matches before any is applied
    names = adapter_names(tr)
    for i, (ad, s) in enumerate(zip(adapters, scales)):
        name = f"lora{len(names)}"
        _inject(tr, ad.modules, ad.rank, ad.alpha, name)
        # the factors copied in place (not load_state_dict: torch.ao's int8 modules cannot load a partial state)
        bad = []
        with torch.no_grad():
            for m in ad.modules:
                layer = tr.get_submodule(m)
                if not isinstance(layer, BaseTunerLayer) or name not in layer.lora_A:
                    bad.append(m)
                    continue
                for factor, w in ((layer.lora_A[name].weight, ad.A[m]), (layer.lora_B[name].weight, ad.B[m])):
                    if factor.shape != w.shape:
                        bad.append(m)
                        break
                    factor.copy_(w.to(factor.device, factor.dtype))
        if bad:
            raise FormatError(f"adapter {ad.path or i} did not load: {bad[:5]}")
        for _, layer in _lora_layers(tr):
            if name in layer.lora_A:
                layer.set_scale(name, float(s))
        names.append(name)
    for _, layer in _lora_layers(tr):
        layer.set_adapter(names, inference_mode=True)
    tr.requires_grad_(False)
    apply_sampling(bundle, adapters)
    return bundle


# scheduler classes an adapter's metadata may name (the samplers' own, ops.sample.SAMPLERS)
def _scheduler_classes() -> set[str]:
    from ditkit.ops.sample import SAMPLERS

    return {cls for cls, _, _ in SAMPLERS.values()}


def apply_sampling(bundle, adapters: list[Adapter]):
    """An adapter made by `distill --as-lora` carries its student's sampling settings (metadata
    `sampler_defaults` and `scheduler`): they become the bundle's defaults and scheduler, so generate samples
    base + adapter as the student does. Two adapters that both carry settings are an error."""
    carriers = [a for a in adapters if a.info.get("sampler_defaults")]
    if not carriers:
        return bundle
    if len(carriers) > 1:
        raise ConfigError(f"{len(carriers)} adapters each set the sampler ({', '.join(str(a.path) for a in carriers)}); "
                          "apply one few-step adapter at a time")
    ad = carriers[0]
    where = ad.path or "adapter"
    sd, sch = ad.info["sampler_defaults"], ad.info.get("scheduler")
    if not isinstance(sd, dict) or not set(sd) <= {"sampler", "steps", "guidance"}:
        raise FormatError(f"{where}: its sampler_defaults metadata must be an object of sampler, steps, guidance")
    if sch is not None:
        import diffusers

        if not isinstance(sch, dict) or sch.get("class") not in _scheduler_classes() \
                or not isinstance(sch.get("config"), dict):
            raise FormatError(f"{where}: its scheduler metadata names no known scheduler "
                              f"({', '.join(sorted(_scheduler_classes()))}); re-export it")
        bundle.components = {**bundle.components,
                             "scheduler": getattr(diffusers, sch["class"]).from_config(sch["config"])}
    manifest = dict(bundle.manifest)
    manifest["defaults"] = {**manifest.get("defaults", {}), **sd}
    bundle.manifest = manifest
    return bundle


def unload_lora(bundle):
    """Remove every adapter: the wrapped Linears are put back as they were (same tensors); returns the bundle."""
    tr = bundle.transformer
    for name, layer in sorted(_lora_layers(tr), key=lambda x: -len(x[0])):
        parent = tr.get_submodule(name.rsplit(".", 1)[0]) if "." in name else tr
        setattr(parent, name.rsplit(".", 1)[-1], layer.get_base_layer())
    return bundle


def fuse_lora(bundle, adapter: Adapter | list[Adapter], scale: float | list[float] = 1.0):
    """A new bundle whose transformer holds W + scale * (alpha / rank) * B A (the input is left untouched), with
    the sampler of a `distill --as-lora` adapter (apply_sampling)."""
    if is_quantized(bundle.transformer):
        raise UnsupportedModelError(f"{bundle.name} is quantized: fusing an adapter into its weights would dequantize, "
                                    "add and requantize them. Use it unfused (generate --lora runs it beside the "
                                    "quantized weights), or fuse it into the float model and quantize that "
                                    "(ditkit quantize FLOAT --lora ADAPTER)")
    tr = copy.deepcopy(bundle.transformer)
    unload_lora(dataclasses.replace(bundle, transformer=tr))
    fused = dataclasses.replace(bundle, transformer=tr)
    return fuse_lora_(fused, adapter, scale)


def fuse_lora_(bundle, adapter: Adapter | list[Adapter], scale: float | list[float] = 1.0):
    """fuse_lora in place (no copy of the transformer: DiT-XL/2 is 2.7 GB); the transformer holds no adapters."""
    adapters = adapter if isinstance(adapter, list) else [adapter]
    scales = adapter_scales(scale, len(adapters))
    tr = bundle.transformer
    if is_quantized(tr) or _lora_layers(tr):
        raise UnsupportedModelError(f"{bundle.name}: fuse_lora_ takes a float model without adapters")
    mods = linear_modules(tr)
    for ad, s in zip(adapters, scales):
        if ad.family is not None and ad.family != bundle.family.name:
            raise FormatError(f"adapter {ad.path} was trained for the {ad.family} family; this model is "
                              f"{bundle.family.name}")
        ad = match(ad, mods)
        with torch.no_grad():
            for m in ad.modules:
                lin = tr.get_submodule(m)
                delta = (ad.B[m].double() @ ad.A[m].double()) * effective_scale(ad.alpha, ad.rank, s)
                lin.weight.copy_((lin.weight.double() + delta.to(lin.weight.device)).to(lin.weight.dtype))
    # a few-step adapter's sampler comes along (new components / manifest dicts: the input keeps its own)
    return apply_sampling(bundle, adapters)


def extract_adapter(bundle, cfg: LoraConfig, info: dict | None = None) -> Adapter:
    """The trained adapter (peft's state dict of ADAPTER_NAME) with its config, family and base digest."""
    from peft import get_peft_model_state_dict

    tr = bundle.transformer
    if ADAPTER_NAME not in adapter_names(tr):
        raise ConfigError("this bundle carries no adapter trained by lora_train")
    state = get_peft_model_state_dict(tr, adapter_name=ADAPTER_NAME)
    return adapter_from_peft_state({k: v.float() for k, v in state.items()}, cfg.rank, cfg.alpha,
                                   family=bundle.family.name, targets=list(cfg.targets),
                                   base_sha256=bundle.parent_record().get("sha256"), info=dict(info or {}))
