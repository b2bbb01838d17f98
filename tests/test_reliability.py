"""The bad-input matrix (issue 9): every command x every kind of bad input, one table, one test.

Each case must give: exactly one stderr line `Error: ...` containing the expected text, the documented exit
code (cli/errors.py), nothing new in the output area (no OUT, no `.OUT.tmp-*`; an interrupted training
command keeps only its resumable OUT.ckpt/), and byte-identical inputs (sha256 of every input file before
and after). docs/reliability.md prints MATRIX; test_docs_matrix_is_current keeps the two in step.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ditkit.cli.errors import EXIT_INPUT, EXIT_INTERRUPTED

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"

# command -> arguments of a run that succeeds on the tiny DiT ({src}, {out}, {data} are filled in)
RUNS = {
    "info": ["{src}"],
    "generate": ["{src}", "-o", "{out}", "--steps", "1", "--num-images", "1", "--labels", "1"],
    "bench": ["{src}", "--num-images", "0", "--warmup", "0", "--repeats", "1", "--image-repeats", "0",
              "--steps", "1", "--plot", "{out}"],
    "prune": ["{src}", "-o", "{out}", "--method", "depth", "--keep", "1", "--calib-samples", "1",
              "--calib-steps", "1", "--calib-points", "1", "--no-timing"],
    "quantize": ["{src}", "-o", "{out}", "--calib-batches", "1", "--calib-batch-size", "1"],
    "export": ["{src}", "-o", "{out}", "--format", "diffusers"],
    "distill": ["{src}", "-o", "{out}", "--mode", "steps", "--steps", "1", "--batch-size", "1", "--pool-size", "1",
                "--val-images", "1"],
    "lora-train": ["{src}", "--data", "{data}", "-o", "{out}", "--steps", "1", "--batch-size", "1",
                   "--validation-images", "1", "--validation-steps", "1"],
    "cache": ["{src}", "-o", "{out}", "--target-speedup", "1.1", "--images", "1", "--steps", "4"],
}
OUT_NAME = {"bench": "plot.png", "lora-train": "out.safetensors"}  # default: "out" (a directory)
CHECKPOINTED = {"distill": "out.ckpt", "lora-train": "out.ckpt"}  # resumable state beside OUT

BAD_OPTION = {  # command -> (extra arguments, expected text)
    "info": (["--batch", "0"], "--batch must be >= 1"),
    "generate": (["--sampler", "heun"], "unknown sampler 'heun', choose one of"),
    "bench": (["--batch-sizes", "0"], "--batch-sizes must be distinct integers >= 1"),
    "prune": (["--keep", "7"], "--keep 7"),
    "quantize": (["--scheme", "int3"], "unknown scheme 'int3'"),
    "export": (["--opset", "5"], "--opset"),
    "distill": (["--lr", "-1"], "--lr must be a positive number"),
    "lora-train": (["--rank", "0"], "--rank must be"),
    "cache": (["--target-speedup", "0.9"], "--target-speedup must be"),
}

# case -> what its input is; (command, case) -> (exit code, expected text); cases a command has no input for
# (info writes nothing; only generate and lora-train take adapters) are listed in NOT_APPLICABLE.
CASES = {
    "missing": "SRC does not exist",
    "not-a-checkpoint": "SRC is a directory holding only a README",
    "truncated": "the transformer's .safetensors cut to 1000 bytes",
    "config-not-json": "transformer/config.json is `{oops`",
    "config-wrong-field": 'transformer/config.json has "num_layers": "two"',
    "unsupported-family": "transformer/config.json names UNet2DConditionModel",
    "foreign-adapter": "--lora: an adapter trained on a wider DiT (hidden 64, this model has 32)",
    "bad-option": "an invalid option value (BAD_OPTION)",
    "unwritable-output": "-o under a regular file (as root, os.access says yes: ditkit tries a write)",
    "existing-output": "-o names an existing output, no --force",
    "interrupted-write": "SIGTERM arrives while the output is being written",
}
COMMON = {
    "missing": (EXIT_INPUT, "does not exist"),
    "not-a-checkpoint": (EXIT_INPUT, "is not a checkpoint"),
    "truncated": (EXIT_INPUT, "truncated"),
    "config-not-json": (EXIT_INPUT, "is not valid JSON"),
    "config-wrong-field": (EXIT_INPUT, "num_layers must be a non-negative integer"),
    "unsupported-family": (EXIT_INPUT, "UNet2DConditionModel is not a supported family"),
    "unwritable-output": (EXIT_INPUT, "is not a directory"),
    "existing-output": (EXIT_INPUT, "already exists; pass --force"),
    "interrupted-write": (EXIT_INTERRUPTED, "SIGTERM while writing"),
}
NOT_APPLICABLE = {("info", c) for c in ("unwritable-output", "existing-output", "interrupted-write")} | {
    (cmd, "foreign-adapter") for cmd in RUNS if cmd not in ("generate", "lora-train")}


def expected(command: str, case: str) -> tuple[int, str]:
    if case == "bad-option":
        return EXIT_INPUT, BAD_OPTION[command][1]
    if case == "foreign-adapter":
        return EXIT_INPUT, "does not fit this model's shapes"
    return COMMON[case]


MATRIX = [(cmd, case, *expected(cmd, case)) for cmd in RUNS for case in CASES if (cmd, case) not in NOT_APPLICABLE]


def markdown_matrix() -> str:
    """The tables docs/reliability.md shows (every cell is a test case of test_bad_input_matrix that passes)."""
    rows = ["| case | the bad input | exit | the `Error:` line contains | commands |", "|---|---|---|---|---|"]
    for case, what in CASES.items():
        cmds = [c for c, k, _, _ in MATRIX if k == case]
        code = {code for c, k, code, _ in MATRIX if k == case}.pop()
        text = "see below" if case == "bad-option" else f"`{expected(cmds[0], case)[1]}`"
        rows.append(f"| {case} | {what} | {code} | {text} | {', '.join(cmds)} |")
    rows += ["", "| command | bad option | the `Error:` line contains |", "|---|---|---|"]
    rows += [f"| {c} | `{' '.join(a)}` | `{t}` |" for c, (a, t) in BAD_OPTION.items()]
    return "\n".join(rows) + "\n"


# -- inputs ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dir):
    """Every input of the matrix under one root (hashed before and after each case)."""
    from ditkit.formats.lora import Adapter, save_adapter

    root = tmp_path_factory.mktemp("inputs")
    base = shutil.copytree(tiny_dir("dit"), root / "base")
    (root / "notckpt").mkdir()
    (root / "notckpt" / "README.txt").write_text("not a model\n")
    trunc = shutil.copytree(base, root / "truncated")
    w = trunc / "transformer" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    for name, edit in (("config-not-json", None), ("config-wrong-field", {"num_layers": "two"}),
                       ("unsupported-family", {"_class_name": "UNet2DConditionModel"})):
        d = shutil.copytree(base, root / name)
        conf = d / "transformer" / "config.json"
        conf.write_text("{oops" if edit is None else json.dumps({**json.loads(conf.read_text()), **edit}))
    g = torch.Generator().manual_seed(0)
    mods = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_v"]
    save_adapter(root / "wide-dit-lora.safetensors",
                 Adapter(A={m: torch.randn(4, 64, generator=g) for m in mods},
                         B={m: torch.randn(64, 4, generator=g) for m in mods}, rank=4, alpha=4.0, family="dit"))
    from PIL import Image

    for label in ("0", "1"):
        (root / "data" / label).mkdir(parents=True)
        for i in range(2):
            img = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "data" / label / f"{i}.png")
    (root / "afile").write_text("a regular file\n")
    return root


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def case_args(command: str, case: str, inputs: Path, out: Path) -> list[str]:
    src = {"missing": inputs / "nope", "not-a-checkpoint": inputs / "notckpt"}.get(case, inputs / "base")
    if case in ("truncated", "config-not-json", "config-wrong-field", "unsupported-family"):
        src = inputs / case
    if case == "unwritable-output":
        out = inputs / "afile" / out.name
    args = [a.format(src=src, out=out, data=inputs / "data") for a in RUNS[command]]
    if case == "bad-option":
        args += BAD_OPTION[command][0]
    if case == "foreign-adapter":
        adapter = str(inputs / "wide-dit-lora.safetensors")
        if command == "generate":
            args += ["--lora", adapter]
        else:  # lora-train fusing an adapter into this model
            args = [str(src), "--lora", adapter, "--fuse-into", str(out.with_suffix(""))]
    return args


@pytest.fixture
def interrupt_writes(monkeypatch):
    """Deliver SIGTERM to this process in the middle of writing an output named `name` (its .NAME.tmp-*
    sibling): the first tensor file, PNG or plot written there is left half-written, then the signal."""
    import matplotlib.figure
    import safetensors.torch
    from PIL import Image

    def arm(name: str):
        def hit(path) -> bool:
            return any(part.startswith(f".{name}.tmp-") for part in Path(str(path)).parts)

        def wrap(orig):
            def fault(*a, **k):
                if hit(a[1]):
                    Path(str(a[1])).write_bytes(b"half a file")
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # the handler raises before this returns
                    raise AssertionError("SIGTERM was not turned into an exception")
                return orig(*a, **k)
            return fault

        monkeypatch.setattr(safetensors.torch, "save_file", wrap(safetensors.torch.save_file))
        monkeypatch.setattr(Image.Image, "save", wrap(Image.Image.save))
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", wrap(matplotlib.figure.Figure.savefig))

    return arm


@pytest.mark.parametrize("command,case,code,text", MATRIX, ids=[f"{c}-{k}" for c, k, _, _ in MATRIX])
def test_bad_input_matrix(command, case, code, text, cli, inputs, tmp_path, interrupt_writes):
    area = tmp_path / "outputs"
    area.mkdir()
    out = area / OUT_NAME.get(command, "out")
    if case == "existing-output":
        if out.suffix:
            out.write_bytes(b"an older output")
        else:
            out.mkdir()
            (out / "mine.txt").write_text("keep")
    if case == "interrupted-write":
        interrupt_writes(out.name)
    before, outputs_before = digest(inputs), digest(area)
    names_before = sorted(p.name for p in area.iterdir())

    r = cli(command, *case_args(command, case, inputs, out))

    assert r.code == code, (r.code, r.err[-2000:])
    errors = [l for l in r.err.splitlines() if l.startswith("Error")]
    assert len(errors) == 1 and errors[0] == r.error_line, r.err[-2000:]  # one line, and the last one
    assert text in errors[0], errors[0]
    if case != "interrupted-write":  # (bench prints its report before it writes the plot)
        assert r.out == ""  # stdout is data: nothing on failure
    assert digest(inputs) == before  # inputs unchanged, byte for byte
    left = digest(area)
    keep = CHECKPOINTED.get(command) if case == "interrupted-write" else None
    if keep is not None:  # training finished; its resumable checkpoint stays beside the (absent) output
        assert (area / keep / "checkpoint" / "state.json").is_file()
        left = {k: v for k, v in left.items() if not k.startswith(keep + "/")}
    assert left == outputs_before, sorted(left)  # nothing new: no OUT, no .OUT.tmp-* directory or file
    assert sorted(p.name for p in area.iterdir() if p.name != keep) == names_before  # no empty temp dirs either

def test_every_command_and_case_is_covered():
    from ditkit.cli.main import COMMANDS

    assert set(RUNS) == set(COMMANDS) == set(BAD_OPTION)
    covered = {(c, k) for c, k, _, _ in MATRIX}
    assert covered | NOT_APPLICABLE == {(c, k) for c in RUNS for k in CASES}
    assert len(MATRIX) == len(RUNS) * len(CASES) - len(NOT_APPLICABLE)


def test_docs_matrix_is_current():
    assert markdown_matrix() in DOC.read_text(), "regenerate the matrix: python tests/test_reliability.py"


if __name__ == "__main__":  # print the table docs/reliability.md shows
    print(markdown_matrix(), end="")
