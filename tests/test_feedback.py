"""distill --mode feedback (Inner Loop Feedback): the partial step's arithmetic, training that leaves the backbone
bit-identical, the bundle on disk, generate applying it, exact resume, and the ops it refuses to stack with."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditkit.formats.layouts import load_bundle, save_bundle
from ditkit.formats.embeddings import load_embeddings
from ditkit.formats.errors import ConfigError, FormatError
from ditkit.formats.images import read_images
from ditkit.ops.cache import CachePolicy, cached_predict
from ditkit.ops.distill import DistillConfig, distill
from ditkit.ops.distill.feedback import MAX_CHAIN, choose_schedule, predicted_speedup
from ditkit.ops.feedback import Feedback, FeedbackModule, FeedbackSchedule, feedback_predict
from ditkit.ops.generate import GenerateConfig, generate
from ditkit.ops.sample import denoise, image_noise, make_scheduler
from conftest import FAMILY_NAMES, sigterm_during_distill

FAST = dict(steps=4, batch_size=8, pool_size=4, val_images=2, lr=1e-3, ema_decay=0.0, warmup_steps=0)
CLI_FAST = ["--steps", 4, "--batch-size", 8, "--pool-size", 4, "--val-images", 2, "--ema-decay", 0,
            "--warmup-steps", 0, "--checkpoint-every", 2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(root):
    return load_file(str(next((root / "transformer").glob("*.safetensors"))))


def _run(bundle, predict, steps=6):
    fam, tr = bundle.family, bundle.transformer
    s = tr.config.sample_size
    noise = image_noise(0, [0, 1, 2, 3], (fam.latent_channels(tr), s, s))
    cond = {"class_labels": torch.tensor([1, 2, 3, 1])}
    return denoise(fam, tr, make_scheduler(fam, bundle.scheduler, "ddim"), noise, cond, None, 1.0, steps,
                   predict=predict)


def test_partial_steps_with_a_zero_gate_are_the_cached_deviation(tiny_dir):
    """No partial step: the plain run bit for bit. Gate 0: a partial step adds the cached deviation
    H_prev - g_prev to the fresh block-0 input, which is what ditkit cache's skip of every block computes."""
    b = load_bundle(tiny_dir("dit"))
    fam, tr = b.family, b.transformer
    L = len(fam.blocks(tr))
    module = FeedbackModule(fam.blocks(tr)[L - 1], f"transformer_blocks.{L - 1}")
    sched = lambda partial: FeedbackSchedule("ddim", 6, L, L - 1, partial)  # noqa: E731
    plain = _run(b, None)
    none = Feedback(module, sched([False] * 6))
    assert torch.equal(_run(b, feedback_predict(b, none, 1.0)), plain)
    partial = [False, True, True, False, True, False]
    fb = _run(b, feedback_predict(b, Feedback(module, sched(partial)), 1.0))
    skip = [None if not p else (0, L) for p in partial]
    cached = _run(b, cached_predict(b, CachePolicy("ddim", 6, L, skip), 1.0))
    torch.testing.assert_close(fb, cached, atol=1e-5, rtol=1e-5)
    assert not torch.equal(fb, plain)
    # a non-zero gate changes the partial steps only through the feedback block
    with torch.no_grad():
        module.scale.fill_(0.5)
    moved = _run(b, feedback_predict(b, Feedback(module, sched(partial)), 1.0))
    assert not torch.allclose(moved, fb)


