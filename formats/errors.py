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


class QualityGateError(DitkitError):
    """A quality or speed gate failed (bench gates, export parity)."""


class Interrupted(DitkitError):
    """SIGINT/SIGTERM during a long job; a resumable checkpoint was written."""


def choice_error(what: str, value, choices) -> ConfigError:
    """'unknown sampler 'foo', choose one of: ddim, euler' - built from a registry's keys."""
    return ConfigError(f"unknown {what} {value!r}, choose one of: {', '.join(sorted(choices))}")
