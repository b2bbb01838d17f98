"""The reliability matrices: every command x every kind of bad input (issue 9); every writer's path x every
overlap with an input and every kind of thing it must not replace, signals x phases x commands, full disks,
SIGKILL then --resume (issue 16). Table-driven: one table, one test each.

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
import sys
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
    "cache": ["{src}", "-o", "{out}", "--target-speedup", "1.1", "--images", "1", "--steps", "4", "--no-timing"],
}  # (cache --no-timing: a FLOP cost model, so the run reaches its write phase however busy the machine is)
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
    "existing-output": "-o names an earlier ditkit output, no --force",
}  # (signals while writing: SIGNALS, the write phase)
COMMON = {
    "missing": (EXIT_INPUT, "does not exist"),
    "not-a-checkpoint": (EXIT_INPUT, "is not a checkpoint"),
    "truncated": (EXIT_INPUT, "truncated"),
    "config-not-json": (EXIT_INPUT, "is not valid JSON"),
    "config-wrong-field": (EXIT_INPUT, "num_layers must be a non-negative integer"),
    "unsupported-family": (EXIT_INPUT, "UNet2DConditionModel is not a supported family"),
    "unwritable-output": (EXIT_INPUT, "is not a directory"),
    "existing-output": (EXIT_INPUT, "already exists; pass --force"),
}
NOT_APPLICABLE = {("info", c) for c in ("unwritable-output", "existing-output")} | {
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


def markdown_policy() -> str:
    """The output-policy, signal and full-disk tables of docs/reliability.md (test_output_policy_matrix,
    test_signal_matrix, test_full_disk_*)."""
    cases = {**{k: v[0] for k, v in OVERLAPS.items()}, **{k: v[0] for k, v in KINDS.items()}}
    rows = ["| case (with --force) | the path is | exit | the `Error:` line contains | paths |", "|---|---|---|---|---|"]
    for case, what in cases.items():
        ws = [w for w, c, _, _ in POLICY if c == case]
        texts = sorted({t for w, c, _, t in POLICY if c == case})
        rows.append(f"| {case} | {what} | 2 | {' / '.join(f'`{t}`' for t in texts)} | {', '.join(ws)} |")
    rows += ["", "| phase | the signal arrives | exit | the `Error:` line contains | commands |", "|---|---|---|---|---|"]
    for phase, where in PHASES.items():
        text = signal_expected(phase, "SIG...")
        rows.append(f"| {phase} | {where} | 130 | `{text}` | {', '.join(PHASE_COMMANDS[phase])} |")
    rows += ["", f"Each phase runs with {' and '.join(SIGNAL_NAMES)}: {len(SIGNALS)} cases."]
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


@pytest.mark.parametrize("command,case,code,text", MATRIX, ids=[f"{c}-{k}" for c, k, _, _ in MATRIX])
def test_bad_input_matrix(command, case, code, text, cli, inputs, tmp_path):
    area = tmp_path / "outputs"
    area.mkdir()
    out = area / OUT_NAME.get(command, "out")
    if case == "existing-output":
        if out.suffix:
            out.write_bytes(b"an older output")
        else:
            out.mkdir()
            (out / "ditkit.json").write_text("{}")  # an earlier ditkit output: replaced only with --force
    check_case(cli, command, case_args(command, case, inputs, out), inputs, area, code, text)


# -- the output policy (issue 16): no output overlaps an input; only ditkit's own outputs are replaced ------

# writer -> (command, extra arguments); the path under test is {spot}: -o/--plot unless extra names it
WRITERS = {
    "generate -o": ("generate", None),
    "bench --plot": ("bench", None),
    "prune -o": ("prune", None),
    "quantize -o": ("quantize", None),
    "export -o": ("export", None),
    "distill -o": ("distill", None),
    "distill --checkpoint-dir": ("distill", ["--checkpoint-dir", "{spot}"]),
    "lora-train -o": ("lora-train", None),
    "lora-train --checkpoint-dir": ("lora-train", ["--checkpoint-dir", "{spot}"]),
    "lora-train --fuse-into": ("lora-train", ["--fuse-into", "{spot}"]),
    "cache -o": ("cache", None),
}
OVERLAPS = {  # case -> (what the path is, the `Error:` line contains)
    "is-input": ("SRC itself", "is the input"),
    "inside-input": ("a new path inside SRC", "lies inside the input"),
    "holds-input": ("the directory holding SRC", "contains the input"),
    "via-symlink": ("a path through a symlink that points into SRC", "lies inside the input"),
    "inside-data": ("a path inside lora-train's --data folder", "lies inside the input"),
}
KINDS = {  # case -> (what is already there, --force given, the `Error:` line contains)
    "fifo": ("a FIFO", "is a FIFO"),
    "device-node": ("a character device (mknod 1,3: what /dev/null is)", "is a device node"),
    "foreign-dir": ("a directory ditkit did not write (no ditkit.json)", "ditkit did not write"),
}
CKPT_KIND_TEXT = {"fifo": "is not a directory", "device-node": "is not a directory",
                  "foreign-dir": "holds files ditkit did not write"}
FILE_WRITERS = {"bench --plot", "lora-train -o"}


def policy_expected(writer: str, case: str) -> str:
    if case in KINDS:
        return CKPT_KIND_TEXT[case] if writer.endswith("--checkpoint-dir") else KINDS[case][1]
    return OVERLAPS[case][1]


POLICY_NA = ({(w, "inside-data") for w in WRITERS if not w.startswith("lora-train")}
             | {(w, "is-input") for w in FILE_WRITERS} | {(w, "holds-input") for w in FILE_WRITERS}
             | {("lora-train --fuse-into", "inside-data")})  # fusing reads no --data
POLICY = [(w, c, EXIT_INPUT, policy_expected(w, c)) for w in WRITERS for c in (*OVERLAPS, *KINDS)
          if (w, c) not in POLICY_NA]


def policy_args(writer: str, case: str, inputs: Path, area: Path) -> list[str]:
    command, extra = WRITERS[writer]
    name = OUT_NAME.get(command, "out") if extra is None else "spot"
    suffix = ".safetensors" if writer == "lora-train -o" else ".png" if writer == "bench --plot" else ""
    spot = {
        "is-input": inputs / "base",
        "inside-input": inputs / "base" / f"new{suffix}",
        "holds-input": inputs,
        "via-symlink": area / "link" / f"new{suffix}",
        "inside-data": inputs / "data" / f"new{suffix}",
    }.get(case, area / (name if extra is None else "spot"))
    out = spot if extra is None else area / OUT_NAME.get(command, "out")
    args = [a.format(src=inputs / "base", out=out, data=inputs / "data") for a in RUNS[command]]
    if writer == "lora-train --fuse-into":  # fusing an existing adapter (no training)
        args = [str(inputs / "base"), "--lora", str(inputs / "wide-dit-lora.safetensors")]
    return args + [a.format(spot=spot) for a in (extra or [])] + ["--force"]


def make_kind(case: str, path: Path) -> None:
    import stat

    if case == "fifo":
        os.mkfifo(path)
    elif case == "device-node":
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        except OSError as e:
            pytest.skip(f"cannot make a device node here ({e.strerror})")
    else:
        path.mkdir()
        (path / "notes.txt").write_text("someone's notes\n")


@pytest.mark.parametrize("writer,case,code,text", POLICY, ids=[f"{w.replace(' ', '')}-{c}" for w, c, _, _ in POLICY])
def test_output_policy_matrix(writer, case, code, text, cli, inputs, tmp_path):
    area = tmp_path / "outputs"
    area.mkdir()
    if case == "via-symlink":
        (area / "link").symlink_to(inputs / "base")
    if case in KINDS:
        command, extra = WRITERS[writer]
        make_kind(case, area / (OUT_NAME.get(command, "out") if extra is None else "spot"))
    check_case(cli, WRITERS[writer][0], policy_args(writer, case, inputs, area), inputs, area, code, text)
    if case in KINDS:  # still there, untouched
        command, extra = WRITERS[writer]
        p = area / (OUT_NAME.get(command, "out") if extra is None else "spot")
        assert os.path.lexists(p) and (case != "foreign-dir" or (p / "notes.txt").read_text() == "someone's notes\n")


def check_case(cli, command, args, inputs: Path, area: Path, code: int, text: str, keep: str | None = None,
               stdout_empty: bool = True):
    """Run one case: the exit code, one `Error:` line (the last) containing `text`, byte-identical inputs, and
    nothing new in the output area (but `keep`, a training command's resumable checkpoint directory)."""
    before, outputs_before = digest(inputs), digest(area)
    names_before = sorted(p.name for p in area.iterdir())
    r = cli(command, *args)
    assert r.code == code, (r.code, r.err[-2000:])
    errors = [l for l in r.err.splitlines() if l.startswith("Error")]
    assert len(errors) == 1 and errors[0] == r.error_line, r.err[-2000:]
    assert text in errors[0], errors[0]
    assert "Traceback" not in r.err
    if stdout_empty:
        assert r.out == ""
    assert digest(inputs) == before  # inputs unchanged, byte for byte
    left = digest(area)
    if keep is not None:
        left = {k: v for k, v in left.items() if not k.startswith(keep + "/")}
    assert left == outputs_before, sorted(left)
    assert sorted(p.name for p in area.iterdir() if p.name != keep) == names_before  # no temp dirs either
    if keep is not None:
        assert not [p for p in (area / keep).rglob(".*tmp*")], sorted((area / keep).rglob("*"))
    return r


def test_refused_run_deletes_nothing_it_did_not_make(cli, inputs, tmp_path):
    """A ditkit checkpoint directory of an earlier run survives a --force run refused at loading; an unrelated
    directory named as --checkpoint-dir is refused before anything, and kept."""
    area = tmp_path / "outputs"
    area.mkdir()
    earlier = area / "earlier.ckpt"
    earlier.mkdir()
    (earlier / "ditkit-checkpoint.json").write_text("{}")
    (earlier / "log.jsonl").write_text('{"step": 1}\n')
    args = [a.format(src=inputs / "config-not-json", out=area / "out", data=inputs / "data") for a in RUNS["distill"]]
    check_case(cli, "distill", [*args, "--checkpoint-dir", earlier, "--force"], inputs, area, EXIT_INPUT, "is not valid JSON")
    assert (earlier / "log.jsonl").read_text() == '{"step": 1}\n'


def test_force_replaces_a_previous_ditkit_output(cli, inputs, tmp_path):
    out = tmp_path / "imgs"
    out.mkdir()
    (out / "generate.json").write_text("{}")
    (out / "00000.png").write_bytes(b"old")
    r = cli("generate", *[a.format(src=inputs / "base", out=out) for a in RUNS["generate"]], "--force")
    assert r.code == 0, r.err
    assert (out / "00000.png").read_bytes()[:4] == b"\x89PNG"


def test_check_output_units(tmp_path):
    """The policy's own rules, without a command: overlap both ways through symlinks, kinds, two outputs."""
    from ditkit.formats.atomic import check_output, check_outputs
    from ditkit.formats.errors import ConfigError, OutputExistsError

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(src)
    for out, rel in ((src, "is"), (src / "sub" / "x", "lies inside"), (tmp_path, "contains"),
                     (tmp_path / "alias" / "y", "lies inside")):
        with pytest.raises(ConfigError, match=f"{rel} the input"):
            check_output(out, True, [src])
    with pytest.raises(ConfigError, match="is the input"):  # the input named through a link
        check_output(src, True, [tmp_path / "alias"])
    with pytest.raises(ConfigError, match="give them separate paths"):
        check_outputs([tmp_path / "a", tmp_path / "a" / "b"], True, what=["output", "--fuse-into"])
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError):
        check_output(tmp_path / "f", False)
    assert check_output(tmp_path / "f", True) == tmp_path / "f"  # a regular file: --force replaces it
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", True)
    assert not (tmp_path / "new" / "deeper").exists()
    check_output(tmp_path / "new" / "deeper" / "out", False)
    assert not (tmp_path / "new").exists()  # the check creates nothing (the write makes the parents)


