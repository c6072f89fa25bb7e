"""What the CLI prints: JSON and rich tables on stdout, warnings and progress on stderr.

Progress is drawn only when stderr is a terminal, so pipes and logs see the result alone.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def warn(message: str) -> None:
    print(f"localllm: warning: {message}", file=sys.stderr)


def stdout_console() -> Console:
    # Wide enough for file names when stdout is a pipe (rich would wrap at 80 columns).
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)


@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
    """A spinner with `message` on stderr while the block runs; nothing when not a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    with Console(stderr=True).status(message):
        yield


def table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> Table:
    """A plain table: a header row, no frame, numbers right-aligned (columns in `right`)."""
    grid = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    for index, name in enumerate(columns):
        grid.add_column(name, justify="right" if index in right else "left", overflow="fold")
    for row in rows:
        grid.add_row(*row)
    return grid


def print_table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> None:
    stdout_console().print(table(columns, rows, right))
