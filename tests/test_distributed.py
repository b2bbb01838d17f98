"""Under torchrun (2 CPU processes, gloo), generate and bench shard images and match one process exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "ditkit")]


def torchrun(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_generate_equals_one_process(tmp_path, cli):
    # the shipped model at its default 25 steps: before its VAE ran PyTorch's own convolutions, oneDNN's
    # per-thread-count kernels (the launcher gives each process one thread) changed 2 of these 20 PNGs
    args = ["tiny-digits", "--labels", "0,1,2,3,4,5,6,7,8,9", "--num-images", "20", "--batch-size", "5", "--force"]
    one = cli("generate", *args, "-o", tmp_path / "one", "--json")
    assert one.code == 0, one.err
    two = torchrun("generate", *args, "-o", tmp_path / "two", "--json")
    assert two.returncode == 0, two.stderr[-2000:]
    assert "terminate called" not in two.stderr  # the process group was torn down
    doc = json.loads(two.stdout)  # only rank 0 prints
    assert doc["world_size"] == 2 and doc["num_images"] == 20
    pngs = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert len(pngs) == 21  # 20 images + the grid
    assert pngs == sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    for name in pngs:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    sidecar = json.loads((tmp_path / "two" / "generate.json").read_text())
    assert sidecar["report"]["world_size"] == 2


@pytest.mark.slow
def test_torchrun_bench_quality_equals_one_process(tiny_dir, variant_dir, cli):
    args = [tiny_dir("dit"), variant_dir, "--num-images", "6", "--steps", "4", "--warmup", "1", "--repeats", "2",
            "--image-repeats", "1", "--json"]
    one = cli("bench", *args, "--threads", "1")
    assert one.code == 0, one.err
    two = torchrun("bench", *args)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "terminate called" not in two.stderr
    d1, d2 = one.json(), json.loads(two.stdout)
    assert d2["world_size"] == 2 and d1["world_size"] == 1
    assert [m["quality"] for m in d1["models"]] == [m["quality"] for m in d2["models"]]
    assert d2["models"][1]["quality"]["identical"] is False


@pytest.fixture(scope="module")
def variant_dir(tiny_dir, tmp_path_factory):
    from test_bench import write_variant

    return write_variant(tiny_dir("dit"), tmp_path_factory.mktemp("variant") / "dit-perturbed")


def test_each_rank_takes_the_gpu_of_its_local_rank():
    """--device cuda under a launcher: rank r of a node runs on cuda:LOCAL_RANK (NCCL refuses two ranks on one GPU);
    the choice is a pure function of the launcher's environment, checked here without a GPU."""
    from ditkit.formats.errors import ConfigError, HardwareError
    from ditkit.ops.distributed import rank_device

    two = lambda local, rank=None: {"WORLD_SIZE": "2", "LOCAL_RANK": str(local), "RANK": str(local if rank is None
                                                                                             else rank)}
    assert rank_device("cuda", two(0), device_count=2) == "cuda:0"
    assert rank_device("cuda", two(1), device_count=2) == "cuda:1"
    assert rank_device("cuda", two(1, rank=3), device_count=2) == "cuda:1"  # node 2 of 2: LOCAL_RANK, not RANK
    assert rank_device("cpu", two(1)) == "cpu"  # gloo on CPU: no device to choose
    assert rank_device("cuda:3", {}) == "cuda:3"  # one process: the device as given
    assert rank_device("cuda", {"WORLD_SIZE": "1"}) == "cuda"
    with pytest.raises(ConfigError, match="--device cuda:1 under a launcher"):
        rank_device("cuda:1", two(0), device_count=2)
    with pytest.raises(HardwareError, match="LOCAL_RANK 2 has no GPU"):
        rank_device("cuda", two(2), device_count=2)