# -- signals x phases x commands (issue 16): 130, one line, nothing partial, no staging directory ---------------

PHASES = {  # phase -> where the signal arrives
    "load": "while the input is read (the first file opened under SRC)",
    "run": "while the op computes (the first module call)",
    "trace": "export --format onnx: inside torch.onnx.export, with the staging directory made",
    "write": "while the output's .OUT.tmp-* sibling is being filled",
    "train": "after training step 1 of 2 (distill, lora-train)",
    "save": "in the middle of the step-1 checkpoint save (distill, lora-train)",
}
SIGNAL_NAMES = ("SIGTERM", "SIGINT")
PHASE_COMMANDS = {
    "load": list(RUNS), "run": list(RUNS), "trace": ["export"],
    "write": [c for c in RUNS if c != "info"], "train": ["distill", "lora-train"], "save": ["distill", "lora-train"],
}


def signal_expected(phase: str, sig: str) -> str:
    if phase in ("train", "save"):
        return "rerun the same command with --resume"
    return f"{sig} while writing" if phase == "write" else f"interrupted by {sig}"


SIGNALS = [(cmd, phase, sig, EXIT_INTERRUPTED, signal_expected(phase, sig))
           for phase, cmds in PHASE_COMMANDS.items() for cmd in cmds for sig in SIGNAL_NAMES]

