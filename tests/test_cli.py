"""CLI conventions: bad input gives one `Error:` line, exit 2, nothing written; --help lists real commands."""
from __future__ import annotations

import shutil

import pytest
import torch

from ditkit.cli.errors import EXIT_CODES, EXIT_INPUT
from ditkit.cli.main import COMMANDS, app


def assert_bad_input(r, needle: str):
    assert r.code == EXIT_INPUT, (r.code, r.err)
    lines = [l for l in r.err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.err
    assert needle in lines[0], lines[0]
    assert r.out == ""


def bad_inputs(tmp_path, tiny_dir):
    (tmp_path / "empty").mkdir()
    trunc = shutil.copytree(tiny_dir("dit"), tmp_path / "trunc")
    f = trunc / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    badcfg = shutil.copytree(tiny_dir("dit"), tmp_path / "badcfg")
    (badcfg / "transformer" / "config.json").write_text("{oops")
    bare = tmp_path / "bare.safetensors"
    shutil.copy(tiny_dir("dit") / "transformer" / "diffusion_pytorch_model.safetensors", bare)
    return [
        ([tmp_path / "nope"], "does not exist"),
        ([tmp_path / "empty"], "is not a checkpoint"),
        ([trunc], "truncated"),
        ([badcfg], "not valid JSON"),
        ([bare, "--family", "unet"], "unknown family 'unet'"),
    ]


@pytest.mark.parametrize("command", ["info", "generate"])
def test_bad_checkpoints(command, cli, tiny_dir, tmp_path):
    for args, needle in bad_inputs(tmp_path, tiny_dir):
        extra = ["-o", tmp_path / "out"] if command == "generate" else []
        r = cli(command, *args, *extra)
        assert_bad_input(r, needle)
        assert not (tmp_path / "out").exists()


class Thing:
    """Any non-tensor object: weights_only loading must refuse it."""


def test_pickled_object_pt_is_refused(cli, tmp_path):
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "obj": Thing()}, tmp_path / "obj.pt")
    assert_bad_input(cli("info", tmp_path / "obj.pt"), "other than tensors")


@pytest.mark.parametrize("args,needle", [
    (["--steps", "0"], "--steps must be in 1..1000"),
    (["--sampler", "heun"], "unknown sampler 'heun'"),
    (["--sampler", "flow-euler"], "does not fit the dit family"),
    (["--labels", "x"], "--labels must be comma-separated integers"),
    (["--labels", "1001"], "out of range"),
    (["--prompt", "a cat"], "use --labels, not --prompt"),
    (["--height", "30"], "multiple of 8"),
    (["--dtype", "bf16"], "for CUDA devices"),
    pytest.param(["--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")),
    (["--bogus"], "No such option"),
])
def test_bad_options(args, needle, cli, tiny_dir, tmp_path):
    r = cli("generate", tiny_dir("dit"), "-o", tmp_path / "out", "--steps", "2", *args)
    assert_bad_input(r, needle)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(cli, tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    r = cli("generate", tiny_dir("dit"), "-o", out, "--steps", "2", "--labels", "1")
    assert_bad_input(r, "--force")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    r = cli("generate", tiny_dir("dit"), "-o", out, "--steps", "2", "--labels", "1", "--force")
    assert_bad_input(r, "ditkit did not write")  # --force replaces only ditkit's own outputs
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    (out / "mine.txt").unlink()
    (out / "generate.json").write_text("{}")  # an earlier generate output
    r = cli("generate", tiny_dir("dit"), "-o", out, "--steps", "2", "--labels", "1", "--force")
    assert r.code == 0 and (out / "00000.png").is_file()


def test_help_lists_only_real_commands(cli):
    import typer

    r = cli("--help")
    assert r.code == 0
    group = typer.main.get_command(app)
    listed = group.list_commands(typer.Context(group))
    assert {"info", "generate"} <= set(listed) and listed == list(COMMANDS)
    for name in listed:
        assert f"  {name}  " in r.out
        assert group.get_command(typer.Context(group), name).name == name  # each one builds from its module


def test_version(cli):
    from importlib.metadata import version

    r = cli("--version")
    assert (r.code, r.out) == (0, f"ditkit {version('ditkit')}\n")


def test_every_error_type_has_a_code():
    from ditkit.formats import errors

    typed = [getattr(errors, n) for n in dir(errors)
             if isinstance(getattr(errors, n), type) and issubclass(getattr(errors, n), errors.DitkitError)
             and getattr(errors, n) is not errors.DitkitError]
    assert all(t in EXIT_CODES for t in typed)
