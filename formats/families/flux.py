"""flux: FluxTransformer2DModel, flow matching on 2x2-packed latents, RoPE ids, guidance embedding."""
from __future__ import annotations


import torch

from .base import ContextPlan, Family, Stack
from .keys import _BLOCK, _SINGLE, _WB, SWAP  # noqa: F401 - used by the key table
from .coupling import WidthSpec

# Rotary embeddings act on the head dimension, so the residual channels are chosen by importance.
WIDTH = WidthSpec(
    patch_embed="x_embedder",
    ignored_params=(r".*\.norm_(added_)?[qk]\.weight",),  # q / k RMSNorms act on the (fixed) head_dim
    sincos_residual=False)


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape  # (B, C, h, w) -> (B, h/2 * w/2, C*4)
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape  # (B, N, C*4) -> (B, C, h, w)
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)  # (N, 3)


class FluxFamily(Family):
    def encode_prompts(self, pipe, prompts, device):
        pe, pp, _ = pipe.encode_prompt(prompts, None, device=device)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pp}, None

    def latent_channels(self, transformer):
        return transformer.config.in_channels // 4

    def latent_size(self, transformer):
        return 2 * 8  # flux has no native size in its config; 16x16 latents (128 px)

    def uses_cfg(self, transformer, guidance):
        return False  # dev folds guidance into an embedding; schnell needs none

    def image_tokens(self, transformer, hw):
        return (hw[0] // 2) * (hw[1] // 2)  # 2x2 latents packed per token

    def dummy_cond(self, transformer, batch, generator, tokens=8):
        c = transformer.config
        return {
            "prompt_embeds": torch.randn(batch, tokens, c.joint_attention_dim, generator=generator),
            "pooled_prompt_embeds": torch.randn(batch, c.pooled_projection_dim, generator=generator),
        }

    def predict(self, transformer, latents, t, cond, guidance=1.0):
        b, _, h, w = latents.shape
        emb = cond["prompt_embeds"]
        g = None
        if transformer.config.guidance_embeds:
            g = torch.full((b,), float(guidance), device=latents.device, dtype=latents.dtype)
        out = transformer(
            hidden_states=pack(latents),
            encoder_hidden_states=emb,
            pooled_projections=cond["pooled_prompt_embeds"],
            timestep=t / 1000,  # flux embeds sigma in [0, 1]
            img_ids=image_ids(h, w, latents.device, latents.dtype),
            txt_ids=torch.zeros(emb.shape[1], 3, device=latents.device, dtype=latents.dtype),
            guidance=g,
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def tiny_config(self):
        return dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16,
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6))


