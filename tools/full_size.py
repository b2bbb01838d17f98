"""Write a full-size checkpoint with random weights in its authors' layout (documented as such in
docs/benchmarks.md), plus precomputed text embeddings of the model's shapes:

- pixart-xl-2-1024-ms: PixArt-XL-2-1024-MS (611M) as PixArt's `.pth` (`{"state_dict": ...}`), T5-shaped embeddings;
- flux-3072-2x2: Flux.1-dev's real width 3072 (24 heads of 128, guidance embedding) with 2 double and 2 single
  blocks of its 19 and 38, as Black Forest Labs' single `.safetensors` (`flux1-dev.safetensors` keys);
- sd3-medium: SD3-medium (2.03B, 24 joint blocks, width 1536) as Stability's single `.safetensors`
  (`model.diffusion_model.` prefix, as `sd3_medium.safetensors` ships).

    .venv/bin/python tools/full_size.py NAME OUT_DIR
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
    "flux-3072-2x2": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                          guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
}
# name -> (diffusers class, authors' layout, file suffix, prefix of the shipped file, text embedding shapes)
KINDS = {
    "pixart-xl-2-1024-ms": ("PixArtTransformer2DModel", "pixart-original", ".pth", "", {"prompt": 4096}),
    "flux-3072-2x2": ("FluxTransformer2DModel", "bfl-flux", ".safetensors", "", {"prompt": 4096, "pooled": 768}),
    "sd3-medium": ("SD3Transformer2DModel", "stability-sd3", ".safetensors", "model.diffusion_model.",
                   {"prompt": 4096, "pooled": 2048}),
}


def main(name: str, out: Path) -> None:
    import diffusers

    from ditkit.formats import authors
    from ditkit.formats.embeddings import save_embeddings

    from safetensors.torch import save_file

    cls, layout, suffix, prefix, dims = KINDS[name]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = getattr(diffusers, cls)(**CONFIGS[name]).eval()
    state = authors.write(layout, model)  # the authors' own keys
    n_params = sum(p.numel() for p in model.parameters())
    del model
    path = out / f"{name}{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    g = torch.Generator().manual_seed(1)

    def embeds() -> dict:
        e = {"prompt_embeds": torch.randn(2, 16, dims["prompt"], generator=g)}
        if "pooled" in dims:
            e["pooled_prompt_embeds"] = torch.randn(2, dims["pooled"], generator=g)
        else:
            e["prompt_attention_mask"] = torch.ones(2, 16, dtype=torch.long)
        return e
    save_embeddings(out / "embeddings.safetensors", ["a", "b"], embeds(), embeds())
    print(path, n_params)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
