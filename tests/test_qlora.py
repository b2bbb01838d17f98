"""LoRA on a quantized base: the adapter runs in float beside the quantized weights (generate --lora), trains
against them (lora-train, QLoRA), and quantize --lora fuses into the float weights first, then quantizes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tiny
from conftest import FAMILY_NAMES
from test_lora import random_adapter as lora_random_adapter
from ditkit.formats.errors import UnsupportedModelError
from ditkit.formats.layouts import load_bundle, save_quantized
from ditkit.formats.lora import Adapter, load_adapter, save_adapter
from ditkit.nn.quantized import KINDS
from ditkit.nn.quantized.lora import QuantizedLoraLinear
from ditkit.ops.lora import apply_lora, fuse_lora, resolve_targets
from ditkit.ops.quantize import QuantizeConfig, quantize, quantize_fused

CPU_SCHEMES = ["int8-dynamic", "int8-weight-only", "bnb-int8", "bnb-nf4", "bnb-fp4"]
FAST = dict(calib_batches=1, calib_batch_size=2)
# the error of (quantized + adapter vs float + adapter) may be at most this multiple of the error of
# (quantized vs float) on the same inputs (RMS): the adapter adds no error of its own beyond what the
# quantized layers do to the activations it changes
MAX_ERROR_RATIO = 1.5


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    return 10 * math.log10(float(ref.double().pow(2).sum()) / float((ref.double() - got.double()).pow(2).sum()))


def outputs(bundle, seed=7):
    fam, tr = bundle.family, bundle.transformer
    x, _, c = fam.dummy_inputs(tr, 2, seed=seed)
    with torch.no_grad():
        return fam.predict(tr, x, torch.tensor([100.0, 800.0]), c)


def random_adapter(bundle, targets=("attention", "mlp"), **kw) -> Adapter:
    return lora_random_adapter(bundle, targets=targets, **kw)


def check_within_quantization_error(ref, ref_lora, quant, quant_lora):
    """quant + adapter matches float + adapter within the scheme's own error; the adapter is really applied."""
    err_q, err_ql = sqnr(ref, quant), sqnr(ref_lora, quant_lora)
    ratio = 10 ** ((err_q - err_ql) / 20)  # RMS error ratio
    assert ratio <= MAX_ERROR_RATIO, (err_q, err_ql)
    effect = sqnr(ref, ref_lora)  # how far the adapter moves the float output
    assert effect < err_q - 5, (effect, err_q)  # the adapter's change is far above the quantization error
    assert sqnr(ref_lora, quant_lora) > sqnr(ref, quant_lora) + 5  # quant + adapter is nearer float + adapter
    return err_q, err_ql


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_adapter_beside_quantized_weights(tiny_dir, family, scheme):
    src = tiny_dir(family)
    flt = load_bundle(src)
    ref = outputs(flt)
    ad = random_adapter(flt)
    apply_lora(flt, ad, 0.8)
    ref_lora = outputs(flt)

    q, _ = quantize(load_bundle(src), QuantizeConfig(scheme=scheme, **FAST))
    quant = outputs(q)
    kinds = {n: m.ditkit_kind for n, m in q.transformer.named_modules() if getattr(m, "ditkit_kind", None)}
    apply_lora(q, ad, 0.8)
    check_within_quantization_error(ref, ref_lora, quant, outputs(q))
    # every adapted module kept its quantized base (no dequantize-fuse-requantize), the adapter in fp32
    for m in ad.modules:
        layer = q.transformer.get_submodule(m)
        base = layer.get_base_layer()
        assert base.ditkit_kind == kinds[m]
        assert layer.lora_A["lora0"].weight.dtype == torch.float32
    with pytest.raises(UnsupportedModelError, match="quantized"):
        fuse_lora(q, ad)


