"""stdout is data, stderr is talk: JSON documents, rich tables and progress bars."""
from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# no file= : rich then writes to whatever sys.stdout / sys.stderr is at print time (a console bound to the
# stream of import time breaks when the CLI runs in-process under redirected or captured streams)
out = Console(soft_wrap=True)
err = Console(stderr=True)


def print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_kv(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(str(k), v if isinstance(v, str) else json.dumps(v, default=str))
    out.print(table)


def progress(label: str, total: int) -> Progress:
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                    transient=True, disable=not err.is_terminal)


def log(msg: str) -> None:
    err.print(msg)
