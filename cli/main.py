"""The ditkit command line: one Typer app, each command a thin wrapper over one op."""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

import typer

from .errors import EXIT_OK, click_exceptions, report_error

app = typer.Typer(
    name="ditkit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Turn a diffusion-transformer checkpoint into smaller, faster or customized variants, and measure them.",
)

# command name -> "module:function" in ditkit.cli; --help lists only what is registered here
COMMANDS = {
    "info": "info:info_cmd",
    "generate": "generate:generate_cmd",
    "bench": "bench:bench_cmd",
    "prune": "prune:prune_cmd",
    "quantize": "quantize:quantize_cmd",
    "export": "export:export_cmd",
    "distill": "distill:distill_cmd",
    "lora-train": "lora:lora_train_cmd",
    "cache": "cache:cache_cmd",
}
for name, target in COMMANDS.items():
    module_name, fn = target.split(":")
    app.command(name)(getattr(importlib.import_module(f"ditkit.cli.{module_name}"), fn))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # ditkit never downloads: checkpoints are local
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if os.environ.get("DITKIT_DEBUG") != "1":
        warnings.filterwarnings("ignore")  # library deprecation chatter is not for ditkit's users
        # bitsandbytes logs an optional-kernel miss on every import on CPUs with AVX512-BF16 ("pip install
        # kernels"); it falls back to its own kernels, so the line is noise on every command
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # ditkit draws its own progress on stderr
    from ditkit.formats.atomic import interrupts_raise

    try:
        with interrupts_raise():  # SIGINT and SIGTERM in every phase: exit 130, one line, cleanups run
            app(args=argv, standalone_mode=False, prog_name="ditkit")
        code = EXIT_OK
    except typer.Exit as e:  # --help
        code = e.exit_code
    except click_exceptions.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else "", file=sys.stderr)
        code = 2
    except typer.Abort as e:  # click turns a KeyboardInterrupt into Abort
        if isinstance(e.__cause__, BaseException) and not isinstance(e.__cause__, EOFError):
            code = report_error(e.__cause__)
        else:
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
