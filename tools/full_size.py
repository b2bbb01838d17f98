"""Write a full-size checkpoint with random weights in its authors' layout (documented as such in
docs/benchmarks.md): PixArt-XL-2-1024-MS (600M) as PixArt's .pth, plus precomputed T5-shaped embeddings.

    .venv/bin/python tools/full_size.py pixart-xl-2-1024-ms OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

CONFIGS = {
    "pixart-xl-2-1024-ms": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                num_layers=28, sample_size=128, patch_size=2, cross_attention_dim=1152,
                                caption_channels=4096, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                                use_additional_conditions=True),
}


def main(name: str, out: Path) -> None:
    import diffusers

    from ditkit.formats import authors
    from ditkit.formats.embeddings import save_embeddings

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(**CONFIGS[name]).eval()
    state = authors.write("pixart-original", model)  # PixArt's own keys, as PixArtMS.py names them
    torch.save({"state_dict": state}, out / f"{name}.pth")
    g = torch.Generator().manual_seed(1)
    cond = {"prompt_embeds": torch.randn(2, 16, 4096, generator=g),
            "prompt_attention_mask": torch.ones(2, 16, dtype=torch.long)}
    unc = {"prompt_embeds": torch.randn(2, 16, 4096, generator=g),
           "prompt_attention_mask": torch.ones(2, 16, dtype=torch.long)}
    save_embeddings(out / "embeddings.safetensors", ["a", "b"], cond, unc)
    print(out / f"{name}.pth", sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
