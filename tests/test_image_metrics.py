"""bench --metric: CLIP score, FID, KID, LPIPS on tiny random metric models saved in the real weights' layouts
(tools/metric_models.py), each value checked against an independent computation; gates; missing weights."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from test_bench import FAST, run_cli

import metric_models as mm
from ditkit.formats import metric_models
from ditkit.nn.metric_nets import torchmetrics
from ditkit.ops import image_metrics as im

ASSET = "tiny-digits-text"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine, OpenMP threads of the Inception forward wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return mm.write_all(tmp_path_factory.mktemp("metric-models"))


def _images(n, size, seed, lo=0, hi=256):
    g = np.random.default_rng(seed)
    return g.integers(lo, hi, (n, size, size, 3), dtype=np.uint8)


# -- each metric against an independent computation ------------------------------------------------------

def test_clip_score_matches_direct_cosines(models):
    model, processor = metric_models.load_clip(str(models["clip"]))
    imgs, prompts = _images(5, 32, 0), ["a handwritten seven", "the digit 3", "a 1", "two", "nine"]
    value = im.clip_score((model, processor), imgs, prompts)
    # independent: the CLIP towers called directly, 100 x cosine, mean, clamped at 0 (CLIPScore's definition)
    with torch.no_grad():
        px = processor.image_processor(images=[Image.fromarray(i) for i in imgs], return_tensors="pt")["pixel_values"]
        tx = processor.tokenizer(prompts, return_tensors="pt", padding=True)
        a = model.vision_model(pixel_values=px).pooler_output @ model.visual_projection.weight.T
        t = model.text_model(**tx).pooler_output @ model.text_projection.weight.T
    cos = F.cosine_similarity(a, t, dim=-1)
    assert value == pytest.approx(max(0.0, float(100 * cos.mean())), abs=1e-3)
    assert 0 < value < 100


def _fid_independent(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(Sa) + tr(Sb) - 2 tr((Sa^1/2 Sb Sa^1/2)^1/2), symmetric eigendecompositions only
    (torchmetrics takes the eigenvalues of Sa Sb instead)."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sb @ root), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)


def _kid_independent(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over all images (Binkowski et al. 2018)."""
    d, m = a.shape[1], len(a)
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)) / (m * (m - 1)) - 2 * kab.mean())


def test_fid_and_kid_match_independent_formulas(models):
    net = metric_models.load_inception(str(models["inception"]))
    a = im.inception_features(net, _images(4, 32, 1))
    b = im.inception_features(net, _images(4, 40, 2, hi=128))  # darker, another size: the network resizes
    assert a.shape == (4, 2048) and torch.isfinite(a).all() and a.std() > 0
    fa, fb = a.numpy(), b.numpy()
    value = im.fid(a, b)
    assert value > 0 and value == pytest.approx(_fid_independent(fa, fb), rel=1e-4)
    assert im.fid(a, a) == pytest.approx(0.0, abs=1e-6 * value)
    assert im.kid(a, b) == pytest.approx(_kid_independent(fa, fb), rel=1e-6)


