"""The GGUF export's check: the transformer rebuilt from the dequantized file tensors, its output against the
source model's as SQNR (dB). formats/gguf.py encodes (the same deterministic encoding the writer uses)."""
from __future__ import annotations

import math
import time

import torch

from ..geometry import latent_hw
from .config import PARITY_GUIDANCE
from .trace import _forward_inputs


def check_gguf(bundle, cfg, report):
    from ditkit.formats import gguf, original_keys

    fam, tr = bundle.family, bundle.transformer
    hw = latent_hw(bundle, cfg.height, cfg.width)
    t0 = time.perf_counter()
    enc = gguf.encode(tr, fam.name, cfg.quant)
    state = gguf.decode(enc)
    if original_keys.has_original_layout(fam.name):
        state = original_keys.from_original(fam.name, state, {k: tuple(v.shape) for k, v in tr.state_dict().items()})
    model = fam.transformer_cls().from_config(enc.config)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    latents, t, cond = _forward_inputs(fam, tr, 2, hw, None, seed=3)
    with torch.no_grad():
        ref = fam.predict(tr, latents, t, cond, PARITY_GUIDANCE).float()
        got = fam.predict(model, latents, t, cond, PARITY_GUIDANCE).float()
    noise = float(((got - ref) ** 2).mean())
    signal = float((ref ** 2).mean())
    sqnr = float("inf") if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else float("-inf")
    report.seconds_check = round(time.perf_counter() - t0, 2)
    report.quant = cfg.quant
    report.tensor_types = enc.counts()
    report.layout = gguf.layout(fam.name)
    report.sqnr_db = round(sqnr, 2) if math.isfinite(sqnr) else sqnr
    report.max_abs_error = float((got - ref).abs().max())
    report.latent_hw = list(hw)
    report.bit_exact = bool(torch.equal(got, ref))
    report.parity = [{"batch": 2, "latent_hw": list(hw), "text_tokens": None, "max_abs": report.max_abs_error,
                      "sqnr_db": report.sqnr_db}]
    if not torch.isfinite(got).all():
        report.failures.append(f"the {cfg.quant} GGUF model's output is not finite")
    elif cfg.min_sqnr is not None and sqnr < cfg.min_sqnr:
        report.failures.append(f"the {cfg.quant} GGUF model's output SQNR {sqnr:.1f} dB is under --min-sqnr "
                               f"{cfg.min_sqnr:g}")
    report.passed = not report.failures
    return bundle, report
