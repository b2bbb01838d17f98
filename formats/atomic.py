"""Atomic outputs: everything is written into a temporary sibling, then renamed into place.

A crash, Ctrl-C or error leaves the old output (or nothing) behind, never a half-written one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError, OutputExistsError


def check_output(out: Path, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Validate an output path before any work is done (so bad input fails fast and writes nothing)."""
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it or choose another -o")
    resolved = out.resolve()
    for src in inputs:
        if src is not None and Path(src).exists() and resolved == Path(src).resolve():
            raise ConfigError(f"output {out} is the input; choose another -o (inputs are never changed)")
    parent = resolved.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the parent of output {out} ({e.strerror}); choose a writable -o")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output directory {parent} is not writable; choose a writable -o")
    return out


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False):
    """Yield a temporary directory; on success it replaces `out` in one rename."""
    out = check_output(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: Path, force: bool = False):
    """Yield a temporary file path beside `out`; renamed onto `out` on success."""
    out = check_output(out, force)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
