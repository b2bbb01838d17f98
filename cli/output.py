"""stdout is data, stderr is talk: JSON documents, tables, progress bars and the one stderr writer.

rich is imported on first use (a table or a bar), not at start-up; consoles are built at print time, so they
write to whatever sys.stdout / sys.stderr is then (the CLI also runs in-process under captured streams).
"""
from __future__ import annotations

import json
import sys


def log(msg: str) -> None:
    """The one stderr writer: talk (plans, notes, warnings), one line per call, to the current stderr."""
    print(msg, file=sys.stderr, flush=True)


def print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=True) if stderr else Console(soft_wrap=True)


def print_table(table) -> None:
    """A rich renderable (a Table) on stdout."""
    _console().print(table)


def print_kv(title: str, rows: dict) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(str(k), v if isinstance(v, str) else json.dumps(v, default=str))
    print_table(table)


def emit(doc: dict, json_: bool, title: str, rows: dict | None = None) -> None:
    """The report: exactly one JSON document with --json, else a two-column table of `rows` (default: doc)."""
    if json_:
        print_json(doc)
    else:
        print_kv(title, doc if rows is None else rows)


def progress(label: str, total: int):
    """A transient bar on stderr, drawn only when stderr is a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = _console(stderr=True)
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                    transient=True, disable=not err.is_terminal)
