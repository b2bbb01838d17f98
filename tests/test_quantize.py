"""ditkit quantize: every CPU scheme on every family's tiny model (SQNR, size, skipped layers, reload equality) and
on the trained tiny-digits (output SQNR and judge accuracy floors), hardware refusals, the CLI contract, the on-disk
format, and chains (a depth-pruned model; generate)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import FAMILY_NAMES
from ditkit.formats import quantized
from ditkit.formats.layouts import save_quantized
from ditkit.formats.layouts import load_bundle, save_bundle
from ditkit.formats.errors import ConfigError, FormatError, HardwareError, UnsupportedModelError
from ditkit.formats.manifest import new_manifest
from ditkit.nn.quantized import KERNEL_ATTR, int8_rows
from ditkit.ops.quantize import KINDS, QuantizeConfig, check_hardware, quantize
from ditkit.ops.quantize.base import sqnr_db

CPU_SCHEMES = ["int8-dynamic", "int8-weight-only", "bnb-int8", "bnb-nf4", "bnb-fp4"]
# Bounds from measured tiny-model figures with a margin (docs/quantize.md has the full table).
MIN_SQNR = {"int8-dynamic": 35.0, "int8-weight-only": 40.0, "bnb-int8": 40.0, "bnb-nf4": 20.0, "bnb-fp4": 18.0}
MIN_LAYER_SQNR = {"int8-dynamic": 28.0, "int8-weight-only": 38.0, "bnb-int8": 38.0, "bnb-nf4": 16.0, "bnb-fp4": 14.0}
# Tiny models keep a large share of their weights in full precision (embeddings, final layers), and
# 4-bit blocks carry fixed per-layer statistics, so the bounds sit well above the 0.25x / 0.14x of big models.
MAX_DISK_RATIO = {"int8-dynamic": 0.6, "int8-weight-only": 0.6, "bnb-int8": 0.6, "bnb-nf4": 0.66, "bnb-fp4": 0.66}
FAST = dict(calib_batches=1, calib_batch_size=2)

# The trained default, every scheme: output SQNR on the calibration set and judge accuracy. The random tiny models
# above cannot catch a kernel that misplaces per-block scales (their rows all share one scale); tiny-digits can
# (bitsandbytes' AVX512 4-bit dequantization gave it 17.0 dB and accuracy 0.79). Floors: the figures measured by
# this test (docs/quantize.md) less about 3 dB; fp8 (CUDA, compute capability >= 8.9) is not measured yet.
TD_SCHEMES = CPU_SCHEMES + [pytest.param("fp8", marks=pytest.mark.gpu)]
TD_MIN_SQNR = {"int8-dynamic": 38.0, "int8-weight-only": 47.0, "bnb-int8": 42.0, "bnb-nf4": 26.0, "bnb-fp4": 24.0,
               "fp8": 25.0}
TD_IMAGES = 50  # 5 per digit, seeds 0.., the model's own sampler, steps and guidance
TD_MIN_ACCURACY_RATIO = 0.95  # of the float model's accuracy on the same seeds (the bar)


def _save(variant, report, out):
    return save_quantized(variant, out, lambda n: (report.set_disk_after(n), {"op": "quantize"})[1])


def _out(bundle, seed=7, batch=2):
    fam, tr = bundle.family, bundle.transformer
    x, t, c = fam.dummy_inputs(tr, batch, seed=seed)
    t = torch.tensor([100.0, 800.0][:batch])
    with torch.no_grad():
        return fam.predict(tr, x, t, c)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_scheme_on_family(tiny_dir, tmp_path, family, scheme):
    base = load_bundle(tiny_dir(family))
    float_weights = {n: m.weight.detach().clone() for n, m in base.transformer.named_modules()
                     if type(m) in (nn.Linear, nn.Embedding)}
    # weights outside Linear / Embedding modules stay float (Sana's GLUMBConv MLP is convolutions): the disk bound
    # applies to the share the schemes cover
    numel = lambda ms: sum(p.numel() for m in ms for p in m.parameters(recurse=False))  # noqa: E731
    mods = list(base.transformer.modules())
    covered = numel([m for m in mods if type(m) in (nn.Linear, nn.Embedding)]) / numel(mods)
    ref = _out(base)
    variant, report = quantize(base, QuantizeConfig(scheme=scheme, **FAST))

    # error: whole output and every layer on its own float inputs
    assert report.sqnr_db >= MIN_SQNR[scheme], report.sqnr_db
    assert report.sqnr_db_min_layer >= MIN_LAYER_SQNR[scheme], (report.worst_layer, report.sqnr_db_min_layer)
    got = _out(variant)
    assert torch.isfinite(got).all()
    assert sqnr_db(ref.double().pow(2).sum().item(), (got.double() - ref.double()).pow(2).sum().item()) >= MIN_SQNR[scheme] - 5

    # kept layers are the untouched float modules; quantized ones name their kernel
    tr = variant.transformer
    assert report.layers_full_precision == len(report.full_precision) > 0
    for kept in report.full_precision:
        m = tr.get_submodule(kept["name"])
        assert type(m) in (nn.Linear, nn.Embedding)
        assert torch.equal(m.weight, float_weights[kept["name"]])
    for layer in report.layers:
        assert getattr(tr.get_submodule(layer["name"]), KERNEL_ATTR)
    assert sum(k["count"] for k in report.kernels.values()) == report.layers_quantized == len(report.layers)
    roles = {l["name"]: (l["role"], l["kind"]) for l in report.layers}
    in_blocks = base.family.blocks_attr + "."
    for name in float_weights:  # sensitive layers: fp32 at the top level, int8 weight-only inside blocks
        if base.family.is_full_precision(name):
            if name.startswith(in_blocks):
                assert roles[name][0] == "sensitive" and roles[name][1] in ("int8-weight-linear", "int8-embedding")
            else:
                assert any(k["name"] == name and "family" in k["reason"] for k in report.full_precision)

    # size, and a reload that computes the very same numbers
    _save(variant, report, tmp_path / "q")
    # (Sana's tiny model: 64% in Linears, disk ratio 0.79 int8 / 0.87 4-bit)
    bound = MAX_DISK_RATIO[scheme] if covered >= 0.9 else 1 - 0.15 * covered
    assert report.disk_ratio <= bound, (report.disk_ratio, covered)
    assert report.memory_bytes_after < report.memory_bytes_before
    again = load_bundle(tmp_path / "q")
    assert quantized.is_quantized(again.transformer)
    assert again.transformer_bytes_on_disk() == report.disk_bytes_after
    assert torch.equal(_out(again), got)


def _judge_accuracy(bundle) -> float:
    from ditkit.ops.generate import GenerateConfig, generate
    from ditkit.ops.judge import score

    images, _ = generate(bundle, GenerateConfig(labels=list(range(10)), num_images=TD_IMAGES, batch_size=TD_IMAGES))
    return score(bundle.judge, images, [i % 10 for i in range(TD_IMAGES)]).accuracy


@pytest.fixture(scope="module")
def tiny_digits_accuracy():
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _judge_accuracy(load_bundle("tiny-digits"))
    torch.set_num_threads(before)


@pytest.mark.parametrize("scheme", TD_SCHEMES)
def test_scheme_on_tiny_digits(tiny_digits_accuracy, one_thread, scheme):
    cfg = QuantizeConfig(scheme=scheme, device="cuda" if scheme == "fp8" else "cpu", calib_batches=2)
    try:
        check_hardware(cfg)
    except HardwareError as e:
        pytest.skip(str(e))
    variant, report = quantize(load_bundle("tiny-digits"), cfg)
    assert report.sqnr_db >= TD_MIN_SQNR[scheme], (report.sqnr_db, report.worst_layer, report.sqnr_db_min_layer)
    accuracy = _judge_accuracy(variant)
    assert tiny_digits_accuracy >= 0.95
    assert accuracy >= TD_MIN_ACCURACY_RATIO * tiny_digits_accuracy, (scheme, accuracy, tiny_digits_accuracy)


def _dequantize_reference(param, kernel_rows: bool = False) -> torch.Tensor:
    """A bnb 4-bit weight dequantized in plain torch: bitsandbytes' flat blocks; with kernel_rows, the scale of
    (r, c) read at absmax[r * (K // blocksize) + c // blocksize], as bitsandbytes 0.50's AVX512 kernel reads it."""
    from bitsandbytes.functional import dequantize_blockwise, get_4bit_type

    qs = param.quant_state
    absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    n_out, k = qs.shape
    packed = param.data.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: n_out * k].long()
    values = get_4bit_type(qs.quant_type, device="cpu")[codes].reshape(n_out, k)
    rows, cols = torch.arange(n_out)[:, None], torch.arange(k)[None, :]
    block = rows * (k // qs.blocksize) + cols // qs.blocksize if kernel_rows else (rows * k + cols) // qs.blocksize
    return values * absmax.float()[block]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_4bit_cpu_blocks_keep_their_scales_on_every_kernel(quant_type):
    """Where K is not a multiple of the block size (64), a block spans two rows. Emulated here on any CPU:
    bitsandbytes' AVX512 dequantize_4bit kernel, which indexes scales by row, must not change the output."""
    import warnings

    from torch.library import Library, register_kernel

    from ditkit.ops.quantize import bnb

    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-1, 1, 80)[:, None])  # rows of different scales, as trained layers have
    x = torch.randn(3, 5, 96)
    ref = lin(x).detach()
    m = bnb.make_linear4(lin, "cpu", {"quant_type": quant_type, "compute_dtype": None}).eval()
    flat = _dequantize_reference(m.weight)
    assert not torch.equal(flat, _dequantize_reference(m.weight, kernel_rows=True))  # the case that matters
    native = m(x)
    assert torch.allclose(native, torch.nn.functional.linear(x, flat, lin.bias.detach()), atol=1e-5)
    assert sqnr_db(ref.pow(2).sum().item(), (native - ref).pow(2).sum().item()) >= 18

    def avx512_rows(A, absmax, blocksize, qtype, shape, dtype):  # the kernel's indexing, for K % 16 == 0
        class P:
            data = A
            quant_state = type("S", (), {"absmax": absmax, "nested": False, "shape": tuple(shape),
                                          "blocksize": blocksize, "quant_type": qtype})()
        return _dequantize_reference(P, kernel_rows=shape[-1] % 16 == 0).to(dtype)

    lib = Library("bitsandbytes", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            register_kernel("bitsandbytes::dequantize_4bit", "cpu", avx512_rows, lib=lib)
        assert torch.allclose(m(x), native, atol=1e-6)
    finally:
        lib._destroy()
    assert torch.equal(m(x), native)  # bitsandbytes' own kernel is back


def test_keep_modulation_skip_and_sensitive_fp32(tiny_dir):
    base = load_bundle(tiny_dir("dit"))
    fam = base.family
    _, report = quantize(base, QuantizeConfig(modulation="keep", skip=[r"attn1\.to_out"], sensitive="fp32", **FAST))
    tr = base.transformer  # quantized in place
    reasons = {k["name"]: k["reason"] for k in report.full_precision}
    mods = [n for n, m in tr.named_modules() if fam.is_modulation(n)]
    assert mods and all(type(tr.get_submodule(n)) is nn.Linear and "modulation" in reasons[n] for n in mods)
    outs = [n for n, _ in tr.named_modules() if n.endswith("attn1.to_out.0")]
    assert outs and all(reasons[n] == r"--skip attn1\.to_out" for n in outs)
    sensitive = [n for n, m in tr.named_modules() if fam.is_full_precision(n) and type(m) in (nn.Linear, nn.Embedding)]
    assert any(type(tr.get_submodule(n)) is nn.Embedding for n in sensitive)  # the label tables
    assert sensitive and all("sensitive" in reasons[n] for n in sensitive)
    assert report.modulation == "keep" and report.sensitive == "fp32"


def test_fp8_refused_on_cpu(cli, tiny_dir, tmp_path):
    with pytest.raises(HardwareError, match=r"compute capability >= 8\.9"):
        check_hardware(QuantizeConfig(scheme="fp8"))
    r = cli("quantize", tiny_dir("dit"), "-o", tmp_path / "q", "--scheme", "fp8")
    assert r.code == 2
    assert r.error_line.startswith("Error: fp8 needs a CUDA GPU with compute capability >= 8.9")
    assert not (tmp_path / "q").exists()


def test_fp8_and_int_mm_modules_numerically(tmp_path):
    """The CUDA kernels' modules (fp8 via torch._scaled_mm, int8 via torch._int_mm) checked on CPU, where
    PyTorch has reference implementations of both ops."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(20, 64)
    ref = lin(x).detach()
    from ditkit.ops.quantize import fp8, torch_dynamic

    q8 = fp8.make(lin, "cpu", {"compute_dtype": "fp32"})
    y = q8(x)
    assert sqnr_db(ref.pow(2).sum().item(), (y - ref).pow(2).sum().item()) >= 25
    again = KINDS["fp8-linear"].rebuild(q8.ditkit_spec, KINDS["fp8-linear"].tensors(q8), "cpu")
    assert torch.equal(again(x), y)
    assert not fp8.fits(nn.Linear(40, 48)) and fp8.fits(lin)

    q, s = int8_rows(lin.weight)
    mm = torch_dynamic.Int8MMLinear(q, s, lin.bias.detach())
    for rows in (x, x[:4]):  # the int8 GEMM path (M > 16) and the dequantized path (M <= 16)
        r = lin(rows).detach()
        assert sqnr_db(r.pow(2).sum().item(), (mm(rows) - r).pow(2).sum().item()) >= 35


def test_cli_json_and_errors(cli, tiny_dir, tmp_path):
    src = tiny_dir("dit")
    r = cli("quantize", src, "-o", tmp_path / "q", "--scheme", "int8-dynamic", "--calib-batches", "1", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["scheme"] == "int8-dynamic" and doc["disk_bytes_after"] > 0 and doc["sqnr_db"] > 35
    assert any(k.startswith("DynamicQuantizedLinear") for k in doc["kernels"])
    manifest = json.loads((tmp_path / "q" / "ditkit.json").read_text())
    assert manifest["op"] == "quantize" and manifest["report"]["disk_bytes_after"] == doc["disk_bytes_after"]
    assert manifest["config"]["scheme"] == "int8-dynamic"

    r = cli("quantize", src, "-o", tmp_path / "x", "--scheme", "int9")
    assert r.code == 2 and r.error_line.startswith("Error: unknown scheme 'int9', choose one of: bnb-fp4, bnb-int8")
    r = cli("quantize", src, "-o", tmp_path / "x", "--compute-dtype", "bf16")
    assert r.code == 2 and r.error_line.startswith("Error: --compute-dtype does not apply to int8-dynamic")
    r = cli("quantize", src, "-o", tmp_path / "x", "--skip", "attn1(")
    assert r.code == 2 and r.error_line.startswith("Error: --skip 'attn1(' is not a valid regular expression")
    r = cli("quantize", src, "-o", tmp_path / "q")
    assert r.code == 2 and "already exists" in r.error_line
    r = cli("quantize", tmp_path / "q", "-o", tmp_path / "qq")  # a quantized model is not quantized again
    assert r.code == 2 and "already quantized" in r.error_line
    assert not (tmp_path / "x").exists() and not (tmp_path / "qq").exists()


def test_damaged_checkpoint_is_a_format_error(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    variant, report = quantize(load_bundle(tiny_dir("dit")), QuantizeConfig(**FAST))
    _save(variant, report, tmp_path / "q")
    weights = tmp_path / "q" / "transformer" / quantized.WEIGHTS
    state = load_file(weights)
    state.pop(next(k for k in state if k.endswith("attn1.to_q.weight_scale")))
    save_file(state, weights)
    with pytest.raises(FormatError, match="cannot be rebuilt"):
        load_bundle(tmp_path / "q")
    doc = json.loads((tmp_path / "q" / "transformer" / quantized.QUANT_CONFIG).read_text())
    doc["modules"][next(iter(doc["modules"]))]["kind"] = "int3-linear"
    (tmp_path / "q" / "transformer" / quantized.QUANT_CONFIG).write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="unknown quantized kind 'int3-linear'"):
        load_bundle(tmp_path / "q")


def test_config_validation():
    with pytest.raises(ConfigError, match="--modulation"):
        QuantizeConfig(modulation="half")
    with pytest.raises(ConfigError, match="calib-batches"):
        QuantizeConfig(calib_batches=0)
    assert QuantizeConfig(scheme="bnb-nf4", compute_dtype="bf16").to_dict()["compute_dtype"] == "bf16"


def test_pruned_variant_quantizes_reloads_in_fresh_process_and_generates(cli, tiny_dir, tmp_path):
    """A depth-pruned model (a block deleted, config.num_layers fixed) is a normal bundle: it quantizes,
    reloads in a fresh process with identical outputs, and generate takes it."""
    base = load_bundle(tiny_dir("dit"))
    tr = base.transformer
    del tr.transformer_blocks[1]
    tr.register_to_config(num_layers=1)
    save_bundle(base, tmp_path / "pruned", new_manifest(family="dit", op="prune", config={}, report={},
                                                          parent=None, defaults={"steps": 2}))
    r = cli("quantize", tmp_path / "pruned", "-o", tmp_path / "q", "--scheme", "bnb-nf4", "--calib-batches", "1",
            "--json")
    assert r.code == 0, r.err
    q = load_bundle(tmp_path / "q")
    assert len(q.transformer.transformer_blocks) == 1 and q.manifest["defaults"] == {"steps": 2}
    assert q.manifest["parent"]["path"].endswith("pruned")
    expected = _out(q)
    code = ("import sys, torch; from ditkit.formats.layouts import load_bundle; b = load_bundle(sys.argv[1]); "
            "x, t, c = b.family.dummy_inputs(b.transformer, 2, seed=7); t = torch.tensor([100.0, 800.0]); "
            "torch.save(b.family.predict(b.transformer, x, t, c), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "q"), str(tmp_path / "y.pt")], check=True,
                   capture_output=True)
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), expected)
    r = cli("generate", tmp_path / "q", "-o", tmp_path / "img", "--num-images", "2", "--json")
    assert r.code == 0, r.err
    assert r.json()["num_images"] == 2


def test_lora_wrapped_model_refused(tiny_dir):
    from peft import LoraConfig, inject_adapter_in_model

    base = load_bundle(tiny_dir("dit"))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), base.transformer)
    with pytest.raises(UnsupportedModelError, match="fuse the LoRA first"):
        quantize(base, QuantizeConfig(**FAST))


def test_cpu_engine_choice_and_reload():
    """torch.ao packs each int8-dynamic weight for one backend: oneDNN for large token-wise layers, fbgemm for
    small ones and the adaLN modulation GEMV (measured, docs/quantize.md); a reload runs the same kernel."""
    from ditkit.ops.quantize import torch_dynamic

    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("this PyTorch build has no oneDNN quantized engine")
    assert torch_dynamic.cpu_engine(1152, 4608, conditioning=False) == "onednn"
    assert torch_dynamic.cpu_engine(1152, 6912, conditioning=True) in ("fbgemm", "x86")
    assert torch_dynamic.cpu_engine(128, 512, conditioning=False) in ("fbgemm", "x86")
    torch.manual_seed(0)
    lin, x = nn.Linear(1024, 1024), torch.randn(40, 1024)
    ref = lin(x).detach()
    before = torch.backends.quantized.engine
    for cond, engine in ((False, "onednn"), (True, None)):
        m = torch_dynamic.make(lin, "cpu", {"conditioning": cond})
        assert torch.backends.quantized.engine == before  # the global engine is restored
        assert (m.ditkit_spec["engine"] == engine) if engine else m.ditkit_spec["engine"] != "onednn"
        y = m(x)
        assert sqnr_db(ref.pow(2).sum().item(), (y - ref).pow(2).sum().item()) >= 30
        kind = KINDS[torch_dynamic.KIND]
        assert torch.equal(kind.rebuild(m.ditkit_spec, kind.tensors(m), "cpu")(x), y)
        assert kind.nbytes(m) == sum(t.numel() * t.element_size() for t in kind.tensors(m).values())


def test_quantized_params_and_weight_bytes_as_info_and_bench_count_them(tiny_dir):
    """info/bench count a quantized model's parameters as its float original had them, and its weight bytes
    include torch.ao's packed int8 weights (which live outside .parameters() and .buffers())."""
    from ditkit.ops.info import count_params
    from ditkit.ops.metrics import module_bytes

    base = load_bundle(tiny_dir("dit"))
    n = count_params(base.transformer)
    variant, report = quantize(base, QuantizeConfig(**FAST))
    assert count_params(variant.transformer) == n == report.params_total
    assert module_bytes(variant.transformer) == report.memory_bytes_after