def test_adapter_on_a_quantized_checkpoint_via_cli(cli, tiny_dir, tmp_path):
    """generate QUANTIZED --lora: the reloaded quantized bundle takes the adapter; images differ from no adapter."""
    src = tiny_dir("sd3")
    flt = load_bundle(src)
    ad = random_adapter(flt)
    save_adapter(tmp_path / "a.safetensors", ad)
    emb = tiny.tiny_embeddings("sd3", tmp_path / "emb.safetensors")
    assert cli("quantize", src, "-o", tmp_path / "q", "--calib-batches", "1").code == 0
    common = ("--embeddings", emb, "--prompt", tiny.PROMPTS[0], "--steps", "2", "--num-images", "1", "--json")
    plain = cli("generate", tmp_path / "q", "-o", tmp_path / "i0", *common)
    with_lora = cli("generate", tmp_path / "q", "-o", tmp_path / "i1", "--lora", tmp_path / "a.safetensors", *common)
    assert plain.code == 0 and with_lora.code == 0, with_lora.err
    assert with_lora.json()["lora"][0]["modules"] == len(ad.modules)
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(next((tmp_path / "i0").glob("*.png"))), dtype=float)
    b = np.asarray(Image.open(next((tmp_path / "i1").glob("*.png"))), dtype=float)
    assert np.abs(a - b).mean() > 1.0


@pytest.mark.parametrize("family", ["dit", "sd3", "flux"])
def test_adapter_beside_a_gguf(cli, tiny_dir, tmp_path, family):
    """A .gguf is dequantized on load; the adapter runs beside those weights (never fused into them)."""
    src = tiny_dir(family)
    flt = load_bundle(src)
    ref = outputs(flt)
    ad = random_adapter(flt)
    apply_lora(flt, ad, 1.0)
    ref_lora = outputs(flt)
    out = tmp_path / "m.gguf"
    assert cli("export", src, "-o", out, "--format", "gguf", "--quant", "Q4_0").code == 0
    g = load_bundle(out)
    quant = outputs(g)
    apply_lora(g, ad, 1.0)
    assert all(hasattr(g.transformer.get_submodule(m), "base_layer") for m in ad.modules)
    check_within_quantization_error(ref, ref_lora, quant, outputs(g))


# -- backward through the quantized kernels --------------------------------------------------------

@pytest.mark.parametrize("kind,opts", [("int8-dynamic-linear", {}), ("int8-weight-linear", {}),
                                       ("bnb-int8-linear", {}), ("bnb-4bit-linear", {"quant_type": "nf4"})])
def test_every_kind_is_differentiable_in_its_input(kind, opts):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = KINDS[kind].make(lin, "cpu", opts).eval()
    x = torch.randn(3, 5, 64, requires_grad=True)
    g = torch.randn(3, 5, 48)
    q(x).backward(g)
    assert x.grad is not None
    expected = g @ KINDS[kind].dequantize(q)  # dL/dx through the dequantized weight
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=2e-2 * float(expected.abs().max()))
    with torch.no_grad():
        assert not q(x).requires_grad


def test_int_mm_and_fp8_modules_pass_gradients():
    """The CUDA kernels' modules (torch._int_mm, torch._scaled_mm) on their float fallback path: the same rule."""
    from ditkit.nn.quantized.torch_dynamic import Int8MMLinear
    from ditkit.nn.quantized import int8_rows

    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    qw, scale = int8_rows(lin.weight)
    m = Int8MMLinear(qw, scale, lin.bias.detach().clone())
    x = torch.randn(4, 64, requires_grad=True)  # 4 rows: the dequantized-weight path runs on any device
    g = torch.randn(4, 48)
    m(x).backward(g)
    torch.testing.assert_close(x.grad, g @ m.dequantized())


