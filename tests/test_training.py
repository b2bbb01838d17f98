"""The shared training loop: exact resume after SIGTERM, EMA, log, and no pickles in checkpoints."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from ditkit.formats.checkpoint import CheckpointStore
from ditkit.formats.errors import ConfigError, Interrupted
from ditkit.ops.training import TrainConfig, train
import tiny


def denoise_loss(model, g, rank, world):
    x = torch.randn(8, 4, 8, 8, generator=g)[rank::world]
    noise = torch.randn(x.shape, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)[rank::world]
    t = torch.randint(0, 1000, (8,), generator=g)[rank::world]
    out = model(x + noise, timestep=t, class_labels=labels, return_dict=False)[0][:, :4]
    return torch.nn.functional.mse_loss(out, noise)


def fresh_model():
    m = tiny.tiny_transformer("dit")
    m.requires_grad_(True)
    return m


def run(tmp_path, steps, resume=False, stop_at=None):
    model = fresh_model()
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, ema_decay=0.9, checkpoint_every=2, seed=3)

    def on_step(step, loss):
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(model, denoise_loss, cfg, store=CheckpointStore(tmp_path), resume=resume, on_step=on_step)
    return model, result


def test_resume_after_sigterm_is_bit_identical(tmp_path):
    straight, res = run(tmp_path / "a", 5)
    with pytest.raises(Interrupted, match="--resume"):
        run(tmp_path / "b", 5, stop_at=3)
    resumed, res_b = run(tmp_path / "b", 5, resume=True)
    assert res_b.resumed_from == 3
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    log_a = [json.loads(l) for l in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5] and log_a == log_b
    assert not list((tmp_path / "b" / "checkpoint").glob("*.pt"))


def test_ema_and_losses(tmp_path):
    model, res = run(tmp_path, 4)
    assert res.step == 4 and res.final_loss == res.log[-1]["loss"] and torch.isfinite(torch.tensor(res.final_loss))
    assert not torch.equal(model.state_dict()["proj_out_2.weight"], fresh_model().state_dict()["proj_out_2.weight"])


def test_resume_without_checkpoint_and_bad_config(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(tmp_path, 2, resume=True)
    with pytest.raises(ConfigError, match="divisible"):
        TrainConfig(batch_size=6, grad_accum=4)
