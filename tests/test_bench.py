"""ditkit bench: report schema, gates and exit codes, paired quality metrics, renderers, bad input."""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAMILY_NAMES
from ditkit.formats.families import FAMILIES
from ditkit.formats.layouts import load_bundle
from ditkit.ops.bench import BenchConfig, bench, kernels
from ditkit.ops.judge import Judge
from ditkit.ops.metrics import PSNR_CAP_DB, matmul_peak, peak_growth, psnr, ssim

# fast settings: a handful of timed rounds, few images, 4 sampler steps, one thread (steady on a busy box)
FAST = ["--warmup", "1", "--repeats", "3", "--image-repeats", "1", "--num-images", "4", "--steps", "4",
        "--threads", "1"]
FAST_CFG = dict(warmup=1, repeats=3, image_repeats=1, num_images=4, steps=4)


def run_cli(*args):
    """(code, stdout, stderr) of `ditkit args...` in-process (usable from module-scoped fixtures)."""
    from ditkit.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def write_variant(src, dst):
    """A copy of a tiny pipeline with its transformer weights perturbed: a variant whose images differ."""
    shutil.copytree(src, dst)
    f = next((dst / "transformer").glob("*.safetensors"))
    state = load_file(f)
    g = torch.Generator().manual_seed(3)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def variant_dir(tiny_dir, tmp_path_factory):
    return write_variant(tiny_dir("dit"), tmp_path_factory.mktemp("variant") / "dit-perturbed")


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory):
    import tiny

    return tiny.write_tiny_transformer("dit", tmp_path_factory.mktemp("bare") / "dit-transformer")


@pytest.fixture(scope="module")
def report(tiny_dir, bare_dir):
    """One bench of base, the same base again, and a bare transformer, at batch sizes 1 and 2."""
    code, out, err = run_cli("bench", tiny_dir("dit"), tiny_dir("dit"), bare_dir, "--batch-sizes", "1,2", "--json",
                             *FAST)
    assert code == 0, err
    return json.loads(out)


def test_schema_top_level(report):
    for key in ("device", "device_name", "dtype", "torch", "cuda", "threads", "world_size", "peak_flops",
                "peak_flops_dtype", "memory_method", "load_average", "warnings", "timing", "config", "models",
                "gates", "passed"):
        assert key in report, key
    assert report["device"] == "cpu" and report["cuda"] is None and report["threads"] == 1
    assert report["speedup_basis"] == "cpu-time"  # one CPU thread: ratios of CPU time, immune to other jobs
    assert report["peak_flops"] > 1e8 and report["peak_flops_dtype"] == "float32"
    assert report["gates"] == [] and report["passed"] is True
    assert [m["role"] for m in report["models"]] == ["base", "variant", "variant"]
    assert [m["name"] for m in report["models"]] == ["dit", "dit #2", "dit-transformer"]


