"""CUDA paths, on a real GPU (`pytest -m gpu`): low-precision generation, int8 / fp8 / bitsandbytes kernels, 2:4
sparse kernels, onnxruntime's CUDA execution provider, bench on CUDA, and 2-process NCCL generation.

Every test is marked `gpu` and skips, naming why, where torch sees no CUDA device (`pytest -m gpu -rs` lists the
reasons). They call ditkit's own ops and CLI, never mocks. `make bench-cuda` (tools/bench_cuda.py) runs them on
a device machine before its benchmarks.

Floors: no GPU has run these yet, so each floor is set conservatively from the CPU figure it mirrors
(docs/quantize.md: tiny-digits int8-dynamic 41.4 dB, bnb-nf4 29.3 dB output SQNR) with a margin for the
kernels' different rounding; a GPU run records the measured value in each assertion message.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device: torch.cuda.is_available() is False (torch " + torch.__version__ + ")"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]

LABELS = list(range(10))
BIN = Path(sys.executable).parent


def _load(src=None, device="cuda", dtype=torch.float32):
    """An embedded model or a checkpoint, through ditkit's own loader."""
    from ditkit.formats.layouts import load_bundle

    return load_bundle(src, device=device, dtype=dtype)


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability(0)


def _images(device: str, dtype: str, num_images: int = 10, steps: int = 10):
    from ditkit.ops.generate import GenerateConfig, generate
    from ditkit.ops.runtime import DTYPES

    bundle = _load(device=device, dtype=DTYPES[dtype])
    images, report = generate(bundle, GenerateConfig(labels=LABELS, num_images=num_images, steps=steps, seed=0,
                                                     device=device, dtype=dtype))
    return images, report


# -- generation in low precision ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_cuda_images():
    return _images("cuda", "fp32")[0]


def test_fp32_cuda_matches_cpu(fp32_cuda_images):
    from ditkit.ops.metrics import psnr

    cpu, _ = _images("cpu", "fp32")
    # fp32 on both sides: only the kernels' summation order differs (cuBLAS vs CPU GEMMs, TF32 off by default)
    assert psnr(cpu, fp32_cuda_images) >= 35.0, psnr(cpu, fp32_cuda_images)


@pytest.mark.parametrize("dtype,floor", [("bf16", 20.0), ("fp16", 25.0)])
def test_low_precision_generate_vs_fp32(fp32_cuda_images, dtype, floor):
    from ditkit.ops.metrics import psnr

    images, report = _images("cuda", dtype)
    assert report.device.startswith("cuda") and report.dtype == dtype
    assert images.shape == fp32_cuda_images.shape and images.dtype == fp32_cuda_images.dtype
    # conservative floors (never measured on a GPU): bf16 keeps 8 mantissa bits, fp16 11; 10 steps of DDIM
    # compound each step's rounding, and 20 / 25 dB still means an image that looks the same to a person
    value = psnr(fp32_cuda_images, images)
    assert value >= floor, f"{dtype} vs fp32 PSNR {value:.2f} dB < {floor} dB"
    if report.judge is not None:
        assert report.judge["accuracy"] >= 0.7, report.judge


# -- quantized kernels ------------------------------------------------------------------------------------

def _quantize(scheme: str, **kw):
    from ditkit.ops.quantize import QuantizeConfig, quantize

    bundle = _load(device="cuda")
    return quantize(bundle, QuantizeConfig(scheme=scheme, device="cuda", **kw))


def test_int8_dynamic_runs_int_mm():
    from ditkit.nn.quantized.torch_dynamic import Int8MMLinear

    out, report = _quantize("int8-dynamic")
    assert report.device.startswith("cuda")
    mods = [m for m in out.transformer.modules() if isinstance(m, Int8MMLinear)]
    assert mods and all(m.weight.is_cuda and m.weight.dtype == torch.int8 for m in mods)
    assert any("torch._int_mm" in k["kernel"] for k in report.kernels.values()), report.kernels
    # CPU figure: 41.4 dB (torch.ao, per-tensor activations); _int_mm scales activations per token, so it
    # should do at least as well: 30 dB leaves room for cuBLASLt's int32 -> fp32 path
    assert report.sqnr_db is not None and report.sqnr_db >= 30.0, report.sqnr_db


def test_int_mm_layer_matches_dequantized_reference():
    import torch.nn.functional as F

    from ditkit.ops.quantize.base import sqnr_db
    from ditkit.nn.quantized.torch_dynamic import Int8MMLinear, make

    torch.manual_seed(0)
    lin = torch.nn.Linear(1152, 4608).cuda()
    q = make(lin, "cuda", {})
    assert isinstance(q, Int8MMLinear)
    x = torch.randn(4, 256, 1152, device="cuda")  # 1024 token rows: the _int_mm path (M > 16)
    with torch.inference_mode():
        y, ref = q(x), lin(x)
        deq = F.linear(x, q.weight.float() * q.weight_scale[:, None], q.bias)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    # against the float layer: int8 weights and activations (~6.9 bits of range each); CPU MLP figure 30.2 dB
    db = sqnr_db(float(ref.double().pow(2).sum()), float((y - ref).double().pow(2).sum()))
    assert db >= 25.0, db
    # against the same int8 weights in fp32: only the activation rounding remains
    db_deq = sqnr_db(float(deq.double().pow(2).sum()), float((y - deq).double().pow(2).sum()))
    assert db_deq >= db, (db_deq, db)


