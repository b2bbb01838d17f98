#!/usr/bin/env python
"""Rank ablation of a --as-lora run: its EMA Linear weights (the full student) against base + SVD LoRA."""
import copy, sys, json, time, torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from ditkit.formats.layouts import load_bundle
from ditkit.formats.lora import load_adapter
from ditkit.ops.distill.as_lora import delta_adapter
from ditkit.ops.lora import apply_lora
from ditkit.ops.generate import GenerateConfig, generate
from ditkit.ops.metrics import psnr
ckpt, lora = sys.argv[1], sys.argv[2]
info = load_adapter(lora).info
base = load_bundle('tiny-digits')
student = copy.deepcopy(base)
ema = load_file(f"{ckpt}/checkpoint/ema.safetensors")
with torch.no_grad():
    sd = dict(student.transformer.named_parameters())
    for k, v in ema.items():
        sd[k].copy_(v)
cfg = GenerateConfig(num_images=100, seed=0, batch_size=50)
full = load_bundle('tiny-digits'); full.transformer = student.transformer
ad0 = load_adapter(lora)
ad0.A = {m: torch.zeros_like(a) for m, a in ad0.A.items()}  # sampler settings only
apply_lora(full, ad0)
ref, rep = generate(full, cfg)
print(json.dumps({"rank": "full student", "steps": rep.steps, "accuracy": rep.judge["accuracy"], "fd": round(rep.judge["fd"], 2)}), flush=True)
for r in map(int, sys.argv[3:]):
    b = load_bundle('tiny-digits')
    ad, er = delta_adapter(b.transformer, student.transformer, r, family="dit")
    ad.info.update({k: info[k] for k in ("sampler_defaults", "scheduler")})
    apply_lora(b, ad)
    im, rep = generate(b, cfg)
    print(json.dumps({"rank": r, "params": er["params"], "bytes_fp32": 4 * er["params"], "relative_error": er["relative_error"],
                      "steps": rep.steps, "accuracy": rep.judge["accuracy"], "fd": round(rep.judge["fd"], 2),
                      "psnr_vs_student": round(psnr(im, ref), 2)}), flush=True)