_armed: dict = {}


def _in_command(sig: int) -> bool:
    """A command is running (its guard or a training loop owns the signal), not the test hashing its inputs."""
    return signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler, None)


def _audit(event, args):
    if _armed.get("under") and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        if os.path.abspath(os.fsdecode(args[0])).startswith(_armed["under"]) and _in_command(_armed["sig"]):
            sig = _armed.pop("sig")
            _armed.clear()
            os.kill(os.getpid(), sig)


@pytest.fixture
def deliver(monkeypatch):
    """deliver(phase, signum, inputs, out) arms one signal for the next command, at that phase. Each case starts
    with Python's default handlers: an ignored SIGINT inherited from the environment (a shell starts its
    background jobs so; seen when the suite ran as `sh -c '...' &`) or a handler an earlier in-process test left
    would take the signal outside the command (a warning names it)."""
    import warnings

    import torch.nn

    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        left = signal.getsignal(sig)
        if left is not default:
            warnings.warn(f"{signal.Signals(sig).name} handler before this case: {left!r} (reset to the default)")
            signal.signal(sig, default)

    if not _armed.get("hooked"):
        sys.addaudithook(_audit)  # (cannot be removed: disarmed below)
        _armed["hooked"] = True

    def arm(phase: str, sig: int, inputs: Path, out: Path):
        once = [True]

        def fire():
            if once[0] and _in_command(sig):
                once[0] = False
                os.kill(os.getpid(), sig)

        if phase == "load":
            _armed.update(under=str(inputs / "base"), sig=sig)
        elif phase == "run":
            call = torch.nn.Module.__call__

            def hooked(self, *a, **k):
                fire()
                return call(self, *a, **k)
            monkeypatch.setattr(torch.nn.Module, "__call__", hooked)
        elif phase == "trace":
            real = torch.onnx.export
            monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: (fire(), real(*a, **k))[1])
        elif phase == "write":
            interrupt_writes_with(monkeypatch, out.name, sig)
        elif phase == "train":
            import ditkit.ops.distill as d
            import ditkit.ops.lora.train as lo

            for mod in (d, lo):
                real_train = mod.train

                def train(*a, on_step=None, _real=real_train, **k):
                    def hook(step, loss):
                        if on_step:
                            on_step(step, loss)
                        if step == 1:
                            fire()
                    return _real(*a, on_step=hook, **k)
                monkeypatch.setattr(mod, "train", train)
        elif phase == "save":
            from ditkit.formats.checkpoint import CheckpointStore

            real_save = CheckpointStore.save

            def save(self, **k):
                fire()
                return real_save(self, **k)
            monkeypatch.setattr(CheckpointStore, "save", save)

    yield arm
    _armed.pop("under", None)
    _armed.pop("sig", None)


