"""dit: DiTTransformer2DModel, class-conditional (facebookresearch/DiT, diffusers DiTPipeline)."""
from __future__ import annotations

import torch

from ..dit_original import config_from_diffusers_state
from ..errors import FormatError
from .base import ContextPlan, Family, split_learned_sigma
from .coupling import WidthSpec

WIDTH = WidthSpec(
    ignored=("proj_out_2",),  # the final projection: its outputs are the latent channels
    sincos_residual=True)


# The timestep embedding's frequency shift: diffusers' DiT class embeds t with exp(-ln(1e4) * i / (half - 1))
# (downscale_freq_shift=1), the authors' models.py with exp(-ln(1e4) * i / half) (0). Same weights, different
# outputs (up to 1.5 on outputs of magnitude 3). A model read from the authors' layout runs as the authors'
# model (0); a diffusers checkpoint runs as diffusers runs it (1) unless its ditkit.json records otherwise.
TIMESTEP_SHIFTS = {"authors": 0, "diffusers": 1}


def time_projs(transformer) -> list:
    blocks = getattr(transformer, "transformer_blocks", None) or []  # an ONNX graph has none: baked in at export
    return [b.norm1.emb.time_proj for b in blocks if hasattr(getattr(b, "norm1", None), "emb")]


class DiTFamily(Family):
    def conventions(self, transformer):
        projs = time_projs(transformer)
        return {"timestep_shift": int(projs[0].downscale_freq_shift)} if projs else {}

    def apply_conventions(self, transformer, conventions):
        shift = conventions.get("timestep_shift")
        if shift is None:
            return
        if shift not in TIMESTEP_SHIFTS.values():
            raise FormatError(f"timestep_shift {shift!r} in the manifest's conventions is neither the authors' DiT "
                              f"(0) nor diffusers' (1); restore the ditkit.json saved with these weights")
        for proj in time_projs(transformer):
            proj.downscale_freq_shift = shift
    def shard_units(self, transformer):
        # diffusers' DiT forward calls block 0's timestep/label embedding again for the final layer
        head = [b.norm1.emb for b in getattr(transformer, "transformer_blocks", [])[:1]
                if hasattr(getattr(b, "norm1", None), "emb")]
        return head + super().shard_units(transformer)

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
    context_plan=ContextPlan(),  # split after pos_embed, gathered after norm_out; self-attention attn1
)
