"""Re-run the measurements quoted in docs/quantize.md. Each prints one JSON line per result.

    .venv/bin/python docs/quantize_figures.py kernels [--rounds 7]
        CPU int8 paths on a DiT-XL/2-sized MLP (1152 -> 4608 -> 1152, 512 tokens): fp32, torch.ao dynamic
        (per-tensor and per-channel weights), torch._int_mm, torch._weight_int8pack_mm; interleaved, medians.
    .venv/bin/python docs/quantize_figures.py engines [--rounds 8]
        torch.ao dynamic int8 packed for fbgemm vs oneDNN against fp32 F.linear, per DiT-XL/2 layer shape and
        on small layers, one thread, process CPU time, interleaved, medians (how int8-dynamic picks a backend).
    .venv/bin/python docs/quantize_figures.py tiny-digits N [base | SCHEME[:MODULATION[:SENSITIVE]] ...] [--out DIR]
        Quantize tiny-digits, save, reload from disk, generate N images (seed 0, the model's own sampler,
        steps and guidance), score them with its judge.
    .venv/bin/python docs/quantize_figures.py latency BASE VARIANT [--rounds 5] [--batch 1]
        Per-step latency of two transformers in one process: one warm-up call each, then alternating
        rounds, medians and their ratio; and the output SQNR of VARIANT against BASE on that input.
    .venv/bin/python docs/quantize_figures.py breakdown VARIANT [--batch 1]
        Where a (quantized) transformer's step goes: torch.profiler's self CPU time per op for one call, one
        thread; then what was measured to cut the rest on DiT-XL/2 shapes (bf16 attention, GELU in its sigmoid
        form, static activation scales, q/k/v fused into one int8 GEMM), each against the path it would replace.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings


def sqnr(ref, out) -> float:
    import torch

    ref, out = ref.double(), out.double()
    return round(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()).item(), 2)


def kernels(rounds: int) -> None:
    import torch
    import torch.nn.functional as F

    from ditkit.nn.quantized import int8_rows

    warnings.filterwarnings("ignore")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    torch.manual_seed(0)
    d, h, t = 1152, 4608, 512
    w1, w2, x = torch.randn(h, d) * 0.02, torch.randn(d, h) * 0.02, torch.randn(t, d)

    def ao(w, per_channel):
        m = DynamicQuantizedLinear(w.shape[1], w.shape[0], bias_=False)
        if per_channel:
            q, s = int8_rows(w)
            qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(w.shape[0], dtype=torch.long), 0)
        else:
            qw = torch.quantize_per_tensor(w, float(w.abs().max() / 127), 0, torch.qint8)
        m.set_weight_bias(qw, None)
        return m

    def int_mm(v, q, s):
        a = v.abs().amax(1, keepdim=True) / 127
        return torch._int_mm(torch.round(v / a).clamp(-127, 127).to(torch.int8), q.t()).float() * a * s

    (q1, s1), (q2, s2) = int8_rows(w1), int8_rows(w2)
    a1, a2, c1, c2 = ao(w1, False), ao(w2, False), ao(w1, True), ao(w2, True)
    paths = {
        "fp32": lambda v: F.gelu(v @ w1.t()) @ w2.t(),
        "torch.ao per-tensor": lambda v: a2(F.gelu(a1(v))),
        "torch.ao per-channel": lambda v: c2(F.gelu(c1(v))),
        "torch._int_mm": lambda v: int_mm(F.gelu(int_mm(v, q1, s1)), q2, s2),
        "torch._weight_int8pack_mm": lambda v: torch._weight_int8pack_mm(
            F.gelu(torch._weight_int8pack_mm(v, q1, s1)), q2, s2),
    }
    ref = paths["fp32"](x)
    times = {k: [] for k in paths}
    for r in range(rounds):
        for k, f in paths.items():
            t0 = time.perf_counter()
            f(x)
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["fp32"][1:])
    for k, f in paths.items():
        med = statistics.median(times[k][1:])  # round 0 is the warm-up
        print(json.dumps({"path": k, "median_ms": round(1000 * med, 1), "ratio": round(med / base, 2),
                          "sqnr_db": None if k == "fp32" else sqnr(ref, f(x))}), flush=True)


def engines(rounds: int) -> None:
    import torch
    import torch.nn.functional as F

    from ditkit.nn.quantized import int8_rows

    warnings.filterwarnings("ignore")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    torch.set_num_threads(1)
    torch.manual_seed(0)

    def packed(w, engine):
        previous, torch.backends.quantized.engine = torch.backends.quantized.engine, engine
        try:
            m = DynamicQuantizedLinear(w.shape[1], w.shape[0])
            q, s = int8_rows(w)
            m.set_weight_bias(torch._make_per_channel_quantized_tensor(
                q, s.double(), torch.zeros(w.shape[0], dtype=torch.long), 0), torch.zeros(w.shape[0]))
        finally:
            torch.backends.quantized.engine = previous
        return m

    shapes = {"attn q/k/v/out (512 x 1152 -> 1152)": (512, 1152, 1152), "ff up (512 x 1152 -> 4608)": (512, 1152, 4608),
              "ff down (512 x 4608 -> 1152)": (512, 4608, 1152), "adaLN modulation (2 x 1152 -> 6912)": (2, 1152, 6912),
              "small (32 x 128 -> 512)": (32, 128, 512), "small (32 x 128 -> 128)": (32, 128, 128)}
    for name, (m_rows, k, n) in shapes.items():
        w, x, bias = torch.randn(n, k) * 0.02, torch.randn(m_rows, k), torch.zeros(n)
        paths = {"fp32": lambda v: F.linear(v, w, bias), "fbgemm": packed(w, "fbgemm"), "onednn": packed(w, "onednn")}
        reps = max(1, int(2e8 // (m_rows * k * n)))  # calls per timing: small layers need many
        times = {p: [] for p in paths}
        for _ in range(rounds):
            for p, f in paths.items():
                t0 = time.process_time()
                for _ in range(reps):
                    f(x)
                times[p].append((time.process_time() - t0) / reps)
        base = statistics.median(times["fp32"][1:])  # round 0 is the warm-up
        print(json.dumps({"layer": name, **{p: {"median_ms": round(1000 * statistics.median(v[1:]), 3),
                                                "ratio": round(statistics.median(v[1:]) / base, 3)}
                                            for p, v in times.items()}}), flush=True)


def tiny_digits(n: int, variants: list[str], out: str) -> None:
    from ditkit.formats.layouts import save_quantized
    from ditkit.formats.layouts import load_bundle
    from ditkit.ops.generate import GenerateConfig, generate
    from ditkit.ops.quantize import QuantizeConfig, quantize

    gcfg = GenerateConfig(num_images=n, batch_size=50, seed=0)

    def judged(path) -> dict:
        _, rep = generate(load_bundle(path), gcfg)
        return rep.judge

    for spec in variants:
        if spec == "base":
            print(json.dumps({"variant": "base", "judge": judged("tiny-digits")}), flush=True)
            continue
        scheme, modulation, sensitive = (spec.split(":") + [None, None])[:3]
        base = load_bundle("tiny-digits")
        variant, rep = quantize(base, QuantizeConfig(scheme=scheme, modulation=modulation,
                                                     sensitive=sensitive or "int8-in-blocks"))
        path = f"{out}/{spec.replace(':', '_')}"
        save_quantized(variant, path, lambda nb: (rep.set_disk_after(nb),
                                                  {"op": "quantize", "defaults": base.manifest["defaults"]})[1],
                       force=True)
        print(json.dumps({"variant": spec, "disk_bytes_before": rep.disk_bytes_before,
                          "disk_bytes_after": rep.disk_bytes_after, "disk_ratio": rep.disk_ratio,
                          "memory_ratio": rep.memory_ratio, "sqnr_db": rep.sqnr_db,
                          "sqnr_db_min_layer": rep.sqnr_db_min_layer, "worst_layer": rep.worst_layer,
                          "judge": judged(path)}), flush=True)


def latency(base_path: str, variant_path: str, rounds: int, batch: int) -> None:
    import torch

    from ditkit.formats.layouts import load_bundle

    a, b = load_bundle(base_path), load_bundle(variant_path)
    fam = a.family
    x, t, c = fam.dummy_inputs(a.transformer, batch, seed=0)
    times = {"base": [], "variant": []}
    with torch.no_grad():
        ya, yb = fam.predict(a.transformer, x, t, c), fam.predict(b.transformer, x, t, c)  # warm-up
        for _ in range(rounds):
            for name, bundle in (("base", a), ("variant", b)):
                t0 = time.perf_counter()
                fam.predict(bundle.transformer, x, t, c)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"batch": batch, "threads": torch.get_num_threads(), "median_s": med,
                      "ratio": round(med["variant"] / med["base"], 3), "sqnr_db": sqnr(ya, yb),
                      "rounds_s": times}), flush=True)


def _cpu_ms(fn, n: int = 20) -> float:
    fn(), fn()
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1000


def breakdown(variant_path: str, batch: int) -> None:
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from ditkit.formats.layouts import load_bundle

    torch.set_num_threads(1)
    b = load_bundle(variant_path)
    fam, tr = b.family, b.transformer
    x, t, c = fam.dummy_inputs(tr, batch, seed=0)
    with torch.no_grad():
        fam.predict(tr, x, t, c)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fam.predict(tr, x, t, c)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    print(json.dumps({"model": variant_path, "batch": batch, "total_ms": round(total / 1000, 1), "ops": [
        {"op": e.key, "ms": round(e.self_cpu_time_total / 1000, 1), "share": round(e.self_cpu_time_total / total, 3),
         "calls": e.count} for e in rows[:8]]}), flush=True)
    # the fp32 remainder, on DiT-XL/2's shapes at batch 1 with guidance (2 rows x 256 tokens)
    q, k, v = (torch.randn(2, 16, 256, 72) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    print(json.dumps({"attention_fp32_ms": round(_cpu_ms(lambda: F.scaled_dot_product_attention(q, k, v)), 2),
                      "attention_bf16_ms": round(_cpu_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb)), 2),
                      "attention_bf16_sqnr_db": sqnr(ref, F.scaled_dot_product_attention(qb, kb, vb).float())}))
    h = torch.randn(512, 4608)
    a = 0.7978845608028654 * 2  # gelu_tanh(x) = x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), exactly

    def sigmoid_form():
        u = h * h
        return u.mul_(0.044715 * a).add_(a).mul_(h).sigmoid_().mul_(h)
    print(json.dumps({"gelu_tanh_ms": round(_cpu_ms(lambda: F.gelu(h, approximate="tanh")), 2),
                      "gelu_sigmoid_form_ms": round(_cpu_ms(sigmoid_form), 2),
                      "gelu_max_abs_diff": float((F.gelu(h, approximate="tanh") - sigmoid_form()).abs().max())}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic
    torch.backends.quantized.engine = "onednn"
    seq = lambda o: quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(1152, o)), {torch.nn.Linear},  # noqa: E731
                                     dtype=torch.qint8)
    three, one, x2 = [seq(1152) for _ in range(3)], seq(3456), torch.randn(512, 1152)
    # static activation scales: the input quantized once (calibrated scale), int8 in and out, against dynamic
    w = torch.randn(4608, 1152)
    qw = torch.quantize_per_channel(w, w.abs().amax(1) / 127, torch.zeros(4608, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, torch.zeros(4608))
    qx = torch.quantize_per_tensor(x2, float(x2.abs().max() / 127), 0, torch.quint8)
    print(json.dumps({"ff_up_dynamic_int8_ms": round(_cpu_ms(lambda: torch.ops.quantized.linear_dynamic(
                          x2, packed, True)), 2),
                      "ff_up_static_int8_ms": round(_cpu_ms(lambda: torch.ops.quantized.linear(qx, packed, 0.05, 64)), 2)}))
    print(json.dumps({"qkv_three_int8_ms": round(_cpu_ms(lambda: [m(x2) for m in three]), 2),
                      "qkv_fused_int8_ms": round(_cpu_ms(lambda: one(x2)), 2),
                      "qkv_fused_fp32_ms": round(_cpu_ms(lambda: torch.nn.functional.linear(
                          x2, torch.randn(3456, 1152))), 2)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--rounds", type=int, default=7)
    e = sub.add_parser("engines")
    e.add_argument("--rounds", type=int, default=8)
    td = sub.add_parser("tiny-digits")
    td.add_argument("n", type=int)
    td.add_argument("variants", nargs="+")
    td.add_argument("--out", default="out/quantize-figures")
    lat = sub.add_parser("latency")
    lat.add_argument("base")
    lat.add_argument("variant")
    lat.add_argument("--rounds", type=int, default=5)
    lat.add_argument("--batch", type=int, default=1)
    br = sub.add_parser("breakdown")
    br.add_argument("variant")
    br.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    if args.what == "kernels":
        kernels(args.rounds)
    elif args.what == "engines":
        engines(args.rounds)
    elif args.what == "tiny-digits":
        tiny_digits(args.n, args.variants, args.out)
    elif args.what == "breakdown":
        breakdown(args.variant, args.batch)
    else:
        latency(args.base, args.variant, args.rounds, args.batch)


if __name__ == "__main__":
    main()
