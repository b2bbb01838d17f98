"""Full-size published architectures with random weights, for timing and memory (not for images).

    python tools/archs.py NAME --out DIR [--seed 0] [--force]

writes a bare diffusers transformer directory (config.json + safetensors) that `ditkit bench` and
`ditkit info` load like any checkpoint. Shapes follow the public configs; only the weights are random.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ditkit.formats.errors import choice_error

# name -> (diffusers class, constructor config, what it is)
ARCHS: dict[str, tuple[str, dict, str]] = {
    "dit-xl-2-256": ("DiTTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        activation_fn="gelu-approximate"),
        "DiT-XL/2 256px (facebookresearch/DiT): 28 blocks, 16 heads x 72, 32x32x4 latents, 256 tokens"),
    "pixart-alpha-512": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=64, patch_size=2, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
        activation_fn="gelu-approximate", use_additional_conditions=False, interpolation_scale=1),
        "PixArt-alpha 512px (PixArt-XL-2-512x512): 28 blocks, 16 heads x 72, 64x64x4 latents, 1024 tokens, "
        "T5 4096-d captions"),
    "pixart-alpha-1024": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=128, patch_size=2, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
        activation_fn="gelu-approximate", use_additional_conditions=True, interpolation_scale=2),
        "PixArt-alpha 1024px (PixArt-XL-2-1024-MS): 28 blocks, 16 heads x 72, 128x128x4 latents, 4096 tokens, "
        "T5 4096-d captions, resolution and aspect-ratio conditions"),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The architecture `name` with seeded random weights (the constructors' own initialisation)."""
    import diffusers

    if name not in ARCHS:
        raise choice_error("architecture", name, ARCHS)
    cls, config, _ = ARCHS[name]
    torch.manual_seed(seed)
    return getattr(diffusers, cls)(**config).eval()


def main(argv: list[str] | None = None) -> int:
    from ditkit.formats.atomic import atomic_dir

    p = argparse.ArgumentParser(prog="python tools/archs.py", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(ARCHS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    model = build(a.name, a.seed)
    with atomic_dir(a.out, force=a.force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.name}: {n / 1e6:.1f}M parameters -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
