"""--sharding fsdp (PyTorch FSDP2) under torchrun, 2 gloo CPU processes against 1 at the same global batch: distill and
lora-train end with the same weights, a killed run resumed under fsdp ends where the uninterrupted one does, its
checkpoint resumes in one process, and each process holds about half the parameter + optimizer bytes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ditkit.formats.lora import load_adapter
from ditkit.formats.layouts import load_bundle
from test_lora import make_data

pytestmark = pytest.mark.usefixtures("one_thread")

BIN = Path(sys.executable).parent
HERE = Path(__file__).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# measured (docs/scale.md): fsdp on 2 processes vs 1 process differs by at most 5.8e-6 in any (EMA) weight after 4 steps
# of lr 1e-3 (changes up to 9e-4; 2.2e-5 without the EMA): float summation order, amplified by Adam's first steps on
# near-zero gradients
TOL = 1e-4
DISTILL = ["--mode", "steps", "--steps", "4", "--batch-size", "6", "--pool-size", "4", "--val-images", "2",
           "--student-steps", "2", "--lr", "1e-3", "--warmup-steps", "0", "--ema-decay", "0.9", "--threads", "1"]


def launch(*args, stop_at: int | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 ditkit ARGS` (with stop_at: every process SIGTERMs itself after that step)."""
    head = [sys.executable, str(HERE / "stop_at_step.py"), str(stop_at)] if stop_at else [str(BIN / "ditkit")]
    return subprocess.run(TORCHRUN + head + [str(a) for a in args], capture_output=True, text=True, timeout=600,
                          env=ENV)