def test_schema_models(report):
    base, same, bare = report["models"]
    for m in report["models"]:
        for key in ("name", "path", "family", "params", "params_total", "disk_bytes", "disk_bytes_total", "steps",
                    "latency_ms_per_step", "latency_ms_per_image", "images_per_s", "peak_memory_bytes",
                    "flops_per_step", "mfu", "speedup_per_step", "speedup_per_image", "quality", "by_batch_size",
                    "kernels", "speedup_is_real"):
            assert key in m, key
        assert [r["batch_size"] for r in m["by_batch_size"]] == [1, 2]
        head = m["by_batch_size"][0]
        assert m["latency_ms_per_step"] == head["latency_ms_per_step"] > 0
        assert m["latency_ms_per_step_p90"] >= m["latency_ms_per_step"]
        assert all(r["cpu_ms_per_step"] > 0 for r in m["by_batch_size"])
        # with CFG one step is a call on 2 x batch rows; FLOPs grow linearly with the rows
        assert [r["rows_per_call"] for r in m["by_batch_size"]] == [2, 4]
        assert m["by_batch_size"][1]["flops_per_step"] == 2 * head["flops_per_step"] > 0
        assert m["achieved_flops"] == pytest.approx(head["flops_per_step"] / (head["latency_ms_per_step"] / 1e3),
                                                    rel=1e-3)
        assert m["mfu"] == pytest.approx(m["achieved_flops"] / report["peak_flops"], rel=1e-2, abs=1e-6)
        assert m["kernels"]["summary"] == "dense fp32" and m["speedup_is_real"] is True
        assert m["peak_memory_bytes"] >= 4 * m["params"]  # at least the fp32 weights
    assert base["params"] == same["params"] == bare["params"]
    assert base["params_total"] > base["params"]  # + the VAE
    assert bare["params_total"] == bare["params"]
    assert 0 < base["disk_bytes"] < base["disk_bytes_total"]
    assert base["speedup_per_step"] == base["speedup_per_image"] == 1.0
    assert base["steps"] == 4 and base["sampler"] == "ddim"
    assert base["images_per_s"] == pytest.approx(1e3 / base["latency_ms_per_image"], rel=1e-3)
    assert base["by_batch_size"][1]["cpu_ms_per_image"] > 0 and bare["by_batch_size"][0]["cpu_ms_per_image"] is None


def test_schema_quality_and_bare(report):
    base, same, bare = report["models"]
    assert base["quality"]["reference"] is True and base["quality"]["n_images"] == 4
    q = same["quality"]
    assert q["identical"] is True and q["psnr"] == PSNR_CAP_DB and q["ssim"] == 1.0
    # a bare transformer is timed per step only
    assert bare["quality"] is None and bare["latency_ms_per_image"] is None and bare["speedup_per_image"] is None
    assert bare["steps"] is None
    assert 0.5 < bare["speedup_per_step"] < 2.0  # the same architecture: per-step speed within noise of the base


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_against_itself(family, tiny_dir, tiny_embeddings):
    emb = [] if FAMILIES[family].conditioning == "class" else ["--embeddings", tiny_embeddings(family)]
    code, out, err = run_cli("bench", tiny_dir(family), tiny_dir(family), "--json", *emb, *FAST,
                             "--num-images", "2", "--repeats", "2")
    assert code == 0, err
    base, same = json.loads(out)["models"]
    assert base["family"] == family and base["flops_per_step"] > 0 and base["latency_ms_per_image"] > 0
    assert same["quality"]["identical"] is True
    assert 0.5 < same["speedup_per_step"] < 2.0  # the model against itself: a ratio of 1 within noise
    assert base["cfg"] is (family != "flux")  # flux distils guidance into an embedding: no CFG rows
    assert base["by_batch_size"][0]["rows_per_call"] == (2 if base["cfg"] else 1)


def test_markdown_names_every_model(tiny_dir, bare_dir):
    code, out, err = run_cli("bench", tiny_dir("dit"), bare_dir, "--markdown", *FAST)
    assert code == 0, err
    assert "| model | role |" in out and "**quality vs the base, identical seeds**" in out
    for name in ("| dit |", "| dit-transformer |"):
        assert name in out
    assert not out.lstrip().startswith("{")


def test_plot_is_a_png_with_every_model(report, tmp_path):
    from PIL import Image

    from ditkit.cli.bench_render import plot

    path = tmp_path / "bench.png"
    drawn = plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size[0] >= 800 and im.size[1] >= 400
    names = {d.split(":", 1)[1] for d in drawn}
    assert names == {m["name"] for m in report["models"]}
    assert "ssim:dit #2" in drawn and "latency:dit-transformer" in drawn


def test_plot_option_writes_file(tiny_dir, tmp_path):
    path = tmp_path / "p.png"
    code, out, err = run_cli("bench", tiny_dir("dit"), "--plot", path, "--json", *FAST)
    assert code == 0, err
    assert path.stat().st_size > 10_000 and json.loads(out)["models"][0]["name"] == "dit"
    code, _, err = run_cli("bench", tiny_dir("dit"), "--plot", path, *FAST)  # exists, no --force
    assert code == 2 and "already exists" in err


