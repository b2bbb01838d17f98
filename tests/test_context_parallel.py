"""--parallel context (ops/parallel.py): one image's tokens split across processes.

(a) under torchrun (2 CPU processes, gloo) generate writes the images one process writes, for dit, pixart, sd3 and
flux (measured: bit-identical PNGs; asserted: at most 1 grey level anywhere); (b) the plan's sharding logic in one
process: two copies of the model, one per simulated rank, run in two threads that exchange their tensors, and each
returns the one-process output within 1e-5; (c) bench --parallel context times the split on 2 processes.
"""
from __future__ import annotations

import copy
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from test_distributed import torchrun

CONTEXT_FAMILIES = ["dit", "pixart", "sd3", "flux"]
PIXEL_TOLERANCE = 1  # grey levels; measured 0 (bit-identical) for all four on a 2-core Xeon, 2026-12-03
OUTPUT_TOLERANCE = 1e-5  # the transformer's output, simulated 2-way split vs one process


class ThreadGather:
    """all_gather between `size` threads of one process: each thread is a simulated rank."""

    def __init__(self, size: int):
        self.size, self.slots, self.barrier = size, [None] * size, threading.Barrier(size)
        self.local = threading.local()
        self.calls = 0

    def for_rank(self, rank: int):
        def gather(x, dim):
            self.slots[rank] = x.contiguous()
            self.barrier.wait()
            out = torch.cat(list(self.slots), dim=dim)
            self.barrier.wait()  # everyone has read the slots before the next exchange overwrites them
            if rank == 0:
                self.calls += 1
            return out
        return gather


def simulated_split(family: str, size: int = 2, batch: int = 2, hw=(8, 8)):
    """(the one-process output, each simulated rank's output, the exchanges per forward, attention layers)."""
    from ditkit.formats.families import get_family
    from ditkit.ops.parallel import ContextParallel, check_context

    fam, tr = get_family(family), tiny.tiny_transformer(family)
    x, t, cond = fam.dummy_inputs(tr, batch, hw, seed=0)
    with torch.no_grad():
        full = fam.predict(tr, x, t, cond, guidance=fam.default_guidance)
    local = check_context(SimpleNamespace(family=fam, transformer=tr), hw, size)
    comm, outs, errors = ThreadGather(size), [None] * size, []

    def rank_run(r, model):
        try:
            with torch.no_grad(), ContextParallel(fam, model, r, size, local, gather=comm.for_rank(r)):
                outs[r] = fam.predict(model, x, t, cond, guidance=fam.default_guidance)
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            comm.barrier.abort()

    threads = [threading.Thread(target=rank_run, args=(r, copy.deepcopy(tr))) for r in range(size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    import re

    attn = [n for n, _ in tr.named_modules() if re.search(fam.context_plan.attention, n)]
    return full, outs, comm.calls, attn


@pytest.mark.parametrize("family", CONTEXT_FAMILIES)
def test_the_split_forward_equals_one_process(family):
    full, outs, calls, attn = simulated_split(family)
    assert attn, "the plan matches no attention layer"
    assert calls == 2 * len(attn) + 1  # each planned attention gathered its keys and values, then the output once
    for out in outs:
        assert out.shape == full.shape
        assert (out - full).abs().max().item() <= OUTPUT_TOLERANCE
    assert full.abs().max().item() > 0.1  # a real output, not zeros


def test_families_without_a_plan_and_odd_token_counts_are_refused():
    from ditkit.formats.errors import ConfigError, UnsupportedModelError
    from ditkit.formats.families import FAMILIES, get_family
    from ditkit.ops.parallel import check_context

    for name in ("lumina", "lumina2", "sana"):
        assert FAMILIES[name].context_plan is None
        with pytest.raises(UnsupportedModelError, match=f"no plan for the {name} family.*--parallel images"):
            check_context(SimpleNamespace(family=FAMILIES[name], transformer=None), (8, 8), 2)
    dit = SimpleNamespace(family=get_family("dit"), transformer=tiny.tiny_transformer("dit"))
    assert check_context(dit, (8, 8), 2) == 8  # 16 tokens of 2x2 patches, 8 per process
    with pytest.raises(ConfigError, match="splits the 16 image tokens of a 8x8 latent into 3 equal parts"):
        check_context(dit, (8, 8), 3)


def test_context_and_compile_do_not_combine():
    from ditkit.formats.errors import ConfigError
    from ditkit.ops.generate import GenerateConfig

    with pytest.raises(ConfigError, match="--compile and --parallel context"):
        GenerateConfig(parallel="context", compile=True)
    with pytest.raises(ConfigError, match="parallel"):
        GenerateConfig(parallel="tokens")


def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))}


@pytest.mark.parametrize("family", CONTEXT_FAMILIES)
def test_torchrun_context_generate_equals_one_process(family, tiny_dir, tiny_embeddings, tmp_path, cli):
    args = [tiny_dir(family), "--num-images", "2", "--steps", "3", "--force", "--json"]
    if family != "dit":
        args += ["--embeddings", tiny_embeddings(family)]
    one = cli("generate", *args, "-o", tmp_path / "one", "--threads", "1")
    assert one.code == 0, one.err
    two = torchrun("generate", *args, "-o", tmp_path / "two", "--parallel", "context")
    assert two.returncode == 0, two.stderr[-2000:]
    assert "terminate called" not in two.stderr
    doc = json.loads(two.stdout)
    assert doc["world_size"] == 2 and doc["parallel"] == "context"
    ctx = doc["context"]
    assert ctx["engine"] == "ditkit" and ctx["tokens_per_process"] * 2 == ctx["image_tokens"]
    if family == "flux":  # diffusers' own plan exists for Flux, and cannot build its mesh without an accelerator
        assert ctx["diffusers"] == "ZeroDivisionError: integer modulo by zero"
    a, b = _pixels(tmp_path / "one"), _pixels(tmp_path / "two")
    assert list(a) == list(b) == ["00000.png", "00001.png", "grid.png"]
    for name in a:
        assert np.abs(a[name] - b[name]).max() <= PIXEL_TOLERANCE, name
    assert a["00000.png"].std() > 1  # images with content: equality means something


def test_torchrun_bench_reports_the_context_split(tiny_dir, cli):
    args = [tiny_dir("dit"), "--num-images", "2", "--steps", "2", "--warmup", "1", "--repeats", "2",
            "--image-repeats", "2", "--json"]
    two = torchrun("bench", *args, "--parallel", "context")
    assert two.returncode == 0, two.stderr[-2000:]
    doc = json.loads(two.stdout)
    ctx = doc["context"]
    assert doc["world_size"] == 2 and ctx["world_size"] == 2 and ctx["engine"] == "ditkit"
    (name, m), = ctx["models"].items()
    assert m["tokens_per_process"] == 8 and m["latency_ms_per_image"] > 0
    assert m["latency_ms_per_image_one_process"] > 0 and m["speedup"] > 0
    assert doc["config"]["parallel"] == "context"
    from ditkit.cli.bench_render import sections

    (title, cols, rows), = [x for x in sections(doc) if x[0].startswith("--parallel context")]
    assert "2 processes" in title and rows[0][:2] == [name, "8"]