def interrupt_writes_with(monkeypatch, name: str, sig: int | None = None, error: OSError | None = None):
    """While an output `name` is filled (its .NAME.tmp-* sibling): half a file, then the signal or the error."""
    import matplotlib.figure
    import safetensors.torch
    from PIL import Image

    def hit(path) -> bool:
        return any(part.startswith(f".{name}.tmp-") for part in Path(str(path)).parts)

    def wrap(orig):
        def fault(*a, **k):
            if hit(a[1]):
                Path(str(a[1])).write_bytes(b"half a file")
                if error is not None:
                    raise error
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler raises before this returns
                raise AssertionError("the signal was not turned into an exception")
            return orig(*a, **k)
        return fault

    monkeypatch.setattr(safetensors.torch, "save_file", wrap(safetensors.torch.save_file))
    monkeypatch.setattr(Image.Image, "save", wrap(Image.Image.save))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", wrap(matplotlib.figure.Figure.savefig))


def signal_args(command: str, phase: str, inputs: Path, out: Path) -> list[str]:
    args = [a.format(src=inputs / "base", out=out, data=inputs / "data") for a in RUNS[command]]
    if phase == "trace":
        args = [str(inputs / "base"), "-o", str(out), "--format", "onnx"]
    if phase in ("train", "save"):
        args += ["--steps", "2", "--checkpoint-every", "1"]
    return args