# -- QLoRA training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8-dynamic", "bnb-nf4"])
def test_qlora_trains_against_quantized_weights(cli, tiny_dir, tmp_path, scheme):
    from test_lora import make_data

    src = tiny_dir("dit")
    q, rep = quantize(load_bundle(src), QuantizeConfig(scheme=scheme, **FAST))
    save_quantized(q, tmp_path / "q", lambda n: (rep.set_disk_after(n), {"op": "quantize"})[1])
    data = make_data(tmp_path / "data", load_bundle(src), n=8, labels=True)
    r = cli("lora-train", tmp_path / "q", "--data", data, "-o", tmp_path / "a.safetensors", "--steps", "30",
            "--batch-size", "8", "--lr", "5e-3", "--warmup-steps", "0", "--targets", "attention,mlp",
            "--validation-images", "1", "--checkpoint-every", "100", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["base_unchanged"] is True
    assert doc["loss_last"] < doc["loss_first"], doc
    ad = load_adapter(tmp_path / "a.safetensors")
    # gradients reached every adapted layer, through the quantized layers after it
    assert all(float(ad.B[m].abs().max()) > 0 for m in ad.modules)
    # the QLoRA adapter fused into a quantized base is refused before training
    r = cli("lora-train", tmp_path / "q", "--data", data, "-o", tmp_path / "b.safetensors", "--steps", "1",
            "--fuse-into", tmp_path / "fused")
    assert r.code == 2 and "quantized" in r.error_line and not (tmp_path / "fused").exists()
    g = cli("generate", tmp_path / "q", "-o", tmp_path / "img", "--lora", tmp_path / "a.safetensors",
            "--num-images", "2", "--steps", "2", "--json")
    assert g.code == 0, g.err


def test_qlora_gradient_matches_float_lora_gradient(tiny_dir):
    """The adapter's gradient on the int8 base is the float base's within the int8 error (every layer passes it on)."""
    from ditkit.ops.lora.adapters import _inject, _lora_layers

    src = tiny_dir("pixart")
    grads = []
    for scheme in (None, "int8-dynamic"):
        b = load_bundle(src)
        if scheme:
            b, _ = quantize(b, QuantizeConfig(scheme=scheme, **FAST))
        mods = resolve_targets(b.family, b.transformer, ["attention"])
        torch.manual_seed(0)
        _inject(b.transformer, mods, 4, 4.0, "t")
        for _, layer in _lora_layers(b.transformer):
            layer.set_adapter(["t"])
            torch.nn.init.normal_(layer.lora_B["t"].weight, std=0.05)
        x, _, c = b.family.dummy_inputs(b.transformer, 2, seed=1)
        b.family.predict(b.transformer, x, torch.tensor([300.0, 700.0]), c).pow(2).mean().backward()
        grads.append(torch.cat([b.transformer.get_submodule(m).lora_A["t"].weight.grad.flatten() for m in mods]))
    assert sqnr(grads[0], grads[1]) > 20, sqnr(grads[0], grads[1])


# -- quantize --lora ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_quantize_fused_reports_each_step(tiny_dir, family):
    src = tiny_dir(family)
    flt = load_bundle(src)
    ad = random_adapter(flt)
    fused_ref = outputs(fuse_lora(flt, ad, 0.5))
    q, rep = quantize_fused(load_bundle(src), QuantizeConfig(scheme="int8-dynamic", **FAST), [ad], [0.5])
    lo = rep.lora
    assert lo["fuse_sqnr_db"] is None or lo["fuse_sqnr_db"] > 90  # fp64 fuse: fp32 rounding only
    assert lo["quantize_sqnr_db"] == rep.sqnr_db and rep.sqnr_db > 30
    assert abs(lo["total_sqnr_db"] - rep.sqnr_db) < 1.0
    assert lo["adapters"][0]["scale"] == 0.5 and lo["adapters"][0]["modules"] == len(ad.modules)
    assert sqnr(fused_ref, outputs(q)) > 30
    assert not any(hasattr(m, "base_layer") for m in q.transformer.modules())


def test_quantize_lora_cli(cli, tiny_dir, tmp_path):
    src = tiny_dir("dit")
    save_adapter(tmp_path / "a.safetensors", random_adapter(load_bundle(src)))
    r = cli("quantize", src, "-o", tmp_path / "q", "--lora", tmp_path / "a.safetensors", "--lora-scale", "0.7",
            "--calib-batches", "1", "--json")
    assert r.code == 0, r.err
    lo = r.json()["lora"]
    assert lo["adapters"][0]["scale"] == 0.7 and lo["total_sqnr_db"] > 30
    assert load_bundle(tmp_path / "q").manifest["report"]["lora"]["total_sqnr_db"] == lo["total_sqnr_db"]
    r = cli("quantize", tmp_path / "q", "-o", tmp_path / "q2", "--lora", tmp_path / "a.safetensors")
    assert r.code == 2 and "already quantized" in r.error_line and not (tmp_path / "q2").exists()
    r = cli("quantize", src, "-o", tmp_path / "q3", "--lora-scale", "0.5")
    assert r.code == 2 and r.error_line == "Error: --lora-scale needs --lora ADAPTER"
