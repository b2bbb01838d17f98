"""Shared fixtures: tiny real models of every family, and a CLI runner that captures exit code and output."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tools"))  # the build scripts (not installed)
import tiny  # noqa: E402
from ditkit.formats.families import FAMILIES  # noqa: E402

FAMILY_NAMES = list(FAMILIES)  # every registered family: shared suites parametrize over it


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family) -> a diffusers pipeline directory with a tiny random model of that family."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = tiny.write_tiny_pipeline(family, root / family)
        return cache[family]

    return make


@pytest.fixture(scope="session")
def tiny_embeddings(tmp_path_factory):
    """tiny_embeddings(family) -> a precomputed prompt-embeddings file for a text family's tiny model."""
    root = tmp_path_factory.mktemp("emb")
    return lambda family: tiny.tiny_embeddings(family, root / f"{family}.safetensors")


class CliResult:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def json(self):
        import json

        return json.loads(self.out)

    @property
    def error_line(self) -> str:
        lines = [l for l in self.err.splitlines() if l.strip()]
        return lines[-1] if lines else ""


@pytest.fixture
def cli(capsys):
    """cli(*args) runs `ditkit args...` in-process and returns CliResult(code, stdout, stderr)."""
    from ditkit.cli.main import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def sigterm_during_distill(monkeypatch, at_step: int):
    """Make the next `ditkit distill` in this process receive SIGTERM right after training step `at_step`;
    returns a function that undoes it."""
    import os
    import signal

    import ditkit.ops.distill as op

    real_train = op.train

    def train_then_stop(*args, on_step=None, **kw):
        def hook(step, loss):
            if on_step:
                on_step(step, loss)
            if step == at_step:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_train(*args, on_step=hook, **kw)

    monkeypatch.setattr(op, "train", train_then_stop)
    return lambda: monkeypatch.setattr(op, "train", real_train)


@pytest.fixture
def one_thread():
    """One torch thread (as --threads 1 does for the CLI): tiny models on a shared machine run several times
    faster than with contended threads, and timings stay steady. Modules use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`, single tests by name."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the embedded defaults' asset tests (a module sets ASSET = the asset's directory, PIPELINE = its diffusers
# pipeline class name, BUILDER = the script that rebuilds it) -------------------------------------------------

@pytest.fixture(scope="module")
def asset(request) -> Path:
    m = request.module
    assert (m.ASSET / "model_index.json").is_file(), f"{m.ASSET} is missing; build it with python {m.BUILDER}"
    return m.ASSET


@pytest.fixture(scope="module")
def manifest(asset) -> dict:
    import json

    return json.loads((asset / "ditkit.json").read_text())


@pytest.fixture(scope="module")
def pipe(asset, request):
    """The asset loaded by diffusers' own pipeline class (no ditkit code involved)."""
    import diffusers

    p = getattr(diffusers, request.module.PIPELINE).from_pretrained(asset)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def judge(asset):
    from ditkit.formats.judge import load_judge

    return load_judge(asset / "judge").judge
