#!/usr/bin/env python
"""CPU ms per image (batch 1, one thread) of base + student LoRA (unfused, fused) vs the base at its defaults."""
import sys, time, json, torch
torch.set_num_threads(1)
from ditkit.formats.layouts import load_bundle
from ditkit.formats.lora import load_adapter
from ditkit.ops.lora import apply_lora, fuse_lora
from ditkit.ops.bench.subjects import _Subject
from ditkit.ops.bench.report import BenchConfig
ad = load_adapter(sys.argv[1])
base = load_bundle('tiny-digits')
lora = load_bundle('tiny-digits'); apply_lora(lora, ad)
fused = fuse_lora(lora, ad); fused.transformer.requires_grad_(False)
calls = {n: _Subject(n, b, BenchConfig(), "cpu", torch.float32, None).image_call(1) for n, b in
         (("base", base), ("lora", lora), ("fused", fused))}
ts = {n: [] for n in calls}
with torch.inference_mode():
    for f in calls.values(): f()
    for _ in range(15):
        for n, f in calls.items():
            t0 = time.process_time(); f(); ts[n].append(1e3 * (time.process_time() - t0))
med = {n: sorted(v)[len(v) // 2] for n, v in ts.items()}
print(json.dumps({n: round(m, 2) for n, m in med.items()} | {"speedup_lora": round(med["base"] / med["lora"], 2), "speedup_fused": round(med["base"] / med["fused"], 2)}))
