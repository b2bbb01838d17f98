"""lumina, lumina2: Lumina-T2X's Flag-DiT, as diffusers ships it in two classes with two pipelines.

Two adapters in one file, because the two are different transformers behind one name:
  lumina   LuminaNextDiT2DModel (Lumina-Next, LuminaPipeline): per-block self- and cross-attention to the Gemma
           caption, a learned per-head tanh gate on the cross-attention, 2-D complex RoPE the *pipeline* computes
           and passes in, learned sigma (2 x C output channels), proportional attention.
  lumina2  Lumina2Transformer2DModel (Lumina Image 2.0, Lumina2Pipeline): a single stream of caption + image
           tokens after a context refiner and a noise refiner, 3-axis RoPE computed inside the model.
Different call signatures, block lists, module names (what quantize, LoRA and the GGUF writer match) and outputs:
one Family with both would need a switch on the class in every method. What they share lives here once: the
conditioning (Gemma hidden states + mask, precomputed), the time convention, the GQA heads.

Time: both are flow-matching models with Lumina's convention, t = 0 the noise and t = 1 the image, and predict
(image - noise). The sampler's timestep is sigma x 1000 (noise at 1000) and it integrates (noise - image), so
`predict` passes 1 - t / 1000 and negates the output, as LuminaPipeline and Lumina2Pipeline do. Guidance is the
sampler's plain classifier-free guidance on every channel (LuminaPipeline applies it to the first 3 channels
only, "for exact reproducibility"; Lumina2Pipeline adds cfg truncation and renormalization: neither is copied).

Width pruning cuts the SwiGLU MLPs' hidden units only (WidthSpec.mlp_only): linear_1 and linear_3 outputs
(the gate and the value) with linear_2's inputs, the same units in every block (refiners included), by
importance; the heads, head_dim (RoPE acts within each head) and the width D stay. The new width is written
as ffn_dim_multiplier (multiple_of kept, the width rounded down to it), which LuminaFeedForward reads in every
block. Head cuts are not done: head_dim is hidden_size // num_attention_heads, so a head cut is a cut of D
(D' = h' x head_dim), and with grouped-query attention (num_kv_heads key/value heads, each shared by a group of
query heads) it must keep whole groups or the same query heads per group; Lumina-Next adds a per-head gate and
q/k LayerNorms across all heads. Depth pruning removes from `layers` (the refiners share one config field,
num_refiner_layers, and stay).
"""
from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import torch

from ..errors import ConfigError
from .base import Family, encode_masked, masked_text_cond
from .coupling import WidthSpec

HEADS_STAY = ("head cuts would cut the width D (head_dim = hidden_size / heads, RoPE on head_dim) across "
              "grouped-query key/value heads; not done")