def _lpips_independent(trunk: dict, heads: dict, x: np.ndarray, y: np.ndarray) -> float:
    """LPIPS v0.1 (AlexNet) written out with F.conv2d on the raw state dicts."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    convs = [(0, 4, 2), (3, 1, 2), (6, 1, 1), (8, 1, 1), (10, 1, 1)]  # (index, stride, padding)

    def feats(z):
        h = (torch.from_numpy(z).permute(0, 3, 1, 2).float() / 127.5 - 1 - shift) / scale
        out = []
        for j, (i, stride, pad) in enumerate(convs):
            if j in (1, 2):
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(F.conv2d(h, trunk[f"features.{i}.weight"], trunk[f"features.{i}.bias"], stride, pad))
            out.append(h)
        return out

    total = 0.0
    for j, (fx, fy) in enumerate(zip(feats(x), feats(y))):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = heads[f"lin{j}.model.1.weight"].view(1, -1, 1, 1)
        total = total + ((nx - ny) ** 2 * w).sum(1).mean((1, 2))
    return float(total.mean())


def test_lpips_matches_written_out_formula(models):
    net = metric_models.load_lpips(str(models["lpips"].parent))  # a directory holding the AlexNet file
    x, y = _images(3, 64, 3), _images(3, 64, 4)
    trunk = torch.load(models["lpips"], weights_only=True)
    tm = Path(torchmetrics().__file__).parent
    heads = torch.load(tm / "functional/image/lpips_models/alex.pth", map_location="cpu", weights_only=True)
    value = im.lpips(net, x, y)
    assert value > 0 and value == pytest.approx(_lpips_independent(trunk, heads, x, y), rel=1e-4)
    assert im.lpips(net, x, x) == pytest.approx(0.0, abs=1e-7)


# -- weights that are missing or wrong: exit 2, one line naming the file ----------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("fid=/nonexistent/inception.pth", "weights-inception-2015-12-05-6726825d.pth"),
    ("lpips=/nonexistent", "alexnet-owt-7be5be79.pth"),
    ("clip", "--metric clip needs a local CLIP model directory"),
    ("clip=/nonexistent", "not a CLIP model directory"),
    ("image-reward", "--metric image-reward is not offered"),
    ("bogus", "unknown --metric 'bogus'"),
])
def test_missing_weights_exit_2_with_one_line(spec, expected):
    code, out, err = run_cli("bench", ASSET, *FAST, "--metric", spec)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert lines[-1].startswith("Error: ") and expected in lines[-1], err
    assert sum(l.startswith("Error") for l in lines) == 1


def test_default_place_is_torch_hub(monkeypatch, tmp_path, models):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    code, _, err = run_cli("bench", ASSET, *FAST, "--metric", "fid")
    hub = tmp_path / "hub" / "checkpoints"
    assert code == 2 and f"put it in {hub}" in err and metric_models.INCEPTION_URL in err
    hub.mkdir(parents=True)
    shutil.copy(models["inception"], hub)
    assert metric_models.weights_file("fid", None, metric_models.INCEPTION_FILE, "") == hub / metric_models.INCEPTION_FILE


def test_wrong_file_is_refused(models):
    code, _, err = run_cli("bench", ASSET, *FAST, "--metric", f"fid={models['lpips']}")
    assert code == 2 and "is not torch-fidelity's Inception-v3" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("args, expected", [
    (["--max-lpips", "0.1"], "add --metric lpips"),
    (["--metric", "fid", "--max-fid-ratio", "2"], "give --fid-reference DIR"),
    (["--fid-reference", "."], "add --metric fid"),
])
def test_gate_needs_its_metric(args, expected):
    code, _, err = run_cli("bench", ASSET, *FAST, *args)
    assert code == 2 and expected in err


# -- bench end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """tiny-digits-text with its transformer weights perturbed: images that differ from the base's."""
    from ditkit.formats.layouts import load_bundle

    src = load_bundle(ASSET).path
    dst = tmp_path_factory.mktemp("variant") / "perturbed"
    shutil.copytree(src, dst)
    f = next((dst / "transformer").glob("*.safetensors"))
    state = load_file(f)
    g = torch.Generator().manual_seed(3)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(f), metadata={"format": "pt"})
    return dst


def test_bench_metrics_ratios_and_gates(models, variant, tmp_path):
    plot = tmp_path / "bench.png"
    code, out, err = run_cli(
        "bench", ASSET, variant, *FAST, "--json", "--plot", plot,
        "--metric", f"clip={models['clip']}", "--metric", f"fid={models['inception']}",
        "--metric", f"kid={models['inception'].parent}", "--metric", f"lpips={models['lpips']}",
        "--min-clip-ratio", "0.5", "--max-fid", "1e9", "--max-lpips", "0")
    assert code == 1, err  # --max-lpips 0 fails: the variant's images differ
    doc = json.loads(out)
    assert doc["config"]["prompts"] == load_prompts()  # no --prompt: the bundle's own prompt set
    base, var = (m["quality"] for m in doc["models"])
    assert base["metrics"]["fid"] == 0 and base["metrics"]["lpips"] == 0  # FID to base: the base is the reference
    assert all(math.isfinite(v) for v in var["metrics"].values())
    assert var["metrics"]["fid"] > 0 and var["metrics"]["lpips"] > 0 and base["metrics"]["clip"] > 0
    assert var["metric_ratios"]["clip"] == pytest.approx(var["metrics"]["clip"] / base["metrics"]["clip"], rel=1e-4)
    assert var["metric_ratios"]["fid"] is None  # FID to base: the base's is 0, no ratio
    gates = {g["name"]: g for g in doc["gates"]}
    assert gates["min_clip_ratio"]["passed"] and gates["max_fid"]["passed"]
    assert not gates["max_lpips"]["passed"] and gates["max_lpips"]["value"] == var["metrics"]["lpips"]
    assert "max_lpips on perturbed" in err
    assert plot.stat().st_size > 10_000


def load_prompts():
    from ditkit.formats.layouts import load_bundle

    return load_bundle(ASSET).defaults()["prompts"]


def test_bench_fid_against_a_reference_folder(models, variant, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(_images(4, 40, 9)):
        Image.fromarray(img).save(ref / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\n\nthe digit 3\n")  # DrawBench / PartiPrompts style: one per line
    code, out, err = run_cli(
        "bench", ASSET, variant, *FAST, "--json", "--prompts-file", prompts, "--metric", f"fid={models['inception']}",
        "--metric", f"kid={models['inception']}", "--fid-reference", ref, "--max-fid-ratio", "1e-6")
    assert code == 1, err  # a ratio this small must fail
    doc = json.loads(out)
    assert doc["config"]["prompts"] == ["a handwritten seven", "the digit 3"]
    base, var = (m["quality"] for m in doc["models"])
    assert base["metrics"]["fid"] > 0 and var["metrics"]["fid"] > 0
    ratio = var["metric_ratios"]["fid"]
    assert ratio == pytest.approx(var["metrics"]["fid"] / base["metrics"]["fid"], rel=1e-4)
    gate = next(g for g in doc["gates"] if g["name"] == "max_fid_ratio")
    assert not gate["passed"] and gate["value"] == ratio
