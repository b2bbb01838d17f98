"""sd3: SD3Transformer2DModel (MMDiT), flow matching, pooled + sequence text embeddings."""
from __future__ import annotations

import torch

from .base import Family


class SD3Family(Family):
    def encode_prompts(self, pipe, prompts, device):
        pe, npe, pp, npp = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=True,
                                              negative_prompt="")
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pp}, {"prompt_embeds": npe, "pooled_prompt_embeds": npp}

    def dummy_cond(self, transformer, batch, generator):
        c = transformer.config
        return {
            "prompt_embeds": torch.randn(batch, 8, c.joint_attention_dim, generator=generator),
            "pooled_prompt_embeds": torch.randn(batch, c.pooled_projection_dim, generator=generator),
        }

    def predict(self, transformer, latents, t, cond, guidance=1.0):
        # scheduler timesteps are sigma * 1000, which is what the transformer embeds
        return transformer(
            hidden_states=latents,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            timestep=t,
            return_dict=False,
        )[0]


FAMILY = SD3Family(
    name="sd3",
    transformer_class="SD3Transformer2DModel",
    pipeline_class="StableDiffusion3Pipeline",
    conditioning="text",
    prediction="flow",
    samplers=("flow-euler",),
    default_sampler="flow-euler",
    default_steps=28,
    default_guidance=7.0,
    blocks_attr="transformer_blocks",
    full_precision=(r"^pos_embed\.", r"^time_text_embed\.", r"^context_embedder$", r"^proj_out$", r"^norm_out\."),
    modulation=(r"\.norm1(_context)?\.linear$",),
)