class _Lumina(Family):
    def encode_prompts(self, pipe, prompts, device):
        return encode_masked(pipe, prompts, device)

    def hidden_size(self, transformer):
        return int(transformer.config.hidden_size)

    ffn_base: int = 4  # LuminaFeedForward's inner_dim before ffn_dim_multiplier: ffn_base x D // ffn_div
    ffn_div: int = 1

    def mlp_hidden(self, transformer):
        return int(self.blocks(transformer)[0].feed_forward.linear_1.out_features)

    def mlp_multiple(self, transformer):
        return int(transformer.config.multiple_of)

    def mlp_config(self, transformer, hidden):
        # LuminaFeedForward: inner = multiple_of x ceil(int(ffn_dim_multiplier x base) / multiple_of)
        m = int(transformer.config.multiple_of)
        base = self.ffn_base * int(transformer.config.hidden_size) // self.ffn_div
        mult = next((r for r in (hidden / base, (hidden + 0.5) / base) if m * -(-int(r * base) // m) == hidden), None)
        if mult is None:
            raise ConfigError(f"an MLP width of {hidden} is not a multiple of the config's multiple_of {m}")
        return {"ffn_dim_multiplier": mult}

    def lumina_time(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (1 - t / 1000).to(like.device, like.dtype)  # Lumina: 0 = noise, 1 = image


@lru_cache(maxsize=4)
def _rope(head_dim: int, linear_factor: float) -> torch.Tensor:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    # LuminaPipeline's table: 384 x 384 positions, complex (H, W, head_dim / 2)
    return get_2d_rotary_pos_embed_lumina(head_dim, 384, 384, linear_factor=linear_factor, ntk_factor=1.0)


class LuminaNextFamily(_Lumina):
    ffn_base, ffn_div = 8, 3  # int(4 x 2 x D / 3)

    def onnx_tracing(self):
        """LuminaAttnProcessor2_0 imports `apply_rotary_emb` from diffusers.models.embeddings at each call: while
        the graph is traced, a real-valued RoPE table (the complex input as view_as_real) goes to `_rope_real`."""
        import diffusers.models.embeddings as emb

        return _real_rope(emb)

    def dummy_cond(self, transformer, batch, generator, tokens=8):
        return masked_text_cond(batch, tokens, transformer.config.cross_attention_dim, generator)

    def init_unset_(self, transformer):
        with torch.no_grad():
            transformer.pad_token.zero_()  # torch.empty in the constructor, unused by forward
        return transformer

    def predict(self, transformer, latents, t, cond, guidance=1.0):
        c = transformer.config
        native = c.sample_size // c.patch_size
        h, w = latents.shape[-2] // c.patch_size, latents.shape[-1] // c.patch_size
        # LuminaPipeline's resolution rule: RoPE positions scaled linearly by sqrt(area / native area) (the
        # time-aware NTK branch applies at t >= scaling_watershed = 1.0 only), proportional attention on the
        # native token count
        # the table's top-left h x w (what the patch embedder slices; a smaller graph input for ONNX)
        rope = _rope(transformer.head_dim, float(math.sqrt(h * w) / native))[:h, :w].to(latents.device)
        out = transformer(
            hidden_states=latents,
            timestep=self.lumina_time(t, latents),
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_mask=cond["prompt_attention_mask"],
            image_rotary_emb=rope,
            cross_attention_kwargs={"base_sequence_length": native * native},
            return_dict=False,
        )[0]
        return -out[:, :latents.shape[1]]  # learned sigma: keep the prediction; Lumina's sign

    def tiny_config(self):
        return dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2,
                    num_kv_heads=1, multiple_of=16, learn_sigma=True, qk_norm=True, cross_attention_dim=24)


def _rope_real(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """diffusers' complex `apply_rotary_emb(x, freqs_cis, use_real=False)` in real arithmetic, freqs given as
    torch.view_as_real (..., head_dim / 2, 2): what the ONNX graph computes (ONNX has no complex type)."""
    cos, sin = freqs[..., 0].unsqueeze(2), freqs[..., 1].unsqueeze(2)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(x)


@contextlib.contextmanager
def _real_rope(module):
    """`module.apply_rotary_emb` (a diffusers module's imported name) takes a real-valued table while the graph is
    traced: the complex path goes to `_rope_real` when the table is not complex."""
    real = module.apply_rotary_emb

    def apply(x, freqs_cis, use_real=True, **kw):
        if not use_real and not freqs_cis.is_complex():
            return _rope_real(x, freqs_cis)
        return real(x, freqs_cis, use_real=use_real, **kw)
    module.apply_rotary_emb = apply
    try:
        yield
    finally:
        module.apply_rotary_emb = real


def _lumina2_traceable(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                       attention_kwargs=None, return_dict=True):
    """Lumina2Transformer2DModel.forward without Python numbers from the data, for torch.export: diffusers moves
    each row's image tokens right after its caption (lengths from `mask.sum(1).tolist()`); here the joint
    sequence is [the whole caption, the image] with the caption's padding masked as keys, and every token keeps
    the RoPE position diffusers gives it (image tokens at (caption length, row, column)), so each valid token
    attends to the same keys at the same positions: the same output (tests/test_export.py compares it with
    diffusers' forward on captions of different lengths; the export's parity run compares the graph with
    diffusers' forward). The RoPE tables travel real (view_as_real), rotated by `_rope_real`."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    B, _, H, W = hidden_states.shape
    p = self.config.patch_size
    h, w = H // p, W // p
    L, dev = encoder_hidden_states.shape[1], hidden_states.device
    temb, enc = self.time_caption_embed(hidden_states, timestep, encoder_hidden_states)
    mask = encoder_attention_mask.bool()
    tables = [torch.view_as_real(f).to(dev, torch.float32) for f in self.rope_embedder.freqs_cis]

    def freqs(ids):  # (B, N, 3) positions -> (B, N, head_dim / 2, 2)
        return torch.cat([t[ids[..., i]] for i, t in enumerate(tables)], dim=-2)

    j = torch.arange(L, device=dev)
    cap_ids = torch.stack([j, torch.zeros_like(j), torch.zeros_like(j)], -1).expand(B, L, 3)
    cap_f = freqs(cap_ids) * mask[..., None, None]  # diffusers' zeros past each caption's length
    rows = torch.arange(h, device=dev).view(-1, 1).expand(h, w).flatten()
    cols = torch.arange(w, device=dev).view(1, -1).expand(h, w).flatten()
    first = mask.sum(1).view(B, 1).expand(B, h * w)
    img_f = freqs(torch.stack([first, rows.expand(B, -1), cols.expand(B, -1)], -1))
    x = hidden_states.view(B, -1, h, p, w, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
    x = self.x_embedder(x)
    for layer in self.context_refiner:
        enc = layer(enc, encoder_attention_mask, cap_f)
    for layer in self.noise_refiner:
        x = layer(x, None, img_f, temb)
    joint = torch.cat([enc, x], dim=1)
    joint_mask = torch.cat([mask, mask.new_ones(B, h * w)], dim=1)
    joint_f = torch.cat([cap_f, img_f], dim=1)
    for layer in self.layers:
        joint = layer(joint, joint_mask, joint_f, temb)
    joint = self.norm_out(joint, temb)
    out = joint[:, L:].reshape(B, h, w, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)
    return (out,) if not return_dict else Transformer2DModelOutput(sample=out)


class Lumina2Family(_Lumina):
    @contextlib.contextmanager
    def onnx_tracing(self):
        """The traceable forward (`_lumina2_traceable`) and a real-valued RoPE rotation while the graph is traced."""
        import diffusers.models.transformers.transformer_lumina2 as mod

        cls, forward = mod.Lumina2Transformer2DModel, mod.Lumina2Transformer2DModel.forward
        cls.forward = _lumina2_traceable
        try:
            with _real_rope(mod):
                yield
        finally:
            cls.forward = forward

    def dummy_cond(self, transformer, batch, generator, tokens=8):
        return masked_text_cond(batch, tokens, transformer.config.cap_feat_dim, generator)

    def predict(self, transformer, latents, t, cond, guidance=1.0):
        out = transformer(
            hidden_states=latents,
            timestep=self.lumina_time(t, latents),
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_attention_mask"],
            return_dict=False,
        )[0]
        return -out

    def tiny_config(self):
        return dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
                    num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
                    axes_lens=(64, 32, 32), cap_feat_dim=24)


def _width(patch_embed: str) -> WidthSpec:
    # the final projection's outputs are the latent channels; the embedder's outputs the residual stream
    return WidthSpec(sincos_residual=False, patch_embed=patch_embed, ignored=("norm_out.linear_2",),
                     mlp_only=HEADS_STAY)


# what the two adapters declare alike (block_returns: neither block class is in diffusers' hook registry, and
# each returns the hidden states alone)
COMMON = dict(conditioning="text", prediction="flow", samplers=("flow-euler",), default_sampler="flow-euler",
              default_steps=30, default_guidance=4.0, blocks_attr="layers", block_returns=(0, None),
              modulation=(r"\.norm1\.linear$",), mlp_types=("LuminaFeedForward",))


FAMILY = LuminaNextFamily(
    name="lumina",
    transformer_class="LuminaNextDiT2DModel",
    pipeline_class="LuminaPipeline",
    **COMMON,
    width=_width("patch_embedder.proj"),
    # embedders in, final adaLN out; inside the blocks (int8 weight-only there, no activation quantization) the
    # SwiGLU down projection, whose input is a product of two projections (heavy-tailed), and the q/k/v
    # projections, whose errors the q/k LayerNorm across heads and the sandwich RMSNorms carry at full scale: the
    # lowest-SQNR layers of `ditkit quantize` on the tiny model (int8-dynamic 30.0 dB -> 36.1 dB)
    full_precision=(r"^patch_embedder\.", r"^time_caption_embed\.", r"^norm_out\.", r"\.feed_forward\.linear_2$",
                    r"\.attn[12]\.to_(q|k|v)$"),
    gguf_keep_float=("patch_embedder.", "time_caption_embed.", "norm_out.", "pad_token"),
    # torch.export 2.13 (dynamic batch): "Constraints violated (batch)! ... your code specialized it to be a
    # constant (2)"
    onnx_fixed_batch="torch.export specializes the batch to the traced size (its patch embedder returns "
                     "[(height, width)] * batch_size)",
)

LUMINA2 = Lumina2Family(
    name="lumina2",
    transformer_class="Lumina2Transformer2DModel",
    pipeline_class="Lumina2Pipeline",
    **COMMON,
    width=_width("x_embedder"),
    cache_probe="attn",  # Lumina2TransformerBlock's one attention reads the modulated hidden states
    full_precision=(r"^x_embedder$", r"^time_caption_embed\.", r"^norm_out\."),
    gguf_keep_float=("x_embedder.", "time_caption_embed.", "norm_out."),
    # diffusers' forward cannot be traced (torch.export 2.13: "TypeError: unhashable type: non-nested SymInt" at
    # `use_mask = len(set(seq_lengths)) > 1`, the caption lengths from mask.sum(1).tolist()): the export traces
    # `_lumina2_traceable` instead (Lumina2Family.onnx_tracing), the same output without data-dependent lengths
)