def test_fp8_scaled_mm():
    cc = _capability()
    if cc < (8, 9):
        pytest.skip(f"fp8 needs compute capability >= 8.9; {torch.cuda.get_device_name(0)} has {cc[0]}.{cc[1]}")
    from ditkit.nn.quantized.fp8 import Fp8Linear

    out, report = _quantize("fp8")
    mods = [m for m in out.transformer.modules() if isinstance(m, Fp8Linear)]
    assert mods and all(m.weight.dtype == torch.float8_e4m3fn for m in mods)
    # e4m3 keeps 3 mantissa bits with one scale per tensor (about 25-30 dB per layer on Gaussian data); the
    # whole model compounds it: 15 dB is a floor well under what the layers should give
    assert report.sqnr_db is not None and report.sqnr_db >= 15.0, report.sqnr_db


@pytest.mark.parametrize("scheme", ["fp8", "int8-dynamic", "bnb-nf4"])
def test_a_lora_beside_cuda_quantized_weights_matches_float_plus_lora(scheme):
    """QLoRA inference on CUDA kernels (fp8 is CUDA-only, so the CPU suite cannot cover it): the adapter runs in
    float beside the quantized weight and lands within the scheme's own error of float + adapter (test_qlora's
    rule)."""
    if scheme == "fp8" and _capability() < (8, 9):
        pytest.skip(f"fp8 needs compute capability >= 8.9; {torch.cuda.get_device_name(0)} has {_capability()}")
    if scheme.startswith("bnb"):
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (make bench-cuda carries its wheel)")
    from test_qlora import check_within_quantization_error, random_adapter

    from ditkit.ops.lora.adapters import apply_lora

    def out(b):
        fam, tr = b.family, b.transformer
        x, _, c = fam.dummy_inputs(tr, 2, seed=7)
        with torch.no_grad():
            return fam.predict(tr, x, torch.tensor([100.0, 800.0], device="cuda"), c).float().cpu()

    flt = _load(device="cuda")
    ref = out(flt)
    ad = random_adapter(flt)
    apply_lora(flt, ad, 0.8)
    ref_lora = out(flt)
    q, _ = _quantize(scheme)
    quant = out(q)
    apply_lora(q, ad, 0.8)
    err_q, err_ql = check_within_quantization_error(ref, ref_lora, quant, out(q))
    print(f"{scheme} on CUDA: quant {err_q:.1f} dB, quant + LoRA {err_ql:.1f} dB")


def test_fp8_refused_below_capability_8_9():
    from ditkit.nn.quantized.fp8 import check_device

    why = check_device("cuda")
    if _capability() >= (8, 9):
        assert why is None
    else:
        assert "8.9" in why and torch.cuda.get_device_name(0) in why


@pytest.mark.parametrize("scheme,floor", [("bnb-int8", 28.0), ("bnb-nf4", 22.0)])
def test_bitsandbytes_on_cuda(scheme, floor):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (make bench-cuda carries its wheel)")
    kw = {"compute_dtype": "bf16"} if scheme == "bnb-nf4" else {}
    out, report = _quantize(scheme, **kw)
    # on CUDA bitsandbytes runs its own kernels: no layer may be marked as a dense fallback
    assert all("CUDA" in k["kernel"] for k in report.kernels.values() if k["kind"].startswith("bnb")), report.kernels
    for m in out.transformer.modules():
        if getattr(m, "ditkit_kind", "").startswith("bnb"):
            assert m.weight.is_cuda and not getattr(m, "kernel_fallback", False)
    # CPU figures: nf4 29.3 dB; LLM.int8() keeps fp16 outliers, so it should sit near int8-dynamic's 41.4 dB
    assert report.sqnr_db is not None and report.sqnr_db >= floor, f"{scheme}: {report.sqnr_db} dB < {floor} dB"


# -- 2:4 semi-structured sparsity --------------------------------------------------------------------------

