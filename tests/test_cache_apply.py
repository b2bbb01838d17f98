"""A bundle's step-caching policy in generate and bench: `--no-cache` runs the same bundle uncached (the base's
images, bit for bit), a note says when it changes nothing, and bench judges a cached text-family variant."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ditkit.formats.images import read_images
from ditkit.formats.layouts import load_bundle
from ditkit.ops.cache.policy import MethodPolicy
from ditkit.ops.cache.stack import chain_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH_FAST = ["--warmup", "1", "--repeats", "2", "--image-repeats", "1", "--threads", "1", "--json"]


def with_policy(src, dst, steps: int, full_every: int = 2):
    """A copy of `src` whose manifest carries a forecast policy (a full step every `full_every` steps) for its
    default sampler at `steps`: what `ditkit cache` writes, without the calibration."""
    shutil.copytree(src, dst)
    b = load_bundle(src)
    full = [i % full_every == 0 for i in range(steps)]
    policy = MethodPolicy(method="forecast", sampler=b.defaults().get("sampler", b.family.default_sampler),
                          steps=steps, num_blocks=len(chain_blocks(b.family, b.transformer)),
                          params={"full": full, "order": [None if f else 1 for f in full]})
    m = dst / "ditkit.json"
    doc = json.loads(m.read_text()) if m.exists() else {}
    m.write_text(json.dumps({**doc, "cache": policy.to_dict()}))
    return dst


def test_no_cache_runs_the_same_bundle_uncached_in_generate_and_bench(tiny_dir, cli, tmp_path):
    src = tiny_dir("dit")
    cached = with_policy(src, tmp_path / "cached", steps=4)
    fast = ["--num-images", 4, "--steps", 4, *BENCH_FAST]
    on = cli("bench", src, cached, *fast)
    off = cli("bench", src, cached, "--no-cache", *fast)
    assert on.code == off.code == 0, on.err + off.err
    q_on, q_off = (r.json()["models"][1]["quality"] for r in (on, off))
    assert q_on["identical"] is False and q_on["psnr"] < 60  # the policy ran
    assert q_off["identical"] is True  # --no-cache: the base's images
    assert "changes nothing" not in off.err

    args = ["--labels", "1,2", "--num-images", 2, "--steps", 4, "--json"]
    base = cli("generate", src, "-o", tmp_path / "b", *args)
    g_off = cli("generate", cached, "-o", tmp_path / "o", "--no-cache", *args)
    assert base.code == g_off.code == 0 and g_off.json()["cache"] is None
    assert np.array_equal(read_images(tmp_path / "b"), read_images(tmp_path / "o"))
    assert "changes nothing" not in g_off.err


def test_no_cache_without_a_policy_is_a_note_not_an_error(tiny_dir, cli, tmp_path):
    src = tiny_dir("dit")
    r = cli("generate", src, "-o", tmp_path / "g", "--no-cache", "--labels", "1", "--steps", 3, "--json")
    assert r.code == 0 and json.loads(r.out)["num_images"] >= 1  # stdout stays one JSON document
    assert "note: --no-cache changes nothing here: tiny" in r.err or "note: --no-cache changes nothing here" in r.err
    r = cli("bench", src, src, "--no-cache", "--num-images", 0, "--steps", 3, *BENCH_FAST)
    assert r.code == 0 and "note: --no-cache changes nothing here" in r.err


def test_bench_judges_a_cached_text_family_variant(cli, tmp_path):
    """tiny-digits-text (PixArt) and the same bundle with a forecast policy: bench gives both a judge accuracy and
    an FD (the judge reads each prompt's digit through the bundle's prompt_labels)."""
    src = load_bundle("tiny-digits-text").path
    cached = with_policy(src, tmp_path / "tt-cached", steps=25, full_every=2)
    r = cli("bench", "tiny-digits-text", cached, "--num-images", 20, *BENCH_FAST)
    assert r.code == 0, r.err
    base, var = r.json()["models"]
    bq, vq = base["quality"], var["quality"]
    assert bq["judge_accuracy"] is not None and vq["judge_accuracy"] is not None, (bq, vq)
    assert bq["judge_accuracy"] >= 0.8 and vq["judge_accuracy"] >= 0.97 * bq["judge_accuracy"] - 0.05
    assert np.isfinite(bq["judge_fd"]) and np.isfinite(vq["judge_fd"])
    assert vq["identical"] is False and vq["psnr"] > 20  # the policy ran, close to the base