# The authors' single-file layout, mapped by formats/original_keys.py.
# (diffusers regex, original template, part): part = index in a dim-0 concatenation, or SWAP, or None
FLUX: list[tuple[str, str, object]] = [
    (r"^time_text_embed\.timestep_embedder\.linear_1\." + _WB, r"time_in.in_layer.\1", None),
    (r"^time_text_embed\.timestep_embedder\.linear_2\." + _WB, r"time_in.out_layer.\1", None),
    (r"^time_text_embed\.text_embedder\.linear_1\." + _WB, r"vector_in.in_layer.\1", None),
    (r"^time_text_embed\.text_embedder\.linear_2\." + _WB, r"vector_in.out_layer.\1", None),
    (r"^time_text_embed\.guidance_embedder\.linear_1\." + _WB, r"guidance_in.in_layer.\1", None),
    (r"^time_text_embed\.guidance_embedder\.linear_2\." + _WB, r"guidance_in.out_layer.\1", None),
    (r"^context_embedder\." + _WB, r"txt_in.\1", None),
    (r"^x_embedder\." + _WB, r"img_in.\1", None),
    (r"^" + _BLOCK + r"norm1\.linear\." + _WB, r"double_blocks.\1.img_mod.lin.\2", None),
    (r"^" + _BLOCK + r"norm1_context\.linear\." + _WB, r"double_blocks.\1.txt_mod.lin.\2", None),
    (r"^" + _BLOCK + r"attn\.to_q\." + _WB, r"double_blocks.\1.img_attn.qkv.\2", 0),
    (r"^" + _BLOCK + r"attn\.to_k\." + _WB, r"double_blocks.\1.img_attn.qkv.\2", 1),
    (r"^" + _BLOCK + r"attn\.to_v\." + _WB, r"double_blocks.\1.img_attn.qkv.\2", 2),
    (r"^" + _BLOCK + r"attn\.add_q_proj\." + _WB, r"double_blocks.\1.txt_attn.qkv.\2", 0),
    (r"^" + _BLOCK + r"attn\.add_k_proj\." + _WB, r"double_blocks.\1.txt_attn.qkv.\2", 1),
    (r"^" + _BLOCK + r"attn\.add_v_proj\." + _WB, r"double_blocks.\1.txt_attn.qkv.\2", 2),
    (r"^" + _BLOCK + r"attn\.norm_q\.weight$", r"double_blocks.\1.img_attn.norm.query_norm.scale", None),
    (r"^" + _BLOCK + r"attn\.norm_k\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale", None),
    (r"^" + _BLOCK + r"attn\.norm_added_q\.weight$", r"double_blocks.\1.txt_attn.norm.query_norm.scale", None),
    (r"^" + _BLOCK + r"attn\.norm_added_k\.weight$", r"double_blocks.\1.txt_attn.norm.key_norm.scale", None),
    (r"^" + _BLOCK + r"ff\.net\.0\.proj\." + _WB, r"double_blocks.\1.img_mlp.0.\2", None),
    (r"^" + _BLOCK + r"ff\.net\.2\." + _WB, r"double_blocks.\1.img_mlp.2.\2", None),
    (r"^" + _BLOCK + r"ff_context\.net\.0\.proj\." + _WB, r"double_blocks.\1.txt_mlp.0.\2", None),
    (r"^" + _BLOCK + r"ff_context\.net\.2\." + _WB, r"double_blocks.\1.txt_mlp.2.\2", None),
    (r"^" + _BLOCK + r"attn\.to_out\.0\." + _WB, r"double_blocks.\1.img_attn.proj.\2", None),
    (r"^" + _BLOCK + r"attn\.to_add_out\." + _WB, r"double_blocks.\1.txt_attn.proj.\2", None),
    (r"^" + _SINGLE + r"norm\.linear\." + _WB, r"single_blocks.\1.modulation.lin.\2", None),
    (r"^" + _SINGLE + r"attn\.to_q\." + _WB, r"single_blocks.\1.linear1.\2", 0),
    (r"^" + _SINGLE + r"attn\.to_k\." + _WB, r"single_blocks.\1.linear1.\2", 1),
    (r"^" + _SINGLE + r"attn\.to_v\." + _WB, r"single_blocks.\1.linear1.\2", 2),
    (r"^" + _SINGLE + r"proj_mlp\." + _WB, r"single_blocks.\1.linear1.\2", 3),
    (r"^" + _SINGLE + r"attn\.norm_q\.weight$", r"single_blocks.\1.norm.query_norm.scale", None),
    (r"^" + _SINGLE + r"attn\.norm_k\.weight$", r"single_blocks.\1.norm.key_norm.scale", None),
    (r"^" + _SINGLE + r"proj_out\." + _WB, r"single_blocks.\1.linear2.\2", None),
    (r"^proj_out\." + _WB, r"final_layer.linear.\1", None),
    (r"^norm_out\.linear\." + _WB, r"final_layer.adaLN_modulation.1.\1", SWAP),
]


FAMILY = FluxFamily(
    name="flux",
    transformer_class="FluxTransformer2DModel",
    pipeline_class="FluxPipeline",
    conditioning="text",
    prediction="flow",
    samplers=("flow-euler",),
    default_sampler="flow-euler",
    default_steps=28,
    default_guidance=3.5,
    blocks_attr="transformer_blocks",
    full_precision=(r"^x_embedder$", r"^time_text_embed\.", r"^context_embedder$", r"^proj_out$", r"^norm_out\."),
    modulation=(r"\.norm1(_context)?\.linear$", r"\.norm\.linear$"),
    stacks=(Stack("transformer_blocks", "num_layers"), Stack("single_transformer_blocks", "num_single_layers")),
    width=WIDTH,
    two_stream=True,
    cache_probe="attn",  # the joint attention of the first block reads the modulated image stream
    original_layout=("bfl-flux", FLUX),  # Black Forest Labs' keys (flux1-dev.safetensors)
    gguf_keep_float=("img_in.", "time_in.", "vector_in.", "guidance_in.", "txt_in.", "final_layer."),
    # the packed tokens and their RoPE ids are split where they enter the transformer, so each process rotates
    # its own positions; the joint and single blocks put the text keys first
    context_plan=ContextPlan(split="", split_inputs=(("hidden_states", 1), ("img_ids", 0)), text="first"),
)
