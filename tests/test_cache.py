"""ditkit cache: a calibrated step-caching policy in the manifest, weights untouched, applied by generate."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FAMILY_NAMES
from ditkit.formats.families import FAMILIES
from ditkit.formats.layouts import load_bundle
from ditkit.formats.images import read_images
from ditkit.formats.families import FAMILIES
from ditkit.ops.cache import CACHE_METHODS, CachePolicy, cached_predict
from ditkit.ops.cache.methods import method
from ditkit.ops.generate import GenerateConfig, generate
from ditkit.ops.metrics import psnr
from ditkit.ops.sample import denoise, image_noise, make_scheduler

STEPS = 6


def _weights(root):
    return load_file(str(next((root / "transformer").glob("*.safetensors"))))


def test_policy_of_no_skips_is_the_plain_run_exactly(tiny_dir):
    b = load_bundle(tiny_dir("dit"))
    fam, tr = b.family, b.transformer
    n_blocks = len(fam.blocks(tr))
    noise = image_noise(0, [0, 1, 2, 3], (fam.latent_channels(tr), 8, 8)) if tr.config.sample_size == 8 else \
        image_noise(0, [0, 1, 2, 3], (fam.latent_channels(tr), tr.config.sample_size, tr.config.sample_size))
    cond = {"class_labels": torch.tensor([1, 2, 3, 1])}
    run = lambda predict: denoise(fam, tr, make_scheduler(fam, b.scheduler, "ddim"), noise, cond, None, 1.0, 4,
                                  predict=predict)
    plain = run(None)
    none = CachePolicy(sampler="ddim", steps=4, num_blocks=n_blocks, skip=[None] * 4)
    assert torch.equal(run(cached_predict(b, none, 1.0)), plain)
    skip = CachePolicy(sampler="ddim", steps=4, num_blocks=n_blocks, skip=[None, (0, n_blocks), None, (0, 1)])
    cached = run(cached_predict(b, skip, 1.0))
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    # skipping every block reuses step 0's residual: still close to the plain run after one step
    assert float((cached - plain).norm() / plain.norm()) < 1.0


def test_cache_writes_policy_keeps_weights_and_generate_applies_it(tiny_dir, cli, tmp_path):
    src = tiny_dir("dit")
    out = tmp_path / "cached"
    r = cli("cache", src, "-o", out, "--method", "blocks", "--target-speedup", 1.2, "--steps", STEPS, "--images", 4,
            "--no-timing", "--json")  # FLOP cost model: the timed search picks by the machine's load (0.022 once)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["predicted_speedup"] >= 1.2 and doc["skipped_block_steps"] > 0
    assert 0 < doc["latent_rel_error"] < 0.01, doc  # blocks were skipped (not 0), and the result stays close
    manifest = json.loads((out / "ditkit.json").read_text())
    policy = manifest["cache"]
    assert manifest["op"] == "cache" and policy["steps"] == STEPS and policy["skip"][0] is None
    assert policy["method"] == doc["method"] == "blocks"
    assert sum(r[1] - r[0] for r in policy["skip"] if r) == doc["skipped_block_steps"]
    a, b = _weights(src), _weights(out)  # weights carried over bit-identical
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    args = ["--labels", "1,2,3", "--num-images", 4, "--steps", STEPS, "--json"]
    base = cli("generate", src, "-o", tmp_path / "base", *args)
    cached = cli("generate", out, "-o", tmp_path / "c", *args)
    off = cli("generate", out, "-o", tmp_path / "off", "--no-cache", *args)
    assert base.code == cached.code == off.code == 0, base.err + cached.err + off.err
    assert cached.json()["cache"]["applied"] is True and off.json()["cache"] is None
    ib, ic, io = (read_images(tmp_path / d) for d in ("base", "c", "off"))
    assert np.array_equal(ib, io)  # --no-cache: exactly the uncached images
    assert not np.array_equal(ib, ic)  # the policy ran
    # another step count does not fit the policy: it is not applied, and the report says so
    other = cli("generate", out, "-o", tmp_path / "s3", "--labels", "1", "--steps", 3, "--json")
    assert other.code == 0 and other.json()["cache"]["applied"] is False


TEXT_ONE_STREAM = [f for f in FAMILY_NAMES if FAMILIES[f].conditioning == "text" and not FAMILIES[f].two_stream]


@pytest.mark.parametrize("family", TEXT_ONE_STREAM)
def test_text_families_calibrate_on_embeddings(family, tiny_dir, tiny_embeddings, cli, tmp_path):
    """Text families calibrate on a precomputed embeddings file; generate applies the policy with the same file."""
    src, emb = tiny_dir(family), tiny_embeddings(family)
    r = cli("cache", src, "-o", tmp_path / "c", "--target-speedup", 1.1, "--steps", STEPS, "--images", 2,
            "--embeddings", emb, "--no-timing", "--json")  # FLOP cost model: no timing flakes on a busy machine
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["skipped_block_steps"] > 0 and 0 < doc["latent_rel_error"] < 0.15, doc  # 0.06-0.09 here
    args = ["--embeddings", emb, "--num-images", 2, "--steps", STEPS, "--json"]
    base, cached = cli("generate", src, "-o", tmp_path / "b", *args), cli("generate", tmp_path / "c", "-o",
                                                                          tmp_path / "g", *args)
    assert base.code == cached.code == 0 and cached.json()["cache"]["applied"] is True
    ib, ic = read_images(tmp_path / "b"), read_images(tmp_path / "g")
    assert not np.array_equal(ib, ic) and psnr(ic, ib) > 10
    r = cli("cache", src, "-o", tmp_path / "x")  # no embeddings: one line naming the fix, nothing written
    assert r.code == 2 and "--embeddings" in r.error_line and not (tmp_path / "x").exists()


def test_cache_op_applies_in_the_generate_op(tiny_dir):
    from ditkit.ops.cache import CacheConfig, cache

    b = load_bundle(tiny_dir("dit"))
    cfg = GenerateConfig(labels=[1, 2], steps=STEPS)
    plain, _ = generate(b, cfg)
    b, rep = cache(b, CacheConfig(target_speedup=1.2, method="blocks", steps=STEPS, images=4, timing=False))
    cached, g = generate(b, cfg)
    again, g2 = generate(b, GenerateConfig(labels=[1, 2], steps=STEPS, cache=False))
    assert g.cache["applied"] and g2.cache is None and np.array_equal(again, plain)
    assert rep.image_psnr is not None and rep.image_psnr > 30  # the tiny pipeline has a VAE (97 dB here)
    assert psnr(cached, plain) > 10


def test_no_timing_calibrates_from_flops_the_same_policy_every_time(tiny_dir, cli, tmp_path):
    """--no-timing: the FLOP cost model, no end-to-end check; two runs write the same policy (the timed search
    can differ with the machine's load), the report names the unit and measures nothing."""
    src = tiny_dir("dit")
    docs = []
    for name in ("a", "b"):
        r = cli("cache", src, "-o", tmp_path / name, "--target-speedup", 1.2, "--steps", STEPS, "--images", 2,
                "--no-timing", "--json")
        assert r.code == 0, r.err
        docs.append(r.json())
    a, b = docs
    assert a["cost_unit"] == "flops" and a["measured_speedup"] is None and a["cost_ms"]["full_ms"] is None
    assert a["predicted_speedup"] >= 1.2 and a["checks"][-1]["kept"]["measured_speedup"] is None
    assert a["policy"] == b["policy"] and a["image_psnr"] == b["image_psnr"]
    assert all(m.get("measured_speedup") is None for m in a["methods"])
    manifest = json.loads((tmp_path / "a" / "ditkit.json").read_text())
    assert manifest["cache"] == a["policy"] and manifest["config"]["timing"] is False


def test_bad_target_speedup_and_unsupported_family_exit_2(tiny_dir, cli, tmp_path):
    r = cli("cache", tiny_dir("dit"), "-o", tmp_path / "x", "--target-speedup", 0.9)
    assert r.code == 2 and r.error_line == "Error: --target-speedup must be a number > 1 (got 0.9)"
    assert not (tmp_path / "x").exists()
    r = cli("cache", tiny_dir("dit"), "-o", tmp_path / "y", "--target-speedup", 1000, "--steps", 3)
    assert r.code == 2 and "out of reach" in r.error_line
    r = cli("cache", tiny_dir("sd3"), "-o", tmp_path / "z", "--method", "blocks", "--steps", 3)
    assert r.code == 2 and r.error_line.startswith("Error: --method blocks: the sd3 family's blocks return")
    assert not (tmp_path / "z").exists()
    r = cli("cache", tiny_dir("dit"), "-o", tmp_path / "w", "--method", "nope")
    assert r.code == 2 and r.error_line.startswith("Error: unknown cache method 'nope', choose one of: auto, blocks")


# each method's settings that skip nothing, and settings that skip (ops/cache/methods.py)
NO_SKIP = {"forecast": lambda S: {"full": [True] * S, "order": [None] * S},
           "teacache": lambda S: {"threshold": 0.0, "coefficients": [1.0, 0.0]},
           "fbcache": lambda S: {"threshold": 0.0},
           "magcache": lambda S: {"threshold": 0.0, "mag_ratios": [0.9] * S},  # every step some error > 0
           "taylorseer": lambda S: {"cache_interval": 1},
           "pab": lambda S: {"skip_range": 1},
           "blocks": lambda S: {"skip": [None] * S}}
SKIP = {"forecast": lambda S: {"full": [i % 3 == 0 for i in range(S)], "order": [None if i % 3 == 0 else 1
                                                                                for i in range(S)]},
        "teacache": lambda S: {"threshold": 1e9, "coefficients": [1.0, 0.0]},
        "fbcache": lambda S: {"threshold": 1e9},
        "magcache": lambda S: {"threshold": 1e9, "mag_ratios": [1.0] * S},
        "taylorseer": lambda S: {"cache_interval": 3},
        "pab": lambda S: {"skip_range": 3},
        "blocks": lambda S: {"skip": [None] + [[0, 1]] * (S - 1)}}


def test_every_method_has_its_test_settings():
    assert set(NO_SKIP) == set(SKIP) == set(CACHE_METHODS)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_runs_on_every_family_and_skipping_nothing_is_the_plain_run(family, tiny_dir):
    """Each registered method on each registered family's tiny model: its settings that skip nothing give the
    uncached latents bit for bit (fbcache at threshold 0 included); its skipping settings change them, finitely,
    and leave the transformer as it was (the hooks are removed after the last step)."""
    b = load_bundle(tiny_dir(family))
    fam, tr = b.family, b.transformer
    S = 8
    noise = image_noise(0, [0, 1, 2, 3], (fam.latent_channels(tr), 8, 8))
    cond = fam.dummy_cond(tr, 4, torch.Generator().manual_seed(0))
    sampler = fam.default_sampler
    run = lambda predict: denoise(fam, tr, make_scheduler(fam, b.scheduler, sampler), noise, cond, None, 1.0, S,
                                  predict=predict)
    plain = run(None)
    for name in CACHE_METHODS:
        mod = method(name)
        if mod.unsupported(b):
            assert (name == "blocks" and fam.two_stream) or (name == "fbcache" and family == "sd3")  # 2 blocks
            continue
        same = run(mod.runtime(b, NO_SKIP[name](S), S, 1.0)())
        assert torch.equal(same, plain), f"{name} skipping nothing on {family}"
        other = run(mod.runtime(b, SKIP[name](S), S, 1.0)())
        assert torch.isfinite(other).all() and not torch.equal(other, plain), f"{name} skipping on {family}"
        assert float((other - plain).norm() / plain.norm()) < 1.5, name
        assert torch.equal(run(None), plain), f"{name} left hooks on {family}"


def test_forecast_first_order_beats_reuse_and_the_dp_spends_its_full_steps():
    """The forecast schedule's dynamic program on synthetic residuals that change linearly in t: first order
    forecasts them exactly, so with 3 full steps of 10 the predicted error is ~0 and every forecast step is
    first order; zero order (reuse) would carry an error."""
    from ditkit.ops.cache import forecast

    recs = [{"t": 1000.0 - 100 * i, "r_h": torch.full((1, 4, 8), 1.0 + 0.1 * i), "r_e": None} for i in range(10)]
    fitted = forecast.fit(recs, 10)
    p = forecast.params(fitted, 3, 10)
    assert sum(p["full"]) == 3 and p["full"][0] and p["full"][1]
    assert p["predicted_error"] < 1e-5 and all(o == 1 for o, f in zip(p["order"], p["full"]) if not f)
    assert max(fitted["err0"][1][s] for s in range(2, 10)) > 0.05


def test_text_family_calibrates_from_embeddings(tiny_dir, tiny_embeddings):
    """PixArt (prompts from an embeddings file): fbcache and forecast calibrate to a small target; the policy
    names its method and generate applies it."""
    from ditkit.formats.embeddings import load_embeddings
    from ditkit.ops.cache import CacheConfig, cache

    b = load_bundle(tiny_dir("pixart"))
    emb = load_embeddings(tiny_embeddings("pixart"))
    b, rep = cache(b, CacheConfig(target_speedup=1.1, method="forecast", steps=STEPS, timing=False), emb)  # no flakes
    assert rep.method == "forecast" and rep.predicted_speedup >= 1.1 and b.manifest["cache"]["method"] == "forecast"
    assert rep.image_psnr is not None and rep.image_psnr > 20
    g = generate(b, GenerateConfig(num_images=2, steps=STEPS), emb)[1]
    assert g.cache["applied"] and g.cache["method"] == "forecast"


@pytest.mark.slow
def test_auto_at_2x_on_tiny_digits_beats_fbcache(tmp_path):
    """tiny-digits, DDIM 25: auto reaches 2x measured end to end (>= 1.9x) and beats diffusers FirstBlockCache
    calibrated to the same target on the calibration set's PSNR."""
    from ditkit.ops.cache import CacheConfig, cache

    b, rep = cache(load_bundle("tiny-digits"), CacheConfig(target_speedup=2.0))
    fb = {m["method"]: m for m in rep.methods}["fbcache"]
    assert rep.measured_speedup >= 1.9 and rep.image_psnr >= 33.0
    assert "skipped" in fb or rep.image_psnr >= fb["image_psnr"] + 2.0