@pytest.mark.parametrize("command,phase,sig,code,text", SIGNALS,
                         ids=[f"{c}-{p}-{s}" for c, p, s, _, _ in SIGNALS])
def test_signal_matrix(command, phase, sig, code, text, cli, inputs, tmp_path, deliver):
    area = tmp_path / "outputs"
    area.mkdir()
    out = area / OUT_NAME.get(command, "out")
    deliver(phase, getattr(signal, sig), inputs, out)
    keep = CHECKPOINTED.get(command) if phase in ("train", "save", "write") else None  # trained: kept
    check_case(cli, command, signal_args(command, phase, inputs, out), inputs, area, code, text, keep=keep,
               stdout_empty=not (command == "bench" and phase == "write"))  # bench prints, then plots
    if keep is not None:  # a resumable checkpoint of step 1, complete
        assert (area / keep / "checkpoint" / "state.json").is_file()
        assert json.loads((area / keep / "checkpoint" / "state.json").read_text())["step"] == 1


# -- a full disk (issue 16): exit 2, one line naming the device, the path and what to free; nothing left -----

DISK_CASES = [c for c in RUNS if c != "info"]


@pytest.mark.parametrize("command", DISK_CASES)
@pytest.mark.parametrize("err", ["ENOSPC", "EDQUOT"])
def test_full_disk_injected(command, err, cli, inputs, tmp_path, monkeypatch):
    import errno

    area = tmp_path / "outputs"
    area.mkdir()
    out = area / OUT_NAME.get(command, "out")
    code = getattr(errno, err)
    interrupt_writes_with(monkeypatch, out.name, error=OSError(code, os.strerror(code), str(out)))
    args = [a.format(src=inputs / "base", out=out, data=inputs / "data") for a in RUNS[command]]
    r = check_case(cli, command, args, inputs, area, EXIT_INPUT, "no space left on", keep=CHECKPOINTED.get(command),
                   stdout_empty=command != "bench")
    assert f"writing {out}; free " in r.error_line and " MB" in r.error_line
    assert ("disk quota exceeded" in r.error_line) == (err == "EDQUOT")


def test_full_disk_during_a_checkpoint_save(cli, inputs, tmp_path, monkeypatch):
    """ENOSPC while the step-1 checkpoint is saved: exit 2 and no .checkpoint.tmp left in OUT.ckpt."""
    import errno

    import safetensors.torch

    area = tmp_path / "outputs"
    area.mkdir()
    real = safetensors.torch.save_file

    def full(tensors, path, *a, **k):
        if ".checkpoint.tmp" in str(path):
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    import ditkit.formats.checkpoint as ck

    monkeypatch.setattr(ck, "save_file", full)
    args = [a.format(src=inputs / "base", out=area / "out", data=inputs / "data") for a in RUNS["distill"]]
    r = check_case(cli, "distill", [*args, "--steps", "2", "--checkpoint-every", "1"], inputs, area, EXIT_INPUT,
                   "no space left on", keep="out.ckpt")
    assert "out.ckpt/checkpoint" in r.error_line and not (area / "out.ckpt" / ".checkpoint.tmp").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs, filled to the last block (skipped where this process cannot mount one)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        import os

        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # unbuffered writes until the disk is full (a buffered file would fail again on close)
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("command", ["generate", "prune", "bench"])
def test_full_disk_tmpfs(command, cli, inputs, tiny_disk):
    out = tiny_disk / OUT_NAME.get(command, "out")
    args = [a.format(src=inputs / "base", out=out, data=inputs / "data") for a in RUNS[command]]
    r = check_case(cli, command, args, inputs, tiny_disk, EXIT_INPUT, "no space left on tmpfs", stdout_empty=command != "bench")
    assert f"(mounted on {tiny_disk}) writing {out}; free " in r.error_line


