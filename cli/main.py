"""The ditkit command line: one Typer app, each command a thin wrapper over one op."""
from __future__ import annotations

import os
import sys

import click
import typer

from .errors import EXIT_OK, report_error
from .generate import generate_cmd
from .info import info_cmd

app = typer.Typer(
    name="ditkit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Turn a diffusion-transformer checkpoint into smaller, faster or customized variants, and measure them.",
)

COMMANDS = {
    "generate": generate_cmd,
    "info": info_cmd,
}
for name, fn in COMMANDS.items():
    app.command(name)(fn)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # ditkit never downloads: checkpoints are local
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app(args=argv, standalone_mode=False, prog_name="ditkit")
        code = EXIT_OK
    except click.exceptions.Exit as e:  # --help, no args
        code = e.exit_code
    except click.exceptions.Abort:
        print("Error: aborted", file=sys.stderr)
        code = 130
    except BaseException as e:  # noqa: BLE001 - every error leaves as one line and a code
        if isinstance(e, SystemExit):
            raise
        code = report_error(e)
    sys.stdout.flush()
    return code


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
