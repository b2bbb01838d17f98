"""pixart: PixArtTransformer2DModel (PixArt-alpha and -sigma), T5 text embeddings."""
from __future__ import annotations

import torch

from .base import ContextPlan, Family, encode_masked, masked_text_cond, split_learned_sigma
from .coupling import WidthSpec
from .keys import _BLOCK, _WB

WIDTH = WidthSpec(
    # the (2, D) final and (6, D) per-block scale-shift tables are bare parameters, pruned along D
    unwrapped=((r"(transformer_blocks\.\d+\.)?scale_shift_table", 1),),
    sincos_residual=True, width_fields=("cross_attention_dim",))


class PixArtFamily(Family):
    def encode_prompts(self, pipe, prompts, device):
        n = pipe.tokenizer.model_max_length
        return encode_masked(pipe, prompts, device, max_sequence_length=n if n < 10**6 else 120)

    def width_unsupported(self, transformer):
        if getattr(transformer, "use_additional_conditions", False):
            return "PixArt models with resolution / aspect-ratio embeddings (PixArt-alpha 1024) split D into thirds"
        return None

    def dummy_cond(self, transformer, batch, generator, tokens=8):
        return masked_text_cond(batch, tokens, transformer.config.caption_channels, generator)

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


# The authors' key layout (PixArt-alpha/sigma .pth, PixArt.py / PixArtMS.py), mapped by formats/original_keys.py
# as in diffusers' scripts/convert_pixart_alpha_to_diffusers.py. Not `original_layout`: GGUF keeps diffusers keys.
# The authors' files also hold `pos_embed` (a fixed sin-cos buffer) and `y_embedder.y_embedding` (the learned
# null caption); formats/authors.py reads and writes those two outside the table.
PIXART: list[tuple[str, str, object]] = [
    (r"^pos_embed\.proj\." + _WB, r"x_embedder.proj.\1", None),
    (r"^caption_projection\.linear_1\." + _WB, r"y_embedder.y_proj.fc1.\1", None),
    (r"^caption_projection\.linear_2\." + _WB, r"y_embedder.y_proj.fc2.\1", None),
    (r"^adaln_single\.emb\.timestep_embedder\.linear_1\." + _WB, r"t_embedder.mlp.0.\1", None),
    (r"^adaln_single\.emb\.timestep_embedder\.linear_2\." + _WB, r"t_embedder.mlp.2.\1", None),
    (r"^adaln_single\.emb\.resolution_embedder\.linear_1\." + _WB, r"csize_embedder.mlp.0.\1", None),
    (r"^adaln_single\.emb\.resolution_embedder\.linear_2\." + _WB, r"csize_embedder.mlp.2.\1", None),
    (r"^adaln_single\.emb\.aspect_ratio_embedder\.linear_1\." + _WB, r"ar_embedder.mlp.0.\1", None),
    (r"^adaln_single\.emb\.aspect_ratio_embedder\.linear_2\." + _WB, r"ar_embedder.mlp.2.\1", None),
    (r"^adaln_single\.linear\." + _WB, r"t_block.1.\1", None),
    (r"^" + _BLOCK + r"scale_shift_table$", r"blocks.\1.scale_shift_table", None),
    (r"^" + _BLOCK + r"attn1\.to_q\." + _WB, r"blocks.\1.attn.qkv.\2", 0),
    (r"^" + _BLOCK + r"attn1\.to_k\." + _WB, r"blocks.\1.attn.qkv.\2", 1),
    (r"^" + _BLOCK + r"attn1\.to_v\." + _WB, r"blocks.\1.attn.qkv.\2", 2),
    (r"^" + _BLOCK + r"attn1\.to_out\.0\." + _WB, r"blocks.\1.attn.proj.\2", None),
    (r"^" + _BLOCK + r"attn2\.to_q\." + _WB, r"blocks.\1.cross_attn.q_linear.\2", None),
    (r"^" + _BLOCK + r"attn2\.to_k\." + _WB, r"blocks.\1.cross_attn.kv_linear.\2", 0),
    (r"^" + _BLOCK + r"attn2\.to_v\." + _WB, r"blocks.\1.cross_attn.kv_linear.\2", 1),
    (r"^" + _BLOCK + r"attn2\.to_out\.0\." + _WB, r"blocks.\1.cross_attn.proj.\2", None),
    (r"^" + _BLOCK + r"ff\.net\.0\.proj\." + _WB, r"blocks.\1.mlp.fc1.\2", None),
    (r"^" + _BLOCK + r"ff\.net\.2\." + _WB, r"blocks.\1.mlp.fc2.\2", None),
    (r"^proj_out\." + _WB, r"final_layer.linear.\1", None),
    (r"^scale_shift_table$", r"final_layer.scale_shift_table", None),
]
AUTHORS_LAYOUT = ("pixart-original", PIXART)


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
    context_plan=ContextPlan(),  # self-attention attn1 gathers keys; the cross-attention attn2 reads the text
)