def test_schedule_takes_the_cheapest_error_steps_within_the_chain_limit():
    cost = {"full_ms": 10.0, "partial_ms": 2.0, "step_overhead_ms": 0.0, "decode_ms": 0.0}
    errors = [0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # later steps are worse
    p = choose_schedule(errors, cost, 1.5)
    assert p[0] is False and predicted_speedup(p, cost) >= 1.5
    # 5 partial steps reach 1.67x (4 give 1.47x); step 4 would make a 4th partial step in a row
    assert p == [False, True, True, True, False, True, True, False, False, False]
    assert choose_schedule(errors, cost, None) == [False, True, True, True, False, True, True, True, False, False]
    # the default target (1.7x) out of reach: as many partial steps as the chain limit allows, no error
    slow = {**cost, "partial_ms": 8.0}
    p = choose_schedule(errors, slow, None)
    runs = "".join("p" if v else "F" for v in p).split("F")
    assert max(len(r) for r in runs) == MAX_CHAIN and sum(p) == 7
    with pytest.raises(ConfigError, match="out of reach"):  # an explicit target is a requirement
        choose_schedule(errors, slow, 1.5)


FIXED_COST = {"full_ms": 10.0, "partial_ms": 3.0, "step_overhead_ms": 0.0, "decode_ms": 20.0}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_feedback_trains_only_its_module(family, tiny_dir, tiny_embeddings, monkeypatch, tmp_path):
    import ditkit.ops.distill.feedback as fbmode

    # the tiny models' timings are noise (flux's has one block per stack): a fixed cost model, no measuring
    monkeypatch.setattr(fbmode, "cost_model", lambda *a, **k: dict(FIXED_COST))
    monkeypatch.setattr(fbmode, "measured_speedup", lambda *a, **k: 9.0)
    base = load_bundle(tiny_dir(family))
    emb = load_embeddings(tiny_embeddings(family)) if family != "dit" else None
    before = {k: v.clone() for k, v in base.transformer.state_dict().items()}
    out, report = distill(base, DistillConfig(mode="feedback", **FAST), embeddings=emb)
    # the backbone is the base's own module, untouched and frozen; only the feedback module trained
    assert out.transformer is base.transformer
    assert all(torch.equal(before[k], v) for k, v in base.transformer.state_dict().items())
    fb = out.feedback
    assert report.params_trained == sum(p.numel() for p in fb.module.parameters()) < report.params
    assert float(fb.module.scale) != 0.0  # the gate moved off zero
    s = fb.schedule
    assert s.steps == base.defaults()["steps"] and s.block == len(base.family.blocks(base.transformer)) - 1
    assert not s.partial[0] and s.partial_steps() > 0
    assert (report.details["pool"]["text_stream"]) == (family in ("sd3", "flux"))
    assert torch.isfinite(torch.tensor(report.final_loss))
    assert out.defaults() == base.defaults() and report.validation["images"] == 2
    # the trained module changes the partial steps' output; the full steps are the backbone's own
    cfg = GenerateConfig(num_images=2)
    with_fb, _ = generate(out, cfg, emb)
    plain, _ = generate(out, dataclasses.replace(cfg, feedback=False), emb)
    ref, _ = generate(base, cfg, emb)
    assert np.array_equal(plain, ref) and not np.array_equal(with_fb, ref)
    # saved and reloaded: the same module (rebuilt as a copy of the named backbone block)
    save_bundle(out, tmp_path / "fb", {"op": "distill"})
    again, _ = generate(load_bundle(tmp_path / "fb"), cfg, emb)
    assert np.array_equal(again, with_fb)


def test_feedback_bundle_round_trip_and_generate(tiny_dir, cli, tmp_path):
    src = tiny_dir("dit")
    out = tmp_path / "fb"
    r = cli("distill", src, "-o", out, "--mode", "feedback", *CLI_FAST, "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert (out / "feedback" / "feedback.safetensors").is_file()
    a, b = _weights(src), _weights(out)  # the backbone on disk: the source's tensors, bit for bit
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_bundle(out)
    assert loaded.feedback.schedule.to_dict() == doc["details"]["schedule"]
    acc = cli("info", out, "--json").json()["acceleration"]
    assert acc["kind"] == "feedback" and acc["partial_steps"] == loaded.feedback.schedule.partial_steps() > 0
    # the reloaded module is the trained one: same images as the in-memory bundle distill returned
    cfg = GenerateConfig(labels=[1, 2, 3], num_images=4)
    args = ["--labels", "1,2,3", "--num-images", 4, "--json"]
    g = cli("generate", out, "-o", tmp_path / "g", *args)
    off = cli("generate", out, "-o", tmp_path / "off", "--no-feedback", *args)
    plain = cli("generate", src, "-o", tmp_path / "plain", *args)
    assert g.code == off.code == plain.code == 0, g.err + off.err
    assert g.json()["feedback"]["applied"] is True and g.json()["feedback"]["partial_steps"] > 0
    assert off.json()["feedback"] is None
    ig, io, ip = (read_images(tmp_path / d) for d in ("g", "off", "plain"))
    assert np.array_equal(io, ip) and not np.array_equal(ig, ip)
    images, _ = generate(loaded, cfg)
    assert np.array_equal(images, ig)
    other = cli("generate", out, "-o", tmp_path / "s3", "--labels", "1", "--steps", 3, "--json")
    assert other.code == 0 and other.json()["feedback"]["applied"] is False


def test_ops_that_do_not_stack_with_feedback_refuse(tiny_dir, cli, tmp_path, monkeypatch):
    import ditkit.ops.distill.feedback as fbmode

    # the refusals are the point: a fixed cost model, so a busy machine's timing cannot leave no step partial
    monkeypatch.setattr(fbmode, "cost_model", lambda *a, **k: dict(FIXED_COST))
    monkeypatch.setattr(fbmode, "measured_speedup", lambda *a, **k: 9.0)
    src = tiny_dir("dit")
    out = tmp_path / "fb"
    r = cli("distill", src, "-o", out, "--mode", "feedback", *CLI_FAST)
    assert r.code == 0, r.err
    for args in (["cache", out], ["prune", out, "--method", "depth"], ["quantize", out, "--scheme", "int8-dynamic"],
                 ["export", out, "--format", "onnx"], ["distill", out, "--mode", "feedback"]):
        r = cli(*args, "-o", tmp_path / "x")
        assert r.code == 2 and "feedback" in r.error_line, (args, r.err)
        assert not (tmp_path / "x").exists()
    lora = cli("generate", out, "-o", tmp_path / "x", "--lora", tmp_path / "none.safetensors")
    assert lora.code == 2 and "--no-feedback" in lora.error_line
    # a module is never saved with (or loaded onto) weights other than those it was trained on
    b = load_bundle(out)
    changed = dataclasses.replace(b, transformer=copy.deepcopy(b.transformer))
    with torch.no_grad():
        next(changed.transformer.parameters()).add_(1.0)
    with pytest.raises(FormatError, match="other backbone weights"):
        save_bundle(changed, tmp_path / "stale", {"op": "test"})
    assert not (tmp_path / "stale").exists()
    # diffusers export carries it (same backbone)
    d = cli("export", out, "-o", tmp_path / "d", "--format", "diffusers")
    assert d.code == 0, d.err
    assert load_bundle(tmp_path / "d").feedback is not None


def test_feedback_resume_after_sigterm_equals_uninterrupted(tiny_dir, tmp_path, cli, monkeypatch):
    import ditkit.ops.distill.feedback as fbmode

    src = tiny_dir("dit")
    # a fixed cost model: both runs get the same schedule (a timed one may differ between two runs)
    fixed = {"full_ms": 10.0, "partial_ms": 3.0, "step_overhead_ms": 0.0, "decode_ms": 20.0}
    monkeypatch.setattr(fbmode, "cost_model", lambda *a, **k: dict(fixed))
    a = cli("distill", src, "-o", tmp_path / "a", "--mode", "feedback", *CLI_FAST, "--json")
    assert a.code == 0, a.err
    restore = sigterm_during_distill(monkeypatch, 2)  # SIGTERM arrives after step 2
    b = cli("distill", src, "-o", tmp_path / "b", "--mode", "feedback", *CLI_FAST)
    assert b.code == 130 and not (tmp_path / "b").exists()
    restore()
    # the resumed run keeps the schedule the interrupted one was timed and started with
    monkeypatch.setattr(fbmode, "cost_model", lambda *a, **k: pytest.fail("a resumed run must not re-time"))
    r = cli("distill", src, "-o", tmp_path / "b", "--mode", "feedback", *CLI_FAST, "--resume", "--json")
    assert r.code == 0, r.err
    assert r.json()["resumed_from"] == 2
    fa = load_file(str(tmp_path / "a" / "feedback" / "feedback.safetensors"))
    fb = load_file(str(tmp_path / "b" / "feedback" / "feedback.safetensors"))
    sb = json.loads((tmp_path / "b" / "ditkit.json").read_text())["report"]["details"]["schedule"]
    assert sb == a.json()["details"]["schedule"] and any(sb["partial"])
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
