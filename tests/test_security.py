"""Security rules (docs/reliability.md): loading runs no code; symlinks and manifest paths cannot make ditkit
write outside what the user named, and manifest paths are never opened by loading, info or generate."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ditkit.cli.errors import EXIT_INPUT


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


class Payload:
    """A pickle that would run a command on load (writes a marker file) if torch.load were not weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pt_that_pickles_a_callable_is_refused_without_running_it(cli, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"pos_embed": torch.zeros(1), "x": Payload(marker)}, tmp_path / "evil.pt")
    r = cli("info", tmp_path / "evil.pt")
    assert r.code == EXIT_INPUT and r.error_line.startswith("Error: ")
    assert "refused without running" in r.error_line, r.error_line
    assert not marker.exists()


@pytest.fixture
def outside(tmp_path):
    """A directory the user did not name as an output, with a file whose bytes must never change."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    (d / "precious.txt").write_text("do not touch\n")
    return d


def test_symlinked_weights_are_read_and_never_written(cli, tiny_dir, tmp_path, outside):
    """A weights file symlinked out of the checkpoint (as Hugging Face's cache lays snapshots out) is read; a
    prune of it writes only under -o."""
    ckpt = shutil.copytree(tiny_dir("dit"), tmp_path / "ckpt")
    w = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    shutil.move(w, outside / "blob.safetensors")
    w.symlink_to(outside / "blob.safetensors")
    before = tree_digest(outside)
    r = cli("info", ckpt, "--json")
    assert r.code == 0 and r.json()["params"] > 0
    r = cli("prune", ckpt, "-o", tmp_path / "pruned", "--method", "depth", "--keep", "1", "--calib-samples", "1",
            "--calib-steps", "1", "--calib-points", "1", "--no-timing")
    assert r.code == 0, r.err
    assert tree_digest(outside) == before and sorted(p.name for p in outside.iterdir()) == ["blob.safetensors",
                                                                                          "precious.txt"]
    assert not (tmp_path / "pruned" / "transformer" / "diffusion_pytorch_model.safetensors").is_symlink()


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_output_symlink_is_replaced_not_written_through(kind, tmp_path, outside):
    from ditkit.formats.atomic import atomic_dir, atomic_file
    from ditkit.formats.errors import OutputExistsError

    target = outside if kind == "dir" else outside / "precious.txt"
    link = tmp_path / "out" / ("result" if kind == "dir" else "adapter.safetensors")
    link.parent.mkdir()
    link.symlink_to(target)
    before = tree_digest(outside)
    writer = atomic_dir if kind == "dir" else atomic_file
    with pytest.raises(OutputExistsError):  # a symlink, even dangling, is an existing output
        with writer(link):
            pass
    with writer(link, force=True) as tmp:
        assert tmp.parent == link.parent  # the temporary sibling sits beside the link, not beside its target
        (tmp / "new.txt").write_text("new") if kind == "dir" else tmp.write_text("new")
    assert not link.is_symlink() and tree_digest(outside) == before
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]  # no temp files left there either


def test_manifest_paths_are_records_never_opened(cli, tiny_dir, tmp_path, outside):
    """parent/lineage paths in ditkit.json point elsewhere (absolute and ../): loading, info, generate and
    prune do not open anything there."""
    ckpt = shutil.copytree(tiny_dir("dit"), tmp_path / "ckpt")
    (outside / "model_index.json").write_text("{}")
    rel = os.path.relpath(outside, ckpt)
    (ckpt / "ditkit.json").write_text(json.dumps({
        "format_version": 1, "family": "dit", "op": "prune",
        "parent": {"path": str(outside), "sha256": "0" * 64},
        "lineage": [{"op": "import", "path": rel, "sha256": None}, {"op": "prune", "path": str(outside), "sha256": None}],
        "defaults": {"sampler": "ddim", "steps": 2, "guidance": 1.0}}))
    opened, active = [], [True]

    def hook(event, args):
        if active[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    before = tree_digest(outside)
    sys.addaudithook(hook)  # (cannot be removed: it is switched off below)
    for args in (["info", ckpt], ["generate", ckpt, "-o", tmp_path / "imgs", "--num-images", "1", "--labels", "1"]):
        r = cli(*args)
        assert r.code == 0, r.err
    touched = [p for p in opened if Path(os.path.abspath(p)).is_relative_to(outside)]
    active[0] = False
    assert touched == [] and tree_digest(outside) == before
    sidecar = json.loads((tmp_path / "imgs" / "generate.json").read_text())
    assert sidecar["source"] == str(ckpt)  # the report names what the user gave, not the recorded parent


def test_outputs_get_the_usual_permissions(tmp_path):
    # mkdtemp/mkstemp make 0700/0600; an output must be readable by others as a plain mkdir/open makes it
    from ditkit.formats.atomic import atomic_dir, atomic_file

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as d:
            (d / "f.json").write_text("{}")
        with atomic_file(tmp_path / "f.safetensors") as f:
            f.write_bytes(b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "f.safetensors").stat().st_mode & 0o777 == 0o644