def weights(out: Path) -> dict:
    return load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_distill_fsdp_matches_one_process_resumes_and_halves_state(tiny_dir, tmp_path, cli):
    src = tiny_dir("dit")
    one = cli("distill", src, *DISTILL, "-o", tmp_path / "one", "--json")
    assert one.code == 0, one.err
    two = launch("distill", src, *DISTILL, "--sharding", "fsdp", "-o", tmp_path / "two", "--json")
    assert two.returncode == 0, two.stderr[-3000:]
    d1, d2 = one.json(), json.loads(two.stdout)  # only rank 0 prints
    w0, w1, w2 = weights(Path(src)), weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max_diff(w1, w0) > 3e-4  # it trained (the EMA of 4 steps of lr 1e-3)
    assert max_diff(w1, w2) < TOL, max_diff(w1, w2)
    # (d) this process's parameter + AdamW bytes: its shards under fsdp
    assert d1["sharding"]["mode"] == "ddp" and d2["sharding"] == {**d2["sharding"], "mode": "fsdp", "processes": 2}
    ratio = d2["sharding"]["state_bytes"] / d1["sharding"]["state_bytes"]
    assert 0.45 < ratio <= 0.6, (d1["sharding"], d2["sharding"])

    # (b) killed after step 2 under fsdp, then --resume under fsdp: the uninterrupted run's weights (EMA included)
    killed = launch("distill", src, *DISTILL, "--sharding", "fsdp", "-o", tmp_path / "k", "--json", stop_at=2)
    assert killed.returncode != 0 and "--resume" in killed.stderr, killed.stderr[-3000:]
    assert not (tmp_path / "k").exists()
    state = json.loads((tmp_path / "k.ckpt" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["sharding"] == "fsdp"
    shutil.copytree(tmp_path / "k.ckpt", tmp_path / "alone.ckpt")
    resumed = launch("distill", src, *DISTILL, "--sharding", "fsdp", "-o", tmp_path / "k", "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["resumed_from"] == 2
    assert max_diff(w2, weights(tmp_path / "k")) < 1e-6, max_diff(w2, weights(tmp_path / "k"))

    # (c) the fsdp checkpoint is a one-process checkpoint: same files, names and dtypes; one process resumes it
    for f in ("trainable.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(tmp_path / "one.ckpt" / "checkpoint" / f)), load_file(str(tmp_path / "alone.ckpt" /
                                                                                         "checkpoint" / f))
        assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}, f
    alone = cli("distill", src, *DISTILL, "-o", tmp_path / "alone", "--resume", "--json")
    assert alone.code == 0, alone.err
    assert alone.json()["resumed_from"] == 2
    assert max_diff(w1, weights(tmp_path / "alone")) < TOL
    print(f"\nmeasured: fsdp-2 vs 1 {max_diff(w1, w2):.3g} (update {max_diff(w1, w0):.3g}); resumed vs uninterrupted "
          f"{max_diff(w2, weights(tmp_path / 'k')):.3g}; fsdp checkpoint resumed alone vs 1 "
          f"{max_diff(w1, weights(tmp_path / 'alone')):.3g}; state bytes {d1['sharding']} / {d2['sharding']}")


def test_lora_fsdp_and_ddp_match_one_process(tiny_dir, tmp_path, cli):
    """lora-train on 2 processes (fsdp, and ddp) ends where 1 process does at the same global batch: DiT's class-label
    dropout is drawn from the shared batch generator (ops/lora/loss._LabelDropout), not each process's own RNG."""
    src = tiny_dir("dit")
    data = make_data(tmp_path / "data", load_bundle(src), labels=True)
    args = ["lora-train", src, "--data", data, "--steps", "3", "--batch-size", "4", "--rank", "2",
            "--targets", "attention,mlp", "--warmup-steps", "0", "--validation-images", "2",
            "--validation-steps", "2", "--threads", "1", "--json"]
    one = cli(*args, "-o", tmp_path / "one.safetensors")
    assert one.code == 0, one.err
    ddp = launch(*args, "-o", tmp_path / "ddp.safetensors")
    two = launch(*args, "--sharding", "fsdp", "-o", tmp_path / "two.safetensors")
    assert ddp.returncode == 0 and two.returncode == 0, (ddp.stderr[-2000:], two.stderr[-2000:])
    d1, d2 = one.json(), json.loads(two.stdout)
    assert d2["base_unchanged"] is True and d2["steps"] == 3
    a, b = load_adapter(tmp_path / "one.safetensors"), load_adapter(tmp_path / "two.safetensors")
    c = load_adapter(tmp_path / "ddp.safetensors")
    assert max(float(v.abs().max()) for v in a.B.values()) > 1e-4  # trained (B starts at zero)
    diff = max(max_diff(a.A, b.A), max_diff(a.B, b.B))
    diff_ddp = max(max_diff(a.A, c.A), max_diff(a.B, c.B))
    assert diff < TOL and diff_ddp < TOL, (diff, diff_ddp)
    # killed after step 2 under fsdp, then --resume under fsdp: the uninterrupted adapter
    killed = launch(*args, "--sharding", "fsdp", "--checkpoint-every", "1", "-o", tmp_path / "k.safetensors", stop_at=2)
    assert killed.returncode != 0 and "--resume" in killed.stderr, killed.stderr[-3000:]
    assert not (tmp_path / "k.safetensors").exists()
    resumed = launch(*args, "--sharding", "fsdp", "--checkpoint-every", "1", "-o", tmp_path / "k.safetensors",
                     "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["resumed_from"] == 2
    k = load_adapter(tmp_path / "k.safetensors")
    diff_resumed = max(max_diff(b.A, k.A), max_diff(b.B, k.B))
    assert diff_resumed < 1e-6, diff_resumed
    # the frozen base is sharded too: each process holds about half
    ratio = d2["sharding"]["state_bytes"] / d1["sharding"]["state_bytes"]
    assert 0.45 < ratio <= 0.6, (d1["sharding"], d2["sharding"])
    print(f"\nmeasured: lora fsdp-2 vs 1 {diff:.3g}, ddp-2 vs 1 {diff_ddp:.3g}, resumed vs uninterrupted {diff_resumed:.3g}; state bytes {d1['sharding']} / {d2['sharding']}")


def test_refusals_write_nothing(tiny_dir, tmp_path, cli):
    """fsdp needs a launcher with 2+ processes; --mode feedback (one block's copy) and fp16 do not shard: exit 2,
    one line, nothing written."""
    src = tiny_dir("dit")
    cases = [
        (["distill", src, *DISTILL, "--sharding", "fsdp"], "torchrun --nproc_per_node"),
        (["distill", src, "--mode", "feedback", "--steps", "2", "--sharding", "fsdp"], "--sharding ddp"),
        (["distill", src, *DISTILL, "--sharding", "fsdp", "--mixed-precision", "fp16"], "bf16"),
        (["distill", src, *DISTILL, "--sharding", "zero3"], "ddp, fsdp"),
        (["lora-train", src, "--data", tmp_path, "--steps", "2", "--sharding", "fsdp"], "torchrun --nproc_per_node"),
    ]
    for i, (args, hint) in enumerate(cases):
        out = tmp_path / f"out{i}" if args[0] == "distill" else tmp_path / f"out{i}.safetensors"
        r = cli(*args, "-o", out)
        assert r.code == 2 and r.error_line.startswith("Error:") and hint in r.error_line, (args, r.err)
        assert not out.exists() and not out.with_name(out.name + ".ckpt").exists() and not out.with_suffix(".ckpt").exists()
