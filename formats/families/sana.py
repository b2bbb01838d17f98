"""sana: SanaTransformer2DModel (Sana, Sana 1.5, SANA-Sprint), linear self-attention, Gemma-2 text embeddings.

Flow matching with the usual time convention (noise at sigma = 1): the transformer takes the sampler's timestep
(sigma x 1000) times `timestep_scale`, as SanaPipeline passes it, and predicts the velocity. Conditioning is the
Gemma-2 hidden states and their mask (precomputed: no text encoder ships here). SANA-Sprint checkpoints
(guidance_embeds) take the guidance scale as an input embedding (x guidance_embeds_scale) instead of a second,
unconditional call. The autoencoder is DC-AE (AutoencoderDC, 32x); the sampler and the VAE helpers read its
scale from the VAE config.

Width pruning cuts the GLUMBConv MLPs' hidden channels only (WidthSpec.mlp_only): GLUMBConv is a 1x1 conv to
2 x h channels (value and gate halves), a depthwise 3x3 on those 2 x h, a chunk into the two halves, value x
SiLU(gate), and a 1x1 conv back from h. Kept unit k takes the inverted conv's output rows k and h + k, the
depthwise conv's channels k and h + k, and the pointwise conv's input column k (Torch-Pruning's dependency graph
finds this from the chunk; ops/prune/graph.py keeps a conv's channel split as one). The new h is written as a
float mlp_ratio (h = int(mlp_ratio x D)). Heads and the width D stay: a head cut must cut D (D = heads x
attention_head_dim), and Sana's cross-attention has its own head count and head size
(num_cross_attention_heads x cross_attention_head_dim) beside the linear self-attention's; not done.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Family, encode_masked, masked_text_cond, split_learned_sigma
from .coupling import WidthSpec


class SanaFamily(Family):
    def encode_prompts(self, pipe, prompts, device):
        return encode_masked(pipe, prompts, device)

    def uses_cfg(self, transformer, guidance):
        return guidance > 1.0 and not transformer.config.get("guidance_embeds", False)

    def mlp_hidden(self, transformer):
        return int(self.blocks(transformer)[0].ff.conv_point.in_channels)

    def mlp_config(self, transformer, hidden):
        d = self.hidden_size(transformer)
        # GLUMBConv: hidden = int(mlp_ratio x D); hidden / D unless float rounding floors it below
        ratio = next((r for r in (hidden / d, (hidden + 0.5) / d) if int(r * d) == hidden), None)
        if ratio is None:
            raise ConfigError(f"mlp_ratio cannot write an MLP width of {hidden} at width {d}")
        return {"mlp_ratio": ratio}

    def dummy_cond(self, transformer, batch, generator, tokens=8):
        return masked_text_cond(batch, tokens, transformer.config.caption_channels, generator)

    def predict(self, transformer, latents, t, cond, guidance=1.0):
        c = transformer.config
        g = None
        if c.get("guidance_embeds", False):  # SANA-Sprint
            g = torch.full((latents.shape[0],), float(guidance) * c.guidance_embeds_scale,
                           device=latents.device, dtype=latents.dtype)
        out = transformer(
            hidden_states=latents,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond.get("prompt_attention_mask"),
            timestep=(t * c.timestep_scale).to(latents.dtype),
            guidance=g,
            return_dict=False,
        )[0]
        return split_learned_sigma(out, latents.shape[1])

    def tiny_config(self):
        return dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                    num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
                    caption_channels=24, mlp_ratio=2.5, sample_size=8, patch_size=1)


FAMILY = SanaFamily(
    name="sana",
    transformer_class="SanaTransformer2DModel",
    pipeline_class="SanaPipeline",
    conditioning="text",
    prediction="flow",
    samplers=("flow-euler",),
    default_sampler="flow-euler",
    default_steps=20,
    default_guidance=4.5,
    blocks_attr="transformer_blocks",
    mlp_types=(),  # GLUMBConv: convolutions, no Linear for LoRA's mlp target
    width=WidthSpec(sincos_residual=False, patch_embed="patch_embed.proj",
                    mlp_only="a head cut would cut the width D, and the cross-attention has its own head count and "
                             "size; not done"),
    block_returns=(0, None),  # SanaTransformerBlock returns the hidden states alone; diffusers' hooks do not list it
    # patch embedder, timestep adaLN-single, caption projection + norm, the final projection
    full_precision=(r"^patch_embed\.", r"^time_embed\.", r"^caption_projection\.", r"^caption_norm$", r"^proj_out$"),
    modulation=(r"^time_embed\.linear$",),
    vae_scale_fallback=32,  # DC-AE
    gguf_keep_float=("patch_embed.", "time_embed.", "caption_projection.", "caption_norm.", "proj_out.",
                     "scale_shift_table"),
)
