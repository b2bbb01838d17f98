"""sd3: SD3Transformer2DModel (MMDiT), flow matching, pooled + sequence text embeddings."""
from __future__ import annotations

import torch

from .base import Family, Stack
from .coupling import TB, WidthSpec, attn, ff, linear, mlp2

WIDTH = WidthSpec(rules=(
    *linear(r"^pos_embed\.proj", None, "D:res"),
    (r"^pos_embed\.pos_embed$", 2, ("D:res",)),
    *mlp2(r"^time_text_embed\.timestep_embedder", "D:thid", "D:cond"),
    *mlp2(r"^time_text_embed\.text_embedder", "D:phid", "D:cond"),
    *linear(r"^context_embedder", None, "D:ctx"),
    *linear(rf"{TB}\.norm1\.linear", "D:cond", "D:res"),
    *linear(rf"{TB}\.norm1_context\.linear", "D:cond", "D:ctx"),
    *attn(rf"{TB}\.attn", "D:res", "D:res", "H:attn.{b}", "D:res", added="D:ctx"),
    *ff(rf"{TB}\.ff", "D:res", "F:ff{b}"),
    *ff(rf"{TB}\.ff_context", "D:ctx", "F:ffc{b}"),
    *linear(r"^norm_out\.linear", "D:cond", "D:res"),
    *linear(r"^proj_out", "D:res", None),
), sincos_residual=False, width_fields=("caption_projection_dim",))  # SD3 stores its (cropped) position table


class SD3Family(Family):
    def encode_prompts(self, pipe, prompts, device):
        pe, npe, pp, npp = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=True,
                                              negative_prompt="")
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pp}, {"prompt_embeds": npe, "pooled_prompt_embeds": npp}

    def depth_config(self, transformer, renumber):
        dual = transformer.config.get("dual_attention_layers")
        if not dual:
            return {}
        kept = renumber["transformer_blocks"]  # SD3.5: indices of the blocks with a second attention follow them
        return {"dual_attention_layers": tuple(kept[i] for i in dual if i in kept)}

    def width_unsupported(self, transformer):
        if transformer.config.get("dual_attention_layers"):
            return "SD3.5 blocks with a second attention (dual_attention_layers)"
        return None

    def dummy_cond(self, transformer, batch, generator, tokens=8):
        c = transformer.config
        return {
            "prompt_embeds": torch.randn(batch, tokens, c.joint_attention_dim, generator=generator),
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

    def tiny_config(self):
        return dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                    pooled_projection_dim=16, pos_embed_max_size=16)


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
    # the last block is built differently (context_pre_only), so depth pruning keeps it
    stacks=(Stack("transformer_blocks", "num_layers", keep_last=True),),
    width=WIDTH,
    two_stream=True,
)
