"""Typed errors. Library code raises these; cli/errors.py maps each to one line and an exit code.

DitkitError and ConfigError are defined in ditkit.nn.errors (the lowest layer raises them too) and are the
same classes here: import every error type from this module."""

from ditkit.nn.errors import ConfigError, DitkitError  # noqa: F401  (re-exported: one family of errors)


class FormatError(DitkitError):
    """A file or directory on disk is missing, unreadable, corrupt or not a checkpoint."""


class UnsupportedModelError(DitkitError):
    """The model's family (or the op's needs) is not supported for this operation."""


class OutputExistsError(DitkitError):
    """The output path exists and --force was not given."""


class HardwareError(DitkitError):
    """The requested scheme or device needs hardware this machine does not have."""


class CompileError(DitkitError):
    """--compile: torch.compile cannot build kernels on this machine (no C++ compiler for inductor on CPU, no Triton
    on CUDA). A single model that cannot be compiled is not this error: it is reported and runs eager."""


class QualityGateError(DitkitError):
    """A quality or speed gate failed (bench gates, export parity)."""


class Interrupted(DitkitError):
    """SIGINT/SIGTERM during a long job; a resumable checkpoint was written."""


def choice_error(what: str, value, choices) -> ConfigError:
    """'unknown sampler 'foo', choose one of: ddim, euler' - built from a registry's keys."""
    return ConfigError(f"unknown {what} {value!r}, choose one of: {', '.join(sorted(choices))}")


# -- option checks every op config's __post_init__ runs (one rule for every command) ----------------------------

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 0..2**64-1; numpy and the noise index math want int64
MAX_COUNT = 2**31 - 1  # any other integer option (steps, batches, sizes, samples): no run comes near it


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def finite(name: str, value) -> None:
    """A float option must be a finite number (`--guidance nan` would run and write blank images)."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag(name)} must be a finite number (got {value})")


def in_range(name: str, value, low, high) -> None:
    if value is not None and not low <= value <= high:
        raise ConfigError(f"{flag(name)} must be in {low}..{high} (got {str(value)[:40]})")


def check_options(cfg) -> None:
    """Every number in a config dataclass is sane: floats finite, seeds in 0..2**63-1, other integers within
    +-(2**31-1) (a batch of 1e21 or a seed of 2**70 is a typo, not a request), in lists too."""
    from dataclasses import fields

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, bool):
                continue
            if isinstance(v, float):
                finite(f.name, v)
            elif isinstance(v, int):
                if f.name == "seed" or f.name.endswith("_seed"):
                    in_range(f.name, v, 0, MAX_SEED)
                elif abs(v) > MAX_COUNT:
                    raise ConfigError(f"{flag(f.name)} is out of range (got {str(v)[:40]}; at most {MAX_COUNT})")
