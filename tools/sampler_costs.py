#!/usr/bin/env python
"""CPU ms (one thread, medians) of the fixed costs around a few-step sampler on tiny-digits: the VAE decode of one
latent alone and of four in one call (without oneDNN, as ops/sample.decode runs it on CPU), and what
ops/sample.row_floor adds to one transformer call (per hooked layer). docs/distill.md quotes these figures."""
import json
import statistics
import time

import torch

from ditkit.formats.layouts import load_bundle
from ditkit.ops.sample import image_noise, row_floor

torch.set_num_threads(1)


def cpu_ms(fn, n=30):
    fn()
    ts = []
    for _ in range(n):
        t = time.process_time()
        fn()
        ts.append((time.process_time() - t) * 1e3)
    return round(statistics.median(ts), 3)


b = load_bundle("tiny-digits")
fam, tr, vae = b.family, b.transformer, b.vae
for t in [*tr.parameters(), *vae.parameters()]:
    t.data = t.data.clone()  # resident, as bench does
c = tr.config
z = image_noise(0, [0], (c.in_channels, c.sample_size, c.sample_size))
t, cond = torch.tensor([500]), {"class_labels": torch.tensor([3])}


def dec(latents):
    with torch.backends.mkldnn.flags(enabled=False):
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]


with torch.no_grad():
    out = {"decode_one_latent_ms": cpu_ms(lambda: dec(z)), "decode_four_latents_ms": cpu_ms(lambda: dec(z.repeat(4, 1, 1, 1))),
           "transformer_call_ms": cpu_ms(lambda: fam.predict(tr, z, t, cond, 1.0))}
    floor = row_floor(tr).__enter__()
    fam.predict(tr, z, t, cond, 1.0)  # layers that see 16+ rows drop their hooks here
    out["hooked_layers"], out["linear_layers"] = len(floor.handles), sum(type(m) is torch.nn.Linear for m in tr.modules())
    out["transformer_call_floored_ms"] = cpu_ms(lambda: fam.predict(tr, z, t, cond, 1.0))
    floor.__exit__()
out["floor_us_per_hooked_layer"] = round(
    1e3 * (out["transformer_call_floored_ms"] - out["transformer_call_ms"]) / out["hooked_layers"], 1)
print(json.dumps(out, indent=1))