def test_impossible_gate_exits_1_with_full_json(tiny_dir):
    code, out, err = run_cli("bench", tiny_dir("dit"), tiny_dir("dit"), "--json", "--min-speedup", "100",
                             "--min-psnr", "40", *FAST)
    assert code == 1
    doc = json.loads(out)  # still one complete document
    assert len(doc["models"]) == 2 and doc["models"][1]["quality"]["identical"] is True
    assert doc["passed"] is False
    gates = {g["name"]: g for g in doc["gates"]}
    assert set(gates) == {"min_speedup", "min_psnr"}
    assert gates["min_speedup"]["passed"] is False and gates["min_speedup"]["threshold"] == 100
    assert gates["min_speedup"]["model"] == "dit #2" and gates["min_speedup"]["value"] < 100
    assert gates["min_psnr"]["passed"] is True and gates["min_psnr"]["value"] == PSNR_CAP_DB
    last = [l for l in err.splitlines() if l.strip()][-1]
    assert last.startswith("Error: 1 quality gate(s) failed: min_speedup on dit #2: speedup_per_image")
    assert "< 100" in last and "min_psnr" not in last


def test_passing_gates_exit_0(tiny_dir):
    code, out, err = run_cli("bench", tiny_dir("dit"), tiny_dir("dit"), "--json", "--min-speedup", "0.01",
                             "--min-psnr", "99", *FAST)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["passed"] is True and len(doc["gates"]) == 2 and all(g["passed"] for g in doc["gates"])


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model"], "does not exist"),
    (["--batch-sizes", "0"], "--batch-sizes must be distinct integers >= 1"),
    (["--batch-sizes", "1,x"], "--batch-sizes must be comma-separated integers"),
    (["--json", "--markdown"], "choose one"),
    (["--min-speedup", "2"], "give BASE and at least one VARIANT"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--dtype", "bf16"], "--dtype bf16 is for CUDA devices"),
])
def test_bad_input_exits_2(tiny_dir, args, message):
    model = [] if args[0].startswith("/") else [tiny_dir("dit")]
    code, out, err = run_cli("bench", *model, *FAST, *args)
    assert code == 2
    assert out == ""
    last = [l for l in err.splitlines() if l.strip()][-1]
    assert last.startswith("Error: ") and message in last


def test_judge_gates_need_a_judge(tiny_dir, bare_dir):
    code, _, err = run_cli("bench", tiny_dir("dit"), tiny_dir("dit"), "--max-fd-ratio", "1.5", *FAST)
    assert code == 2 and "needs a judge" in err
    code, _, err = run_cli("bench", tiny_dir("dit"), bare_dir, "--min-psnr", "30", *FAST)
    assert code == 2 and "bare transformer" in err


# -- op level ------------------------------------------------------------------------------------------

def _judged(path):
    """A bundle with a (random) judge attached, so the judge's accuracy and FD are computed."""
    b = load_bundle(path)
    torch.manual_seed(0)
    judge = Judge().eval()
    judge.set_reference(np.zeros(64), np.eye(64))
    b.judge = judge
    return b


def test_quality_metrics_are_deterministic(tiny_dir, variant_dir, one_thread):
    cfg = BenchConfig(**{**FAST_CFG, "num_images": 6}, max_accuracy_drop=1.0, max_fd_ratio=1e6)
    runs = [bench([_judged(tiny_dir("dit")), load_bundle(variant_dir)], cfg)[1].to_dict() for _ in range(2)]
    q1, q2 = (r["models"][1]["quality"] for r in runs)
    assert q1 == q2
    assert q1["identical"] is False and 5 < q1["psnr"] < PSNR_CAP_DB and 0 < q1["ssim"] < 1
    assert 0 <= q1["judge_accuracy"] <= 1 and q1["judge_fd"] > 0
    base_q = runs[0]["models"][0]["quality"]
    assert base_q["judge_accuracy"] is not None and base_q["psnr"] is None  # the base is the reference
    gates = {g["name"]: g for g in runs[0]["gates"]}
    assert gates["max_accuracy_drop"]["value"] == pytest.approx(base_q["judge_accuracy"] - q1["judge_accuracy"])
    assert gates["max_fd_ratio"]["value"] == pytest.approx(q1["judge_fd"] / base_q["judge_fd"], rel=1e-5)
    assert runs[0]["passed"] is True


