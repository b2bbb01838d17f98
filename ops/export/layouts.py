"""The other formats (diffusers, safetensors, dit-original): an in-memory reload of exactly the bytes the writer
produces, checked bit-exact against the exported model."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..geometry import latent_hw
from .config import PARITY_GUIDANCE, ExportConfig, ExportReport
from .trace import _config_dict, _forward_inputs


def _same_outputs(fam, a: nn.Module, b: nn.Module, hw) -> tuple[bool, float]:
    latents, t, cond = _forward_inputs(fam, a, 2, hw, None, seed=3)
    with torch.no_grad():
        x, y = fam.predict(a, latents, t, cond, PARITY_GUIDANCE), fam.predict(b, latents, t, cond, PARITY_GUIDANCE)
    return torch.equal(x, y), float((x - y).abs().max())


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _reloaded(fmt: str, bundle) -> nn.Module:
    """The transformer as a reader of `fmt` would rebuild it from the bytes the writer produces."""
    import json

    from safetensors.torch import load as st_load

    from ditkit.formats import authors, dit_original
    from ditkit.formats.export_files import single_file_bytes

    fam, tr = bundle.family, bundle.transformer
    if fmt == "dit-original":
        state = dit_original.from_diffusers(tr)  # raises FormatError when the blocks' embedders differ
        conf, converted = dit_original.to_diffusers(state, Path(f"<{bundle.name} as dit-original>"))
    elif fmt in authors.AUTHORS_LAYOUTS:  # the bytes the writer produces, read by the file reader's own path
        from safetensors.torch import load as st_load2, save as st_save

        from ditkit.formats.reading import loads

        meta = authors.file_metadata(bundle, {})
        raw = st_load2(st_save(authors.file_state(fmt, tr), metadata=meta))
        _, conf, converted = authors.read(raw, f"<{bundle.name} as {fmt}>", loads(meta["ditkit_config"], "metadata"))
    elif fmt == "safetensors":
        data, meta = single_file_bytes(bundle, {})
        conf, converted = json.loads(meta["config"]), st_load(data)
    else:  # diffusers: config.json + the state dict
        conf, converted = _config_dict(tr), {k: v.detach().clone() for k, v in tr.state_dict().items()}
    model = fam.transformer_cls().from_config(conf)
    result = model.load_state_dict(converted, strict=True)
    del result
    # the reader's conventions: the authors' layout runs as the authors' model, ditkit's formats as recorded
    fam.apply_conventions(model, reader_conventions(fmt, bundle))
    return model.eval().requires_grad_(False)


def reader_conventions(fmt: str, bundle) -> dict:
    from ditkit.formats import authors

    lay = authors.AUTHORS_LAYOUTS.get(fmt)
    if lay is not None:
        return dict(lay.conventions or {})
    return bundle.family.conventions(bundle.transformer)


def _export_layout(bundle, cfg: ExportConfig, report: ExportReport):
    fam, tr = bundle.family, bundle.transformer
    t0 = time.perf_counter()
    model = _reloaded(cfg.format, bundle)
    hw = latent_hw(bundle, cfg.height, cfg.width)
    same_state = _same_state(tr, model)
    equal, max_abs = _same_outputs(fam, tr, model, hw)
    report.seconds_check = round(time.perf_counter() - t0, 2)
    report.bit_exact = same_state and equal
    report.parity = [{"batch": 2, "latent_hw": list(hw), "text_tokens": None, "max_abs": max_abs, "max_rel": 0.0}]
    report.max_abs_error = max_abs
    report.latent_hw = list(hw)
    own, theirs = fam.conventions(tr), reader_conventions(cfg.format, bundle)
    if same_state and own != theirs:  # the weights are exact; the authors' code runs them its own way
        report.bit_exact = None
        report.note = (f"weights written exactly; the {cfg.format} layout's model code runs them with {theirs} where "
                       f"this model uses {own}: outputs differ by up to {max_abs:.3g} (formats.md)")
    elif not report.bit_exact:
        report.failures.append(f"the {cfg.format} round trip changed the model (weights identical: {same_state}, "
                               f"max abs output difference {max_abs:.3g})")
        report.passed = False
    return bundle, report
