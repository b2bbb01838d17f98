"""The root of ditkit's typed errors, here because the lowest layer raises them too (a bad judge config, a
malformed feedback schedule). The whole family of error types is imported from ditkit.formats.errors, which
defines the rest on top of these two and which cli/errors.py maps to exit codes."""


class DitkitError(Exception):
    """Base of every error ditkit reports to a user (never shown with a traceback)."""


class ConfigError(DitkitError):
    """An option or config field has a bad value. Names the field, the value and what is allowed."""
