"""The output policy and atomic outputs: what a command may write, and how it writes it.

The policy (`check_output` / `check_outputs`, run by every command before any work):
  - an output that is, contains or lies inside any input (symlinks resolved first) is refused;
  - an existing output is replaced only with --force, and only when it is a regular file, a symlink (the
    link itself is replaced, its target never written), an empty directory, or a directory ditkit wrote
    (a `ditkit.json`, a `generate.json` or a ditkit checkpoint marker proves it); a FIFO, a device node,
    a socket or anyone else's directory is refused even with --force;
  - nothing is created by the check itself (a refused run leaves the disk as it found it).

Atomic writes: everything is written into a temporary sibling, then renamed into place. A crash, Ctrl-C,
SIGTERM, a full disk or an error leaves the old output (or nothing) behind, never a half-written one:
  - the temporary sibling (`.NAME.tmp-XXXX`) sits in the directory that holds OUT (the directory of the
    path the user named, never the target of a symlink), so the final `os.replace` is one rename on one
    filesystem; parents it had to create are removed again when the write fails;
  - SIGINT and SIGTERM (where nothing else handles them) raise `SignalInterrupt`, a BaseException like
    KeyboardInterrupt, so library code's `except Exception` cannot swallow it and every cleanup runs; the CLI
    holds this guard for the whole command (`interrupts_raise()`), each write narrows its message;
  - the rename that commits an output defers signals, so an output is never lost between two renames;
  - ENOSPC/EDQUOT become `DiskFullError` (exit 2: "no space left on DEVICE writing PATH; free N MB").
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterable

from .errors import ConfigError, OutputExistsError

CHECKPOINT_MARKER = "ditkit-checkpoint.json"  # written into every checkpoint directory ditkit makes
OWNED_MARKERS = ("ditkit.json", "generate.json", CHECKPOINT_MARKER)  # any one proves ditkit wrote a directory
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
MB = 1 << 20


class DiskFullError(ConfigError):
    """The filesystem an output is written to is full (or over quota): bad input (exit 2), nothing left."""


class SignalInterrupt(BaseException):
    """SIGINT/SIGTERM outside a training loop. A BaseException (as KeyboardInterrupt) so that no
    `except Exception` on the way up swallows it; the CLI maps it to exit 130 and prints its message."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def _parent(out: Path) -> Path:
    """The directory holding `out` itself (a symlink's own directory, not its target's)."""
    return Path(os.path.abspath(out)).parent


# -- what is on disk -----------------------------------------------------------------------------------

