"""dit: DiTTransformer2DModel, class-conditional (facebookresearch/DiT, diffusers DiTPipeline)."""
from __future__ import annotations

import torch

from ..dit_original import config_from_diffusers_state
from .base import Family, split_learned_sigma
from .coupling import TB, WidthSpec, attn, ff, linear, mlp2

WIDTH = WidthSpec(rules=(
    *linear(r"^pos_embed\.proj", None, "D:res"),
    *mlp2(rf"{TB}\.norm1\.emb\.timestep_embedder", "D:thid{b}", "D:emb{b}"),
    (rf"{TB}\.norm1\.emb\.class_embedder\.embedding_table\.weight$", 1, ("D:emb{b}",)),
    *linear(rf"{TB}\.norm1\.linear", "D:emb{b}", "D:res"),
    *attn(rf"{TB}\.attn1", "D:res", "D:res", "H:attn1.{b}", "D:res"),
    *ff(rf"{TB}\.ff", "D:res", "F:ff{b}"),
    *linear(r"^proj_out_1", "D:emb0", "D:res"),  # the final adaLN reads block 0's conditioning embedding
    *linear(r"^proj_out_2", "D:res", None),
), sincos_residual=True)


class DiTFamily(Family):
    def num_classes(self, transformer) -> int:
        return transformer.config.num_embeds_ada_norm

    def null_cond(self, transformer, cond):
        # the label table's extra row (index num_classes) is the unconditional class (DiTPipeline: 1000)
        return {"class_labels": torch.full_like(cond["class_labels"], self.num_classes(transformer))}

    def config_from_state(self, state):
        return config_from_diffusers_state(state)  # the published DiT widths

    def dummy_cond(self, transformer, batch, generator, tokens=8):
        n = min(self.num_classes(transformer), 10)
        return {"class_labels": torch.randint(0, n, (batch,), generator=generator)}

    def predict(self, transformer, latents, t, cond, guidance=1.0):
        out = transformer(latents, timestep=t, class_labels=cond["class_labels"], return_dict=False)[0]
        return split_learned_sigma(out, latents.shape[1])

    def tiny_config(self):
        return dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                    sample_size=8, patch_size=2, num_embeds_ada_norm=1000)


FAMILY = DiTFamily(
    name="dit",
    transformer_class="DiTTransformer2DModel",
    pipeline_class="DiTPipeline",
    conditioning="class",
    prediction="epsilon",
    samplers=("ddim", "dpm++", "euler"),
    default_sampler="ddim",
    default_steps=25,
    default_guidance=4.0,
    blocks_attr="transformer_blocks",
    full_precision=(r"^pos_embed\.", r"timestep_embedder", r"class_embedder", r"^proj_out_"),
    modulation=(r"\.norm1\.linear$",),
    width=WIDTH,
    gguf_keep_float=("pos_embed.", "transformer_blocks.0.norm1.emb.", "proj_out_2."),
)
