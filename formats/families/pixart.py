"""pixart: PixArtTransformer2DModel (PixArt-alpha and -sigma), T5 text embeddings."""
from __future__ import annotations

import torch

from .base import Family, split_learned_sigma
from .coupling import TB, WidthSpec, attn, ff, linear, mlp2

WIDTH = WidthSpec(rules=(
    *linear(r"^pos_embed\.proj", None, "D:res"),
    # the timestep embedding is added to the final (2, D) scale-shift table: it lives in the residual space
    *mlp2(r"^adaln_single\.emb\.timestep_embedder", "D:thid", "D:res"),
    *linear(r"^adaln_single\.linear", "D:res", "D:res"),
    *mlp2(r"^caption_projection", "D:caphid", "D:cap"),
    (r"^(transformer_blocks\.\d+\.)?scale_shift_table$", 1, ("D:res",)),
    *attn(rf"{TB}\.attn1", "D:res", "D:res", "H:attn1.{b}", "D:res"),
    *attn(rf"{TB}\.attn2", "D:res", "D:cap", "H:attn2.{b}", "D:res"),
    *ff(rf"{TB}\.ff", "D:res", "F:ff{b}"),
    *linear(r"^proj_out", "D:res", None),
), sincos_residual=True, width_fields=("cross_attention_dim",))


class PixArtFamily(Family):
    def encode_prompts(self, pipe, prompts, device):
        pe, pm, npe, npm = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="",
                                              device=device, max_sequence_length=pipe.tokenizer.model_max_length
                                              if pipe.tokenizer.model_max_length < 10**6 else 120)
        return ({"prompt_embeds": pe, "prompt_attention_mask": pm},
                {"prompt_embeds": npe, "prompt_attention_mask": npm})

    def width_unsupported(self, transformer):
        if getattr(transformer, "use_additional_conditions", False):
            return "PixArt models with resolution / aspect-ratio embeddings (PixArt-alpha 1024) split D into thirds"
        return None

    def dummy_cond(self, transformer, batch, generator, tokens=8):
        d = transformer.config.caption_channels
        return {
            "prompt_embeds": torch.randn(batch, tokens, d, generator=generator),
            "prompt_attention_mask": torch.ones(batch, tokens, dtype=torch.long),
        }

    def predict(self, transformer, latents, t, cond, guidance=1.0):
        b, _, h, w = latents.shape
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(transformer, "use_additional_conditions", False):
            # PixArt-alpha 1024 conditions on the image size in pixels (8x the latent)
            hw = torch.tensor([[h * 8.0, w * 8.0]], device=latents.device, dtype=latents.dtype).repeat(b, 1)
            added = {"resolution": hw, "aspect_ratio": (hw[:, :1] / hw[:, 1:])}
        out = transformer(
            latents,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond.get("prompt_attention_mask"),
            timestep=t,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return split_learned_sigma(out, latents.shape[1])

    def tiny_config(self):
        return dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                    sample_size=8, patch_size=2, cross_attention_dim=32, caption_channels=24,
                    norm_type="ada_norm_single", num_embeds_ada_norm=1000)


FAMILY = PixArtFamily(
    name="pixart",
    transformer_class="PixArtTransformer2DModel",
    pipeline_class="PixArtAlphaPipeline",
    conditioning="text",
    prediction="epsilon",
    samplers=("dpm++", "ddim", "euler"),
    default_sampler="dpm++",
    default_steps=20,
    default_guidance=4.5,
    blocks_attr="transformer_blocks",
    full_precision=(r"^pos_embed\.", r"^adaln_single\.", r"^caption_projection\.", r"^proj_out$"),
    modulation=(r"^adaln_single\.linear$",),
    width=WIDTH,
    gguf_keep_float=("pos_embed.", "adaln_single.", "caption_projection.", "proj_out."),
)
