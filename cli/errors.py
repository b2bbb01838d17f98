"""The one table mapping typed errors to a one-line message and an exit code (docs/cli.md lists it)."""
from __future__ import annotations

import os
import sys

try:  # typer >= 0.2x ships its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions

from ditkit.formats.atomic import SignalInterrupt, disk_full_error
from ditkit.formats.errors import (CompileError, ConfigError, DitkitError, FormatError, HardwareError, Interrupted,
                                   OutputExistsError, QualityGateError, UnsupportedModelError)

EXIT_OK = 0
EXIT_GATE = 1  # a quality gate or parity check failed; the full report was still printed
EXIT_INPUT = 2  # bad input or usage: nothing was written
EXIT_INTERNAL = 3  # a bug in ditkit (run with DITKIT_DEBUG=1 for the traceback)
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: long jobs saved a resumable checkpoint first

EXIT_CODES: dict[type, int] = {
    QualityGateError: EXIT_GATE,
    ConfigError: EXIT_INPUT,
    FormatError: EXIT_INPUT,
    UnsupportedModelError: EXIT_INPUT,
    OutputExistsError: EXIT_INPUT,
    HardwareError: EXIT_INPUT,
    CompileError: EXIT_INPUT,  # --compile where torch.compile cannot build kernels (no C++ compiler): nothing written
    Interrupted: EXIT_INTERRUPTED,
    SignalInterrupt: EXIT_INTERRUPTED,  # SIGINT/SIGTERM outside a training loop: every cleanup ran
    KeyboardInterrupt: EXIT_INTERRUPTED,  # Ctrl-C outside a handler: atomic outputs were rolled back
    click_exceptions.UsageError: EXIT_INPUT,
}


def exit_code(err: BaseException) -> int:
    for cls in type(err).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_INTERNAL


MAX_LINE = 300  # characters of an error line: a value echoed from a file (a 1 MB caption) is cut, not printed whole


def one_line(text: str, limit: int = MAX_LINE) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def report_error(err: BaseException) -> int:
    """Print `Error: ...` on stderr (traceback only with DITKIT_DEBUG=1); return the exit code."""
    if os.environ.get("DITKIT_DEBUG") == "1":
        import traceback

        traceback.print_exception(err)
    err = disk_full_error(err) or err  # ENOSPC/EDQUOT anywhere is bad input (exit 2), not a bug
    code = exit_code(err)
    if isinstance(err, click_exceptions.UsageError):
        msg = err.format_message()
    elif isinstance(err, (DitkitError, SignalInterrupt)):
        msg = str(err)
    elif isinstance(err, KeyboardInterrupt):
        msg = "interrupted (SIGINT); outputs are written atomically, so nothing half-written was left"
    elif isinstance(err, MemoryError):
        msg = "out of memory; use a smaller --batch-size or resolution"
    else:
        msg = f"internal error ({type(err).__name__}: {err}); rerun with DITKIT_DEBUG=1 and report it"
    print(f"Error: {one_line(msg)}", file=sys.stderr)
    return code
