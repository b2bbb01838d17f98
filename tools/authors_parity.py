"""Print the figures of docs/formats.md and docs/lora.md for the authors' layouts: each tiny fixture of
tests/authors_fixtures.py read by ditkit against the diffusers model it was written from, the DiT against the
authors' forward, and each foreign LoRA against merging it into the authors' weights.

    .venv/bin/python tools/authors_parity.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import authors_fixtures as F  # noqa: E402
import test_authors as TA  # noqa: E402
import test_authors_lora as TL  # noqa: E402
from ditkit.formats.layouts import load_bundle  # noqa: E402
from ditkit.formats.lora import load_adapter  # noqa: E402
from ditkit.ops.lora.adapters import apply_lora  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def main() -> None:
    root = Path(tempfile.mkdtemp())
    print("| file | layout | max abs vs the diffusers model it was written from (DiT: run with the authors' shift) |")
    print("|---|---|---|")
    for name, (ref, write, suffix, layout) in TA.CASES.items():
        path = root / f"{name}{suffix}"
        write(path)
        b = load_bundle(path)
        got, want = TA.outputs(b.family, b.transformer, TA.as_authors(ref, layout))
        print(f"| {name} | {b.kind} | {float((got - want).abs().max()):.2e} |")
    sd = torch.load(root / "dit-s-pt.pt", weights_only=True)
    x, t, y = TA.dit_inputs(TA.CASES["dit-s-pt"][0])
    want = F.dit_forward(sd, x, t, y, heads=6)
    b = load_bundle(root / "dit-s-pt.pt")
    print(f"\nDiT vs the authors' forward: ditkit {float((TA.raw(b.transformer, x, t, y) - want).abs().max()):.2e}, "
          f"diffusers' class as is {float((TA.raw(TA.CASES['dit-s-pt'][0], x, t, y) - want).abs().max()):.3g} "
          f"(output max |.| {float(want.abs().max()):.3g})")
    print("\n| LoRA | max abs vs merged into the authors' weights | LoRA effect |")
    print("|---|---|---|")
    for name, (make, writer, layout, modules, style, alpha) in TL.CASES.items():
        model = make()
        orig = writer(model)
        targets = TL.write_lora(root / f"{name}.safetensors", style, orig, modules, alpha)
        ckpt = root / f"{name}-model.safetensors"
        save_file({k: v.contiguous() for k, v in orig.items()}, str(ckpt))
        ad = load_adapter(root / f"{name}.safetensors")
        ref = TL.merged_reference(layout, orig, targets, ad.scale)
        b = apply_lora(load_bundle(ckpt), ad)
        xx, tt, cond = b.family.dummy_inputs(ref, 2, seed=1)
        with torch.no_grad():
            got = b.family.predict(b.transformer, xx, tt, cond, 3.5)
            want = b.family.predict(ref, xx, tt, cond, 3.5)
            base = b.family.predict(model, xx, tt, cond, 3.5)
        print(f"| {name} | {float((got - want).abs().max()):.2e} | {float((base - want).abs().max()):.3g} |")

    print("\n| ditkit `--format original` | max abs: merged as ComfyUI does vs ditkit's adapter | read back by ditkit | LoRA effect |")
    print("|---|---|---|---|")
    for family in TL.WRITERS:
        (root / family).mkdir()
        orig, ckpt, ad = TL.original_case(family, root / family)
        want, got, again, base = TL.original_outputs(orig, ckpt, ad, root / family / "o.safetensors")
        print(f"| {family} | {float((got - want).abs().max()):.2e} | {float((again - got).abs().max()):.2e} | "
              f"{float((base - got).abs().max()):.3g} |")

if __name__ == "__main__":
    main()
