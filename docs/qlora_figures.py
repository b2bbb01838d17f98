"""Re-run the LoRA-on-a-quantized-base figures quoted in docs/quantize.md and docs/lora.md (one JSON line each).

    .venv/bin/python docs/qlora_figures.py [--model DIR] [--scale S]
        tiny-digits (default), a seeded random rank-4 adapter on the attention and adaLN-modulation Linears:
        for every CPU scheme, the output SQNR of the quantized model against the float one, and of the
        quantized model + adapter (the adapter beside the quantized weights, generate --lora's path) against
        the float model + adapter, on 8 seeded inputs (timesteps spread over 0..1000); then quantize --lora's
        three figures (ops.quantize.quantize_fused) for int8-dynamic.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

SCHEMES = ["int8-dynamic", "int8-weight-only", "bnb-int8", "bnb-nf4", "bnb-fp4"]


def sqnr(ref, out) -> float:
    num = sum(float(r.double().pow(2).sum()) for r in ref)
    den = sum(float((o.double() - r.double()).pow(2).sum()) for r, o in zip(ref, out))
    return round(10 * math.log10(num / den), 2)


def main() -> None:
    import torch

    import ditkit.formats
    from ditkit.formats.layouts import load_bundle
    from ditkit.formats.lora import Adapter
    from ditkit.ops.lora import apply_lora, linear_modules, resolve_targets
    from ditkit.ops.quantize import QuantizeConfig, calibration, quantize, quantize_fused

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path(ditkit.formats.__file__).parent / "assets" / "tiny-digits"))
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    load = lambda: load_bundle(Path(args.model))  # noqa: E731
    flt = load()
    fam, tr = flt.family, flt.transformer
    mods = resolve_targets(fam, tr, ["attention", "modulation"])
    lin = linear_modules(tr)
    g = torch.Generator().manual_seed(0)
    ad = Adapter(A={m: torch.randn(4, lin[m][1], generator=g) / lin[m][1] ** 0.5 for m in mods},
                 B={m: torch.randn(lin[m][0], 4, generator=g) * 0.05 for m in mods}, rank=4, alpha=4.0,
                 family=fam.name, targets=["attention", "modulation"])
    calib = calibration.calibration_set(fam, tr, 4, 2, 100)  # other seeds than quantize's own calibration
    ref = calibration.outputs(fam, tr, calib)
    apply_lora(flt, ad, args.scale)
    ref_lora = calibration.outputs(fam, tr, calib)
    print(json.dumps({"adapter_modules": len(mods), "adapter_effect_sqnr_db": sqnr(ref, ref_lora)}))
    for scheme in SCHEMES:
        q, _ = quantize(load(), QuantizeConfig(scheme=scheme))
        quant = calibration.outputs(fam, q.transformer, calib)
        apply_lora(q, ad, args.scale)
        quant_lora = calibration.outputs(fam, q.transformer, calib)
        a, b = sqnr(ref, quant), sqnr(ref_lora, quant_lora)
        print(json.dumps({"scheme": scheme, "quant_vs_float_db": a, "quant_lora_vs_float_lora_db": b,
                          "rms_error_ratio": round(10 ** ((a - b) / 20), 3)}))
    _, rep = quantize_fused(load(), QuantizeConfig(scheme="int8-dynamic"), [ad], [args.scale])
    print(json.dumps({"quantize --lora": "int8-dynamic", **{k: v for k, v in rep.lora.items() if k != "adapters"}}))


if __name__ == "__main__":
    main()
