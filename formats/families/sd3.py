"""sd3: SD3Transformer2DModel (MMDiT), flow matching, pooled + sequence text embeddings."""
from __future__ import annotations


import torch

from .base import ContextPlan, Family, Stack
from .keys import _BLOCK, _SINGLE, _WB, SWAP  # noqa: F401 - used by the key table
from .coupling import WidthSpec

WIDTH = WidthSpec(
    unwrapped=((r"pos_embed\.pos_embed", 2),),  # the stored (1, tokens, D) position table (a buffer)
    sincos_residual=False, width_fields=("caption_projection_dim",))  # SD3 stores its (cropped) position table


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


# The authors' single-file layout, mapped by formats/original_keys.py.
SD3: list[tuple[str, str, object]] = [
    (r"^pos_embed\.pos_embed$", "pos_embed", None),
    (r"^pos_embed\.proj\." + _WB, r"x_embedder.proj.\1", None),
    (r"^time_text_embed\.timestep_embedder\.linear_1\." + _WB, r"t_embedder.mlp.0.\1", None),
    (r"^time_text_embed\.timestep_embedder\.linear_2\." + _WB, r"t_embedder.mlp.2.\1", None),
    (r"^time_text_embed\.text_embedder\.linear_1\." + _WB, r"y_embedder.mlp.0.\1", None),
    (r"^time_text_embed\.text_embedder\.linear_2\." + _WB, r"y_embedder.mlp.2.\1", None),
    (r"^context_embedder\." + _WB, r"context_embedder.\1", None),
    (r"^" + _BLOCK + r"attn\.to_q\." + _WB, r"joint_blocks.\1.x_block.attn.qkv.\2", 0),
    (r"^" + _BLOCK + r"attn\.to_k\." + _WB, r"joint_blocks.\1.x_block.attn.qkv.\2", 1),
    (r"^" + _BLOCK + r"attn\.to_v\." + _WB, r"joint_blocks.\1.x_block.attn.qkv.\2", 2),
    (r"^" + _BLOCK + r"attn\.add_q_proj\." + _WB, r"joint_blocks.\1.context_block.attn.qkv.\2", 0),
    (r"^" + _BLOCK + r"attn\.add_k_proj\." + _WB, r"joint_blocks.\1.context_block.attn.qkv.\2", 1),
    (r"^" + _BLOCK + r"attn\.add_v_proj\." + _WB, r"joint_blocks.\1.context_block.attn.qkv.\2", 2),
    (r"^" + _BLOCK + r"attn\.norm_q\.weight$", r"joint_blocks.\1.x_block.attn.ln_q.weight", None),
    (r"^" + _BLOCK + r"attn\.norm_k\.weight$", r"joint_blocks.\1.x_block.attn.ln_k.weight", None),
    (r"^" + _BLOCK + r"attn\.norm_added_q\.weight$", r"joint_blocks.\1.context_block.attn.ln_q.weight", None),
    (r"^" + _BLOCK + r"attn\.norm_added_k\.weight$", r"joint_blocks.\1.context_block.attn.ln_k.weight", None),
    (r"^" + _BLOCK + r"attn\.to_out\.0\." + _WB, r"joint_blocks.\1.x_block.attn.proj.\2", None),
    (r"^" + _BLOCK + r"attn\.to_add_out\." + _WB, r"joint_blocks.\1.context_block.attn.proj.\2", None),
    (r"^" + _BLOCK + r"attn2\.to_q\." + _WB, r"joint_blocks.\1.x_block.attn2.qkv.\2", 0),
    (r"^" + _BLOCK + r"attn2\.to_k\." + _WB, r"joint_blocks.\1.x_block.attn2.qkv.\2", 1),
    (r"^" + _BLOCK + r"attn2\.to_v\." + _WB, r"joint_blocks.\1.x_block.attn2.qkv.\2", 2),
    (r"^" + _BLOCK + r"attn2\.norm_q\.weight$", r"joint_blocks.\1.x_block.attn2.ln_q.weight", None),
    (r"^" + _BLOCK + r"attn2\.norm_k\.weight$", r"joint_blocks.\1.x_block.attn2.ln_k.weight", None),
    (r"^" + _BLOCK + r"attn2\.to_out\.0\." + _WB, r"joint_blocks.\1.x_block.attn2.proj.\2", None),
    (r"^" + _BLOCK + r"norm1\.linear\." + _WB, r"joint_blocks.\1.x_block.adaLN_modulation.1.\2", None),
    # the last block's context stream ends in a continuous adaLN (diffusers: scale, shift); the others do not
    (r"^" + _BLOCK + r"norm1_context\.linear\." + _WB, r"joint_blocks.\1.context_block.adaLN_modulation.1.\2",
     "swap-if-last"),
    (r"^" + _BLOCK + r"ff\.net\.0\.proj\." + _WB, r"joint_blocks.\1.x_block.mlp.fc1.\2", None),
    (r"^" + _BLOCK + r"ff\.net\.2\." + _WB, r"joint_blocks.\1.x_block.mlp.fc2.\2", None),
    (r"^" + _BLOCK + r"ff_context\.net\.0\.proj\." + _WB, r"joint_blocks.\1.context_block.mlp.fc1.\2", None),
    (r"^" + _BLOCK + r"ff_context\.net\.2\." + _WB, r"joint_blocks.\1.context_block.mlp.fc2.\2", None),
    (r"^proj_out\." + _WB, r"final_layer.linear.\1", None),
    (r"^norm_out\.linear\." + _WB, r"final_layer.adaLN_modulation.1.\1", SWAP),
]


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
    cache_probe="attn",  # the joint attention of the first block reads the modulated image stream
    original_layout=("stability-sd3", SD3),  # Stability's keys (sd3_medium.safetensors, SD3.5)
    gguf_keep_float=("x_embedder.", "t_embedder.", "y_embedder.", "context_embedder.", "final_layer.", "pos_embed"),
    # joint attention: the image keys first, the text keys after them; SD3.5's attn2 is image self-attention
    context_plan=ContextPlan(attention=r"\.attn2?$", text="last"),
)