def test_semi_structured_2_4_beats_dense():
    if _capability() < (8, 0):
        pytest.skip(f"2:4 sparse kernels need compute capability >= 8.0; this GPU has {_capability()}")
    from ditkit.ops.prune import semi24
    from ditkit.ops.timing import Timer, interleaved, paired_ratio

    ok, why = semi24.kernel_available("cuda", torch.bfloat16)
    assert ok, why
    torch.manual_seed(0)
    # a DiT-XL/2-MLP-like GEMM at batch 32 with CFG (64 x 256 tokens): large enough for the sparse kernel to win
    dense = torch.nn.Sequential(torch.nn.Linear(4608, 4608, bias=False)).cuda().to(torch.bfloat16)
    w = dense[0].weight.data
    w.mul_(semi24.mask_2_4(w))
    assert semi24.is_2_4(w)
    sparse = torch.nn.Sequential(torch.nn.Linear(4608, 4608, bias=False)).cuda().to(torch.bfloat16)
    sparse[0].weight.data.copy_(w)
    assert semi24.to_semi_structured_(sparse, ["0"]) == 1
    x = torch.randn(16384, 4608, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        a, b = dense(x), sparse(x)
        rel = float((a.float() - b.float()).norm() / a.float().norm())
        assert rel < 1e-2, rel  # same weights: only the kernels' accumulation order differs
        ms, _ = interleaved({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, repeats=20, warmup=3,
                            timer=Timer("cuda"), target_ms=5.0)
    speedup = paired_ratio(ms["dense"], ms["sparse"])
    # published cuSPARSELt figures on A100/H100 are 1.1-1.6x at this size; never measured here, so the floor
    # only asks that the sparse kernel is not slower
    assert speedup >= 1.0, f"2:4 sparse {speedup:.2f}x dense"


# -- onnxruntime's CUDA execution provider ------------------------------------------------------------------

def test_onnxruntime_cuda_parity(tmp_path, cli):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (onnxruntime-gpu is not installed)")
    r = cli("export", "tiny-digits", "-o", tmp_path / "onnx", "--device", "cuda", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["passed"] and doc["parity"], doc
    g = cli("generate", tmp_path / "onnx", "-o", tmp_path / "img", "--labels", "0,1", "--device", "cuda", "--json")
    assert g.code == 0, g.err
    assert g.json()["backend"] == "onnxruntime"


# -- bench on CUDA --------------------------------------------------------------------------------------------

def test_timer_uses_cuda_events_and_synchronizes():
    from ditkit.ops.timing import Timer

    timer = Timer("cuda")
    assert timer.cuda
    a = torch.randn(4096, 4096, device="cuda")
    ms = timer(lambda: [a @ a for _ in range(20)])
    # the events bracket the work, and end.synchronize() returned only once it ran: nothing is left queued
    assert ms > 0.0 and torch.cuda.current_stream().query()
    assert timer.cpu_ms is None  # CPU time is not a GPU call's latency


def test_bench_on_cuda_report(cli):
    r = cli("bench", "tiny-digits", "tiny-digits", "--device", "cuda", "--batch-sizes", "1,8", "--num-images", "10",
            "--warmup", "2", "--repeats", "10", "--image-repeats", "3", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["device"].startswith("cuda") and doc["cuda"] == torch.version.cuda
    assert torch.cuda.get_device_name(0) in doc["device_name"]
    assert doc["memory_method"] == "cuda max_memory_allocated growth + weights"
    assert doc["speedup_basis"] == "wall-clock"
    assert doc["peak_flops_dtype"] == "bf16" and doc["peak_flops"] > 1e12  # the bf16 matmul probe
    for m in doc["models"]:
        for row in m["by_batch_size"]:
            assert row["latency_ms_per_step"] > 0 and row["latency_ms_per_image"] > 0
            assert row["cpu_ms_per_step"] is None  # no process CPU time on CUDA
            assert row["peak_memory_bytes"] > 0 and 0 < (row["mfu"] or 0) <= 1
        # the allocator's peak includes the weights: the batch-8 call needs at least what batch 1 needs
        peaks = [row["peak_memory_bytes"] for row in m["by_batch_size"]]
        assert peaks[1] >= peaks[0]
    variant = doc["models"][1]
    assert variant["quality"]["identical"] is True  # same model, same seeds: the same pixels
    assert 0.5 <= variant["speedup_per_step"] <= 2.0  # self-check; wide: tiny calls are launch-bound


def test_cuda_peak_memory_is_the_allocators():
    from ditkit.ops.metrics import peak_growth

    n = 64 << 20  # 256 MiB of fp32 allocated and freed inside the call
    grown = peak_growth(lambda: torch.empty(n, device="cuda").fill_(1.0), "cuda")
    assert grown is not None and grown >= 4 * n


# -- 2 processes over NCCL ---------------------------------------------------------------------------------

def test_two_process_nccl_generate_equals_one(tmp_path, cli):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices for a 2-process NCCL run; this machine has {torch.cuda.device_count()}")
    # --device cuda on every rank: ops.distributed must give each rank its own GPU (LOCAL_RANK); NCCL refuses
    # two ranks on one device, so this test is what shows whether it does
    args = ["tiny-digits", "--labels", "0,1,2,3,4,5,6,7,8,9", "--num-images", "20", "--batch-size", "5",
            "--device", "cuda", "--force"]
    one = cli("generate", *args, "-o", tmp_path / "one", "--json")
    assert one.code == 0, one.err
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ditkit.cli.main", "generate", *args, "-o", str(tmp_path / "two"), "--json"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads(two.stdout)["world_size"] == 2
    pngs = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    for name in pngs:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