def _kind(path: Path) -> str | None:
    """None (nothing there), 'link', 'file', 'dir', 'FIFO', 'device node', 'socket' (lstat: links not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device node"
    return "socket" if stat.S_ISSOCK(mode) else "special file"


def is_ditkit_dir(path: Path) -> bool:
    """True for a directory ditkit wrote: it holds ditkit.json (bundles), generate.json (images) or the
    checkpoint marker (training state), as a regular file."""
    return _kind(Path(path)) == "dir" and any(_kind(Path(path) / m) == "file" for m in OWNED_MARKERS)


def _replaceable(out: Path) -> str | None:
    """Why `out` may not be replaced even with --force (None when it may)."""
    kind = _kind(out)
    if kind in (None, "link", "file"):
        return None
    if kind == "dir":
        if is_ditkit_dir(out) or not any(out.iterdir()):
            return None
        return "is a directory ditkit did not write (it holds no ditkit.json)"
    return f"is a {kind}, not a file or directory ditkit wrote"


# -- outputs vs inputs -----------------------------------------------------------------------------------

def _real(path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _spots(out: Path) -> list[Path]:
    """Where writing `out` lands: the link itself (replaced by a rename) and, resolved, what it points to."""
    at = _real(_parent(out)) / out.name
    real = _real(out)
    return [at] if real == at else [at, real]


def overlap(a: Path, b: Path) -> str | None:
    """'is', 'contains' or 'lies inside' when path a (resolved) overlaps path b (resolved); else None."""
    if a == b:
        return "is"
    if b.is_relative_to(a):
        return "contains"
    if a.is_relative_to(b):
        return "lies inside"
    return None


def check_disjoint(out: Path, inputs: Iterable, what: str = "output") -> None:
    """Refuse an output that is, contains or lies inside any (existing) input, symlinks resolved."""
    for src in inputs:
        if src is None or not os.path.lexists(os.path.expanduser(str(src))):
            continue  # an embedded model's name, or missing: loading reports it
        real_src = _real(src)
        for spot in _spots(Path(out)):
            rel = overlap(spot, real_src)
            if rel is not None:
                raise ConfigError(f"{what} {out} {rel} the input {src}"
                                  f"{f' (resolved: {real_src})' if str(real_src) != os.path.abspath(src) else ''}; "
                                  "choose another path (inputs are never changed)")


def _existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path)).parent
    while not os.path.lexists(p):
        p = p.parent
    return p


def check_output(out: Path, force: bool, inputs: Iterable = (), *, what: str = "output",
                 kind: str | None = None) -> Path:
    """Validate one output path before any work is done (bad input fails fast and nothing is written).

    inputs: every path the command reads (checkpoints, data folders, adapters, configs, prompts files);
    kind: 'file' or 'dir' when the caller knows what it will write there."""
    out = Path(out).expanduser()
    check_disjoint(out, inputs, what)
    k = _kind(out)
    if k is not None:
        why = _replaceable(out)
        if k not in ("link", "file", "dir"):  # a FIFO or a device is never an output, --force or not
            raise ConfigError(f"{what} {out} {why}; ditkit writes only regular files and directories, "
                              "choose another path")
        if not force:
            raise OutputExistsError(f"{what} '{out}' already exists; pass --force to replace it or choose another "
                                    f"{'-o' if what == 'output' else what}")
        if why is not None:
            raise ConfigError(f"{what} {out} {why}; --force replaces only ditkit's own outputs, choose another path")
        if kind == "file" and k == "dir":
            raise ConfigError(f"{what} {out} is a directory; give a file name")
    parent = _existing_ancestor(out)
    if not parent.is_dir():
        raise ConfigError(f"the parent of {what} {out} is not a directory ({parent} is a file); choose another path")
    try:  # os.access says yes to root on read-only mounts: try it
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full(e, out)
        raise ConfigError(f"{what} directory {parent} is not writable ({e.strerror}); choose a writable path")
    return out


def check_outputs(outs: Iterable, force: bool, inputs: Iterable = (), *, what: Iterable[str] | None = None) -> list[Path]:
    """check_output for each of several outputs of one command (None entries are skipped), and refuse two
    outputs that overlap each other (one would replace or hold the other)."""
    outs = list(outs)
    pairs = [(Path(o), w) for o, w in zip(outs, list(what or []) + ["output"] * len(outs)) if o is not None]
    inputs = list(inputs)
    for i, (a, wa) in enumerate(pairs):
        check_output(a, force, inputs, what=wa)
        for b, wb in pairs[i + 1:]:
            check_apart(a, wa, b, wb)
    return [p for p, _ in pairs]


def check_apart(a: Path, wa: str, b: Path, wb: str) -> None:
    """Refuse two paths one command writes when one is, holds or lies inside the other."""
    for sa in _spots(Path(a)):
        for sb in _spots(Path(b)):
            rel = overlap(sa, sb)
            if rel is not None:
                raise ConfigError(f"{wa} {a} {rel} {wb} {b}; give them separate paths")


# -- signals -------------------------------------------------------------------------------------------

_doing: list[str] = []  # what the guarded code is doing, innermost last (names the interrupt)
_deferred: list[int] = []  # signals that arrived while an output was being committed
_committing = [0]


def _handler(signum, frame):
    if _committing[0]:
        _deferred.append(signum)  # raised once the rename is done
        return
    name = signal.Signals(signum).name
    doing = _doing[-1] if _doing else None
    if doing:
        raise SignalInterrupt(signum, f"{name} while writing {doing}; nothing was written (the temporary files "
                                      "were removed)")
    raise SignalInterrupt(signum, f"interrupted by {name}; no output was written")


@contextlib.contextmanager
def interrupts_raise(what: str | None = None):
    """SIGINT/SIGTERM raise SignalInterrupt inside the block (only where nobody else handles them: a training
    loop's own handler, which checkpoints first, is left alone; an ignored signal stays ignored). `what`
    names the output being written (the interrupt's message)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        h = signal.getsignal(s)
        if h in (signal.SIG_DFL, signal.default_int_handler):
            old[s] = signal.signal(s, _handler)
    ours = old or all(signal.getsignal(s) is _handler for s in (signal.SIGINT, signal.SIGTERM))
    if what is not None and ours:
        _doing.append(what)
    try:
        yield
    finally:
        if what is not None and ours:
            _doing.pop()
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _commit(out: Path):
    """Signals wait until the renames that put `out` in place are done (then the command stops, 130)."""
    _committing[0] += 1
    try:
        yield
    finally:
        _committing[0] -= 1
    if _deferred and not _committing[0]:
        signum = _deferred[-1]
        _deferred.clear()
        raise SignalInterrupt(signum, f"{signal.Signals(signum).name} after {out} was written (it is complete); "
                                      "stopped")


# -- a full disk ---------------------------------------------------------------------------------------

def _device(path: Path) -> str:
    """'DEVICE (mounted on MOUNT)' for the filesystem holding `path`, from /proc/mounts."""
    p = _real(_existing_ancestor(path) if not os.path.lexists(path) else path)
    best = ("", "")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2:
                    dev, mnt = fields[0], fields[1].replace("\\040", " ")
                    if (p == Path(mnt) or p.is_relative_to(mnt)) and len(mnt) >= len(best[1]):
                        best = (dev, mnt)
    except OSError:
        pass
    return f"{best[0]} (mounted on {best[1]})" if best[0] else str(p)


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(_existing_ancestor(path) if not os.path.isdir(path) else path)
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0


def _tree_bytes(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    except OSError:
        return 0


def full_disk_cause(err: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind `err` (itself, its cause or context), if any; libraries that wrap
    the OSError (or only keep its text) are recognised by the strerror text."""
    seen = set()
    e = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return OSError(errno.ENOSPC if "No space" in text else errno.EDQUOT, text)
        e = e.__cause__ or e.__context__
    return None


def disk_full(err: OSError, out: Path, written: int = 0, expected: int | None = None) -> DiskFullError:
    """The one-line error: the device, the output, and how much to free (at least what the output needs,
    counted as the larger of `expected` and what was written when the disk filled, plus 1 MB)."""
    need = max(expected or 0, written) + MB
    free = max(math.ceil((need - _free_bytes(_parent(out))) / MB), 1)
    quota = " (disk quota exceeded)" if err.errno == errno.EDQUOT else ""
    return DiskFullError(f"no space left on {_device(_parent(out))}{quota} writing {out}; free {free} MB "
                         "(or choose another path)")


def disk_full_error(err: BaseException, out: Path | None = None) -> DiskFullError | None:
    """A DiskFullError for any error caused by a full disk (None for other errors)."""
    if isinstance(err, DiskFullError):
        return err
    if isinstance(err, BaseException) and not isinstance(err, Exception):
        return None  # an interrupt is never a full disk
    cause = full_disk_cause(err)
    if cause is None:
        return None
    where = out or (Path(cause.filename) if getattr(cause, "filename", None) else Path.cwd())
    return disk_full(cause, Path(where))


# -- writing -------------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, directory: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600; give outputs the permissions a plain mkdir/open would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _make_parents(parent: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (deepest last) so a failed write can remove them."""
    made = []
    p = parent
    while not os.path.lexists(p):
        made.append(p)
        p = p.parent
    for d in reversed(made):
        d.mkdir()
    return made[::-1]


def _remove_made(made: list[Path]) -> None:
    for d in reversed(made):
        with contextlib.suppress(OSError):
            d.rmdir()  # only when still empty


@contextlib.contextmanager
def _writing(out: Path, state: dict, expected: int | None):
    """Guard a write: interrupts raise, and a full disk (ENOSPC/EDQUOT, however a library wraps it) is
    reported as one line once the staging path is removed (state["written"]: what it had reached)."""
    try:
        yield
    except Exception as e:
        cause = None if isinstance(e, DiskFullError) else full_disk_cause(e)
        if cause is None:
            raise
        raise disk_full(cause, out, state["written"], expected) from None


def _discard(state: dict) -> None:
    tmp = state["tmp"]
    if tmp is not None and os.path.lexists(tmp):
        state["written"] = _tree_bytes(tmp)
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    _remove_made(state["made"])


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False, expected_bytes: int | None = None):
    """Yield a temporary directory; on success it replaces `out` in one rename."""
    out = check_output(out, force, kind="dir")
    parent = _parent(out)
    state = {"tmp": None, "written": 0, "made": []}
    with interrupts_raise(str(out)), _writing(out, state, expected_bytes):
        try:
            state["made"] = _make_parents(parent)
            tmp = state["tmp"] = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
            _usual_mode(tmp, directory=True)
            yield tmp
            with _commit(out):
                if out.exists() or out.is_symlink():
                    why = _replaceable(out)  # again: it may have changed while the output was made
                    if why is not None:
                        raise ConfigError(f"output {out} {why}; --force replaces only ditkit's own outputs")
                    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
                    os.replace(out, old / "x")  # a symlink moves as a link: its target is untouched
                    os.replace(tmp, out)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, out)
                state["tmp"] = None
        except BaseException:
            _discard(state)
            raise


@contextlib.contextmanager
def atomic_file(out: Path, force: bool = False, expected_bytes: int | None = None):
    """Yield a temporary file path beside `out`; renamed onto `out` on success."""
    out = check_output(out, force, kind="file")
    parent = _parent(out)
    state = {"tmp": None, "written": 0, "made": []}
    with interrupts_raise(str(out)), _writing(out, state, expected_bytes):
        try:
            state["made"] = _make_parents(parent)
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=parent)
            os.close(fd)
            tmp = state["tmp"] = Path(name)
            _usual_mode(tmp, directory=False)
            yield tmp
            with _commit(out):
                if _kind(out) not in (None, "link", "file"):
                    what = "is a directory; give a file name" if _kind(out) == "dir" else _replaceable(out)
                    raise ConfigError(f"output {out} {what}")
                os.replace(tmp, out)  # a symlink OUT is replaced by the file, never written through
                state["tmp"] = None
        except BaseException:
            _discard(state)
            raise
