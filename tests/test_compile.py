"""--compile (ops/compile.py): torch.compile (inductor) on CPU gives the eager results, compiles one graph for every
block, never recompiles per step, composes with a step-caching policy, and fails in one line without a compiler."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from ditkit.formats.layouts import load_bundle
from ditkit.ops.compile import Compiled, graph_count, plan
from ditkit.ops.generate import GenerateConfig, generate
from ditkit.ops.metrics import psnr
from ditkit.ops.sample import denoise, image_noise, make_scheduler

STEPS = 4


@pytest.fixture(scope="module")
def bundle(tiny_dir):
    return load_bundle(tiny_dir("dit"))


def _latents(b, compiled: Compiled | None):
    fam, tr = b.family, b.transformer
    s = tr.config.sample_size
    noise = image_noise(0, [0, 1, 2, 3], (fam.latent_channels(tr), s, s))
    cond = {"class_labels": torch.tensor([1, 2, 3, 1])}
    with torch.inference_mode(), (compiled.active() if compiled else contextlib.nullcontext()):
        return denoise(fam, tr, make_scheduler(fam, b.scheduler, "ddim"), noise, cond, None, 1.0, STEPS)


def test_compiled_generate_equals_eager_one_graph_no_recompiles(bundle, one_thread):
    eager_lat = _latents(bundle, None)
    compiled, why = plan(bundle, "regional")
    assert why is None and compiled.mode == "regional"
    assert len(compiled.targets) == len(bundle.family.blocks(bundle.transformer)) >= 2
    g0 = graph_count()
    lat = _latents(bundle, compiled)
    # every block shares one graph (their inputs made contiguous: block 0's is a transposed view), and the STEPS
    # steps' timesteps (a tensor) recompile nothing
    assert graph_count() - g0 == 1
    assert float((lat - eager_lat).abs().max()) < 1e-4  # 2e-7 here: inductor's fused kernels reorder float sums
    assert "forward" not in vars(bundle.family.blocks(bundle.transformer)[0])  # removed after the run

    cfg = dict(labels=[1, 2, 3], num_images=6, batch_size=4, steps=STEPS)
    plain, _ = generate(bundle, GenerateConfig(**cfg))
    images, rep = generate(bundle, GenerateConfig(**cfg, compile=True))
    c = rep.compile
    assert c["applied"] and c["mode"] == "regional" and c["reason"] is None
    assert c["warmup_seconds"] > 0 and c["graph_breaks"] == 0
    assert c["graphs_after_warmup"] == 0  # 6 images at batch 4: both batches run 4 rows (padded), one shape
    assert psnr(plain, images) > 60


def test_cache_policy_compiles_regionally_and_full_mode_says_why(bundle, one_thread):
    from ditkit.ops.cache import CachePolicy

    n = len(bundle.family.blocks(bundle.transformer))
    policy = CachePolicy(sampler="ddim", steps=STEPS, num_blocks=n, skip=[None, (0, n), None, (0, 1)])
    bundle.manifest = {**(bundle.manifest or {}), "cache": policy.to_dict()}
    try:
        cfg = dict(labels=[1, 2], num_images=4, steps=STEPS, sampler="ddim")
        plain, p = generate(bundle, GenerateConfig(**cfg))
        images, rep = generate(bundle, GenerateConfig(**cfg, compile=True))
        assert p.cache["applied"] and rep.cache["applied"]
        assert rep.compile["applied"] and rep.compile["graphs_after_warmup"] == 0
        assert psnr(plain, images) > 60  # the cached run, compiled: the same images
        full, why = plan(bundle, "full")
        assert why is None and full.mode == "regional" and "step accelerator" in full.note
    finally:
        bundle.manifest.pop("cache")


def test_an_onnx_transformer_is_not_compiled_and_says_why(bundle, tmp_path):
    from ditkit.formats.onnx_bundle import OnnxModule

    class Onnx:  # what plan() sees of an ONNX bundle (ditkit export): its transformer is an onnxruntime session
        transformer = OnnxModule.__new__(OnnxModule)
        family = bundle.family
        manifest = {}
    compiled, why = plan(Onnx(), "regional")
    assert compiled is None and "PyTorch backend only" in why


def test_bench_compile_reports_compile_time_and_speedups(tiny_dir, cli):
    r = cli("bench", tiny_dir("dit"), tiny_dir("dit"), "--compile", "--threads", 1, "--num-images", 0,
            "--warmup", 1, "--repeats", 3, "--image-repeats", 1, "--json")
    assert r.code == 0, r.err
    doc = r.json()
    c = doc["compile"]
    assert c["backend"] == "inductor" and c["preflight_seconds"] > 0 and c["graphs_during_timing"] == 0
    base, twin = c["models"]
    assert base["compiled"] and base["compile_seconds"] > 0 and base["graphs"] >= 1
    assert base["max_abs_diff"] is not None and base["max_abs_diff"] < 1e-4
    # the same model twice: the second reuses the first's graphs, and compiled or not the ratio is 1 within noise
    assert twin["graphs"] == 0 and 0.5 < twin["speedup_per_step"] < 2 and 0.5 < twin["speedup_per_step_uncompiled"] < 2
    for m in c["models"]:
        row = m["by_batch_size"][0]
        assert row["latency_ms_per_step"] > 0 and row["latency_ms_per_step_uncompiled"] > 0
        assert row["speedup_from_compile_per_step"] > 0 and row["speedup_from_compile_per_image"] > 0
    assert doc["config"]["compile"] is True and doc["config"]["compile_mode"] == "regional"


def test_no_cxx_compiler_is_one_line_exit_2(tiny_dir, tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("DITKIT_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "ditkit.cli.main", "generate", str(tiny_dir("dit")), "-o",
                        str(tmp_path / "out"), "--steps", "2", "--labels", "1", "--compile"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("Error: --compile: torch.compile (inductor) cannot build kernels on cpu")
    assert "C++ compiler" in lines[-1] and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_compile_mode_is_checked(cli, tiny_dir, tmp_path):
    r = cli("generate", tiny_dir("dit"), "-o", tmp_path / "o", "--compile", "--compile-mode", "max")
    assert r.code == 2 and "unknown --compile-mode 'max', choose one of: full, regional" in r.error_line
