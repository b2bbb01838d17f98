"""What makes `ditkit cache`'s calibration fast without changing its result: a denoise run resumed from a
snapshot gives the full run's latents bit for bit (the sensitivity runs start at the step they perturb), and the
knob search bisects (each setting run once per method) to the setting a scan from the slow end finds."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ditkit.formats.layouts import load_bundle
from ditkit.ops.cache import calibrate
from ditkit.ops.cache.methods import Knob
from ditkit.ops.sample import denoise, image_noise, make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family,sampler", [("dit", "ddim"), ("dit", "dpm++"), ("dit", "euler"),
                                            ("sd3", "flow-euler")])
def test_a_resumed_denoise_is_the_full_run_bit_for_bit(family, sampler, tiny_dir):
    import copy

    b = load_bundle(tiny_dir(family))
    fam, tr = b.family, b.transformer
    noise = image_noise(0, [0, 1, 2, 3], (fam.latent_channels(tr), 8, 8))
    cond = fam.dummy_cond(tr, 4, torch.Generator().manual_seed(0))
    states = []
    full = denoise(fam, tr, make_scheduler(fam, b.scheduler, sampler), noise, cond, None, 1.0, 7,
                   snapshot=lambda i, x, s: states.append((i, x.clone(), copy.deepcopy(s))))
    assert [i for i, _, _ in states] == list(range(7))
    for i, x, s in states[1:]:
        again = denoise(fam, tr, copy.deepcopy(s), noise, cond, None, 1.0, 7, start=(i, x))
        assert torch.equal(again, full), (sampler, i)


def _method(knob: Knob, speed, candidates: int = 0):
    """A method whose predicted speedup at knob value v is speed(v) (a pure function of the knob)."""
    mod = SimpleNamespace(KNOB=knob, params=lambda fitted, v, steps: {"v": v})
    if candidates:
        mod.candidates = lambda fitted, v, steps: [{"v": v, "k": k} for k in range(candidates)]
    return mod


def _scan(knob: Knob, speed, goal: float, steps: int):
    vals = calibrate._knob_values(knob, steps)
    return next(v for v in vals if speed(v) >= goal)


@pytest.mark.parametrize("faster_when_higher", [True, False])
def test_integer_bisection_finds_the_scans_setting_with_fewer_runs(faster_when_higher):
    steps = 25
    knob = Knob("n", 1 if faster_when_higher else 2, 0, integer=True, faster_when_higher=faster_when_higher)
    speed = (lambda v: 1 + 0.1 * v) if faster_when_higher else (lambda v: steps / v)
    runs = []

    def spd_of(p):
        runs.append(p["v"])
        return speed(p["v"])
    c = SimpleNamespace(steps=steps)
    seen = {}
    for goal in (1.5, 2.3, 1.9):  # later searches at other goals (the measurement's corrections)
        p, pred = calibrate._search_knob(c, _method(knob, speed), {}, goal, spd_of, lambda p: 0.0, seen)
        assert p["v"] == _scan(knob, speed, goal, steps) and pred == speed(p["v"]) >= goal
    assert len(set(runs)) <= 12  # a scan from the slow end would run up to 23 settings for these three goals


def test_float_bisection_and_candidates_pick_the_least_error_at_the_setting_found():
    knob = Knob("threshold", 1e-3, 2.0)
    speed = lambda v: 1 + math.log1p(1000 * v) / 3  # noqa: E731  monotone in the threshold
    c = SimpleNamespace(steps=25)
    err = lambda p: abs(p["k"] - 2)  # noqa: E731  candidate 2 has the least error
    p, pred = calibrate._search_knob(c, _method(knob, speed, candidates=4), {}, 2.5,
                                     lambda p: speed(p["v"]), err, {})
    assert p["k"] == 2 and pred >= 2.5
    assert speed(p["v"] * (1 - 1e-3)) < 2.5 + 1e-3  # the slowest setting, to the bisection's resolution
    with pytest.raises(calibrate._Short):
        calibrate._search_knob(c, _method(knob, speed), {}, 10.0, lambda p: speed(p["v"]), err, {})