def test_fake_quant_is_never_a_real_speedup(tiny_dir, one_thread):
    base, variant = load_bundle(tiny_dir("dit")), load_bundle(tiny_dir("dit"))
    layer = next(m for m in variant.transformer.modules() if isinstance(m, torch.nn.Linear))
    layer.fake_quant = True
    k = kernels(variant.transformer)
    assert k["fake_quant"] is True and k["real"] is False and k["summary"].startswith("FAKE-QUANT")
    _, rep = bench([base, variant], BenchConfig(**{**FAST_CFG, "num_images": 0}, min_speedup=0.0))
    m = rep.to_dict()["models"][1]
    assert m["speedup_is_real"] is False
    gate = rep.gates[0]
    assert gate["passed"] is False and "not a real speedup" in gate["note"]


def test_kernels_lists_quantized_classes(tiny_dir):
    tr = load_bundle(tiny_dir("dit")).transformer
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tr.modules())
    q = torch.ao.quantization.quantize_dynamic(tr, {torch.nn.Linear}, dtype=torch.qint8)
    k = kernels(q)
    dyn = [c for c in k["linear_classes"] if "dynamic" in c]
    assert len(dyn) == 1 and k["linear_classes"][dyn[0]] == n_linear
    assert k["real"] is True and "Linear x" in k["summary"] and "dense" not in k["summary"]


def test_psnr_ssim_values():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    b = a + 1  # off by one everywhere (a < 255 so no wrap)
    assert psnr(a, a) == PSNR_CAP_DB and ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, b) == pytest.approx(20 * math.log10(255), abs=1e-9)  # MSE = 1
    noisy = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    s = ssim(a, noisy)
    assert 0 < s < 0.99 and s == pytest.approx(ssim(noisy, a))  # symmetric
    assert ssim(a, b) > 0.999  # a constant shift barely changes structure


def test_peak_memory_meter_sees_a_64mb_tensor():
    growth = peak_growth(lambda: torch.ones(16, 1024, 1024).sum(), "cpu")  # 64 MiB
    assert growth is not None and 60 * 2**20 < growth < 200 * 2**20


def test_matmul_peak_probe():
    flops, dtype, n = matmul_peak("cpu", seconds=0.1)
    assert dtype == "float32" and n == 1024 and 1e8 < flops < 1e13


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bench_and_info_agree_on_flops_per_step(family, tmp_path, one_thread):
    """One FLOP counter: bench's FLOPs per step (and so its MFU) are info's for the same model and rows, attention
    included (on CPU torch's counter does not see SDPA's flash kernel by itself)."""
    import tiny
    from torch.utils.flop_counter import FlopCounterMode

    from ditkit.ops.geometry import latent_hw
    from ditkit.ops.info import count_flops

    b = load_bundle(tiny.write_tiny_transformer(family, tmp_path / family))
    _, rep = bench([b], BenchConfig(batch_sizes=[1, 2], num_images=0, image_repeats=0, warmup=0, repeats=1))
    hw = latent_hw(b, None, None)
    rows = rep.models[0]["by_batch_size"]
    assert [r["flops_per_step"] for r in rows] == [count_flops(b, r["rows_per_call"], hw) for r in rows]
    latents, t, cond = b.family.dummy_inputs(b.transformer, 1, hw)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:  # torch's own registry: no CPU attention
        b.family.predict(b.transformer, latents, t, cond)
    assert count_flops(b, 1, hw) > plain.get_total_flops()
