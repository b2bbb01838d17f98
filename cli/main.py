"""The ditkit command line: one Typer app, each command a thin wrapper over one op.

Commands are imported lazily: `ditkit --help`, `ditkit --version` and a command's own `--help` import no more
than that command's module, and a command's module imports its op only when the command runs; the top-level
list comes from the static table below (tests/test_startup.py checks it against the modules' docstrings).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

import typer
from typer.core import TyperGroup
from typer.models import CommandInfo

from .errors import EXIT_OK, click_exceptions, report_error

# command name -> ("module:function" in ditkit.cli, its help: the first paragraph of the function's docstring,
# which `ditkit --help` shortens). --help lists only what is registered here.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("info:info_cmd", "Family, path, parameters, bytes on disk, FLOPs per denoising step, lineage."),
    "generate": ("generate:generate_cmd", "Generate images (PNGs, a grid and a JSON sidecar); scored by the "
                                          "model's judge when it has one."),
    "bench": ("bench:bench_cmd", "Time base and variants interleaved in one process; compare their images on "
                                 "identical seeds; gate."),
    "prune": ("prune:prune_cmd", "Prune a transformer (depth, width, magnitude, 2:4) and save it as a bundle that "
                                 "records what was removed."),
    "quantize": ("quantize:quantize_cmd", "Quantize the transformer; report bytes, per-layer and output SQNR, and "
                                          "the kernel each layer runs."),
    "export": ("export:export_cmd", "Export a checkpoint; ONNX graphs are checked against PyTorch (exit 1 over "
                                    "--atol/--rtol, nothing written)."),
    "distill": ("distill:distill_cmd", "Distill a student from a teacher: recover a pruned model, make a few-step "
                                       "one, or train a feedback module that makes some steps partial (--mode "
                                       "feedback); exact --resume."),
    "lora-train": ("lora:lora_train_cmd", "Train a LoRA adapter on a folder of images (any family), save it as "
                                          "diffusers/PEFT or kohya safetensors, and optionally fuse it into a new "
                                          "bundle. With --lora and no --data: fuse or re-export an existing "
                                          "adapter."),
    "cache": ("cache:cache_cmd", "Calibrate training-free step caching to a target speedup (every method, or one); "
                                 "weights unchanged."),
}


def command_function(name: str):
    """The function behind `ditkit NAME` (imports its module)."""
    module_name, fn = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(f"ditkit.cli.{module_name}"), fn)


class LazyGroup(TyperGroup):
    """A command is built from its module only when it is asked for (run, or its own --help)."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, cmd_name: str):
        if cmd_name not in COMMANDS:
            return None
        if cmd_name not in self.commands:
            info = CommandInfo(name=cmd_name, callback=command_function(cmd_name))
            self.commands[cmd_name] = typer.main.get_command_from_info(
                info, pretty_exceptions_short=True, rich_markup_mode=None)
        return self.commands[cmd_name]

    def format_commands(self, ctx, formatter) -> None:
        limit = formatter.width - 6 - max(len(n) for n in COMMANDS)
        rows = [(name, _short(help_, limit)) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _short(text: str, limit: int) -> str:
    """Click's short help: the first sentence, cut at `limit` characters."""
    try:  # typer >= 0.2x ships its own copy of click
        from typer._click.utils import make_default_short_help
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click.utils import make_default_short_help

    return make_default_short_help(text, limit)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"ditkit {version('ditkit')}")
        raise typer.Exit(0)


app = typer.Typer(
    name="ditkit", cls=LazyGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Turn a diffusion-transformer checkpoint into smaller, faster or customized variants, and measure them.",
)


@app.callback()
def _global(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                         help="Print the version and exit.")):
    """Options of ditkit itself (every command's own options, --threads among them, follow its name)."""


def _quiet_libraries() -> None:
    """Library chatter is not for ditkit's users (set before any library is imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # ditkit never downloads: checkpoints are local
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if os.environ.get("DITKIT_DEBUG") != "1":
        warnings.filterwarnings("ignore")  # library deprecation chatter is not for ditkit's users
        # bitsandbytes logs an optional-kernel miss on every import on CPUs with AVX512-BF16 ("pip install
        # kernels"); it falls back to its own kernels, so the line is noise on every command
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        # importing transformers imports torchao when it is installed (the peers extra): torchao logs each of its
        # optional CUDA extensions it cannot load and torch logs a deprecation of torchao's pytree registrations;
        # `kernels` (bitsandbytes' optional kernel hub) logs that offline mode skips a trust check it cannot do
        for name in ("torchao", "torch.utils._pytree", "kernels"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # diffusers' own progress bars are switched off where diffusers is first needed (cli/run.py: quiet_diffusers)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    from ditkit.formats.atomic import interrupts_raise

    try:
        with interrupts_raise():  # SIGINT and SIGTERM in every phase: exit 130, one line, cleanups run
            app(args=argv, standalone_mode=False, prog_name="ditkit")
        code = EXIT_OK
    except typer.Exit as e:  # --help, --version
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
