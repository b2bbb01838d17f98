"""Atomic outputs: everything is written into a temporary sibling, then renamed into place.

A crash, Ctrl-C, SIGTERM or error leaves the old output (or nothing) behind, never a half-written one:
  - the temporary sibling (`.NAME.tmp-XXXX`) sits in the directory that holds OUT (the directory of the
    path the user named, never the target of a symlink), so the final `os.replace` is one rename on one
    filesystem;
  - while it is being filled, SIGINT and SIGTERM (when nothing else handles them) raise `Interrupted`, so
    the temporary sibling is removed and the command exits 130;
  - an OUT that is a symlink is replaced as a link (with --force): the link's target is never written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import ConfigError, Interrupted, OutputExistsError


def _parent(out: Path) -> Path:
    """The directory holding `out` itself (a symlink's own directory, not its target's)."""
    return Path(os.path.abspath(out)).parent


def check_output(out: Path, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Validate an output path before any work is done (so bad input fails fast and writes nothing)."""
    out = Path(out).expanduser()
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it or choose another -o")
    resolved = out.resolve()
    for src in inputs:
        if src is not None and Path(src).exists() and resolved == Path(src).resolve():
            raise ConfigError(f"output {out} is the input; choose another -o (inputs are never changed)")
    parent = _parent(out)
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the parent of output {out} ({e.strerror}); choose a writable -o")
    if not parent.is_dir():
        raise ConfigError(f"the parent of output {out} is not a directory; choose another -o")
    try:  # os.access says yes to root on read-only mounts: try it
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"output directory {parent} is not writable ({e.strerror}); choose a writable -o")
    return out


@contextlib.contextmanager
def interrupts_raise(what: str):
    """SIGINT/SIGTERM raise Interrupted inside the block (only where nobody else handles them: a training
    loop's own handler, which checkpoints first, is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(f"{signal.Signals(signum).name} while writing {what}; nothing was written "
                          "(the temporary files were removed)")

    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):
            old[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, directory: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600; give outputs the permissions a plain mkdir/open would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False):
    """Yield a temporary directory; on success it replaces `out` in one rename."""
    out = check_output(out, force)
    parent = _parent(out)
    with interrupts_raise(str(out)):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        _usual_mode(tmp, directory=True)
        try:
            yield tmp
            if out.exists() or out.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
                os.replace(out, old / "x")  # a symlink moves as a link: its target is untouched
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
    with interrupts_raise(str(out)):
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=_parent(out))
        os.close(fd)
        tmp = Path(name)
        _usual_mode(tmp, directory=False)
        try:
            yield tmp
            if out.is_dir() and not out.is_symlink():
                raise ConfigError(f"output {out} is a directory; give a file name")
            os.replace(tmp, out)  # a symlink OUT is replaced by the file, never written through
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
