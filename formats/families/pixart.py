"""pixart: PixArtTransformer2DModel (PixArt-alpha and -sigma), T5 text embeddings."""
from __future__ import annotations

import torch

from .base import Family, split_learned_sigma


class PixArtFamily(Family):
    def encode_prompts(self, pipe, prompts, device):
        pe, pm, npe, npm = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="",
                                              device=device, max_sequence_length=pipe.tokenizer.model_max_length
                                              if pipe.tokenizer.model_max_length < 10**6 else 120)
        return ({"prompt_embeds": pe, "prompt_attention_mask": pm},
                {"prompt_embeds": npe, "prompt_attention_mask": npm})

    def dummy_cond(self, transformer, batch, generator):
        d = transformer.config.caption_channels
        return {
            "prompt_embeds": torch.randn(batch, 8, d, generator=generator),
            "prompt_attention_mask": torch.ones(batch, 8, dtype=torch.long),
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
)
