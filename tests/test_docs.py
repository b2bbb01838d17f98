"""Docs that are generated must be current."""
from pathlib import Path

from ditkit.cli.reference import reference


def test_cli_reference_is_current():
    page = Path(__file__).parents[1] / "docs" / "cli-reference.md"
    assert page.read_text() == reference(), "docs/cli-reference.md is stale: run `make cli-docs`"