# -- SIGKILL, then --resume (distill, lora-train): the resumed run ends where an uninterrupted one does ---------

KILL_AT = {  # where the child process SIGKILLs itself, in the step-2 checkpoint save
    "after-step": "right after the save: checkpoint/ holds step 2",
    "mid-save": "tensors written into .checkpoint.tmp, state.json not yet",
    "between-renames": "checkpoint/ moved to .checkpoint.old, .checkpoint.tmp not yet renamed",
}
CHILD = r"""
import os, signal, sys
import ditkit.formats.checkpoint as ck
where, at = sys.argv[1], 2
real_save, real_replace = ck.CheckpointStore.save, ck.os.replace
def save(self, *, step, **k):
    if step == at and where == "mid-save":
        real_file = ck.save_file
        def one(*a, **kw):
            real_file(*a, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        ck.save_file = one
    if step == at and where == "between-renames":
        calls = []
        def replace(a, b):
            real_replace(a, b)
            calls.append(a)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        ck.os.replace = replace
    real_save(self, step=step, **k)
    if step == at and where == "after-step":
        os.kill(os.getpid(), signal.SIGKILL)
ck.CheckpointStore.save = save
from ditkit.cli.main import main
sys.exit(main(sys.argv[2:]))
"""
TRAINERS = {"distill": ["--steps", "3", "--checkpoint-every", "1", "--threads", "1"],
            "lora-train": ["--steps", "3", "--checkpoint-every", "1", "--threads", "1"]}  # one thread: bit-identical sums


KNOWN_INEXACT = pytest.mark.xfail(strict=True, reason="known limitation: lora-train resumed after a SIGKILL finishes "
                                   "with weights that are not bit-identical to an uninterrupted run (its in-process "
                                   "resume test is exact); open in docs/reliability.md")


@pytest.mark.parametrize("command", [pytest.param(c, marks=KNOWN_INEXACT) if c == "lora-train" else c for c in TRAINERS])
@pytest.mark.parametrize("where", list(KILL_AT))
def test_sigkill_then_resume(command, where, cli, inputs, tmp_path):
    import subprocess
    import sys as _sys

    from safetensors.torch import load_file

    def args(out):
        return [a.format(src=inputs / "base", out=out, data=inputs / "data") for a in RUNS[command]] + TRAINERS[command]

    ref = tmp_path / OUT_NAME.get(command, "out").replace("out", "ref")
    assert cli(command, *args(ref)).code == 0
    out = tmp_path / OUT_NAME.get(command, "out")
    before = digest(inputs)
    p = subprocess.run([_sys.executable, "-c", CHILD, where, command, *args(out)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not out.exists()
    r = cli(command, *args(out), "--resume", "--json")
    assert r.code == 0, r.err[-2000:]
    assert r.json()["resumed_from"] in ((1, 2) if where != "after-step" else (2,))
    weights = (lambda p: load_file(str(p))) if out.suffix else (
        lambda p: load_file(str(p / "transformer" / "diffusion_pytorch_model.safetensors")))
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on CPU
    assert digest(inputs) == before
    ckpt = tmp_path / (out.name.split(".")[0] + ".ckpt")
    assert not (ckpt / ".checkpoint.tmp").exists() and not (ckpt / ".checkpoint.old").exists()


def test_every_command_and_case_is_covered():
    from ditkit.cli.main import COMMANDS

    assert set(RUNS) == set(COMMANDS) == set(BAD_OPTION)
    covered = {(c, k) for c, k, _, _ in MATRIX}
    assert covered | NOT_APPLICABLE == {(c, k) for c in RUNS for k in CASES}
    assert len(MATRIX) == len(RUNS) * len(CASES) - len(NOT_APPLICABLE)


def test_docs_matrix_is_current():
    doc = DOC.read_text()
    assert markdown_matrix() in doc, "regenerate the matrix: python tests/test_reliability.py"
    assert markdown_policy() in doc, "regenerate the tables: python tests/test_reliability.py policy"


if __name__ == "__main__":  # print the tables docs/reliability.md shows
    print(markdown_policy() if sys.argv[1:] == ["policy"] else markdown_matrix(), end="")
