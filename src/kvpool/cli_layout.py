"""Fit the ``kvpool`` command's tables and text to the terminal (rich), never wrapping a number.

Width: ``COLUMNS`` when set, else the terminal's width, else 100 columns (a pipe or a file).
A table's number and name columns get a fixed width (their longest cell), so they never wrap; only
the text columns ("how it is computed", notes) wrap. Headers go on one line when the table fits so,
else onto several lines at word boundaries; when even that is too wide, the columns are split into
several tables, each repeating the key columns (TP, preset, ...). Lines carry no trailing blanks.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import sys
import textwrap
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

PIPE_WIDTH = 100  # no terminal and no COLUMNS: wide enough for every table on one line per row
MIN_WIDTH = 40
TABLE_INDENT = 2
_ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")
_LINE_TAIL = re.compile(r"(?: |\x1b\[[0-9;]*m)+$", re.MULTILINE)  # blanks mixed with colour codes at a line's end


def output_width() -> int:
    """Columns to draw in: ``COLUMNS`` (as argparse and the shell read it), the terminal's, else 100."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        width = int(columns)
    elif sys.stdout.isatty():
        width = shutil.get_terminal_size((PIPE_WIDTH, 24)).columns
    else:
        width = PIPE_WIDTH
    return max(MIN_WIDTH, width)


def _console() -> Console:
    return Console(width=output_width(), highlight=False, soft_wrap=False)


def emit(*items) -> None:
    """Print rich renderables (markup strings, tables) fitted to ``output_width()``, without trailing blanks."""
    console = _console()
    with console.capture() as capture:
        for item in items:
            console.print(item)
    sys.stdout.write(_strip_line_ends(capture.get()))
    sys.stdout.flush()


def _strip_line_ends(text: str) -> str:
    """``text`` without the blanks rich pads lines with; the colour codes among them are kept."""
    return _LINE_TAIL.sub(lambda m: "".join(_ANSI_CODE.findall(m.group(0))), text)


def indented(text: str, indent: int = 2, bullet: str = "") -> Padding | Table:
    """``text`` (markup) wrapped with a hanging indent, optionally after a bullet such as "•"."""
    if not bullet:
        return Padding(text, (0, 0, 0, indent))
    grid = Table.grid(padding=(0, 1, 0, 0))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row(" " * indent + bullet, text)
    return grid


@dataclass(frozen=True)
class Col:
    """One column: ``kind`` "num" (right-aligned, never wraps), "key" (left, never wraps) or "text" (wraps)."""

    header: str
    kind: str = "num"


def _cell_width(cell: str) -> int:
    return Text.from_markup(cell).cell_len


def _build(cols: list[Col], rows: list[list[str]], idx: list[int], wrap_headers: bool, show_header: bool) -> Table:
    table = Table(box=box.SIMPLE_HEAVY if show_header else box.SIMPLE, show_header=show_header, show_edge=False,
                  pad_edge=False, collapse_padding=True)
    for i in idx:
        col = cols[i]
        if col.kind == "text":
            table.add_column(col.header, justify="left", overflow="fold")
            continue
        data = max((_cell_width(r[i]) for r in rows), default=0)
        words = max((len(w) for w in col.header.split()), default=0)
        width = max(data, words if wrap_headers else len(col.header))
        header = "\n".join(textwrap.wrap(col.header, width)) if col.header else ""
        table.add_column(header, justify="right" if col.kind == "num" else "left", no_wrap=True, width=width)
    for r in rows:
        table.add_row(*(r[i] for i in idx))
    return table


def _min_width(table: Table) -> int:
    """Width of ``table`` with its text columns wrapped as far as their longest word."""
    console = _console()
    return Measurement.get(console, console.options.update_width(10_000), table).minimum


def _max_width(table: Table) -> int:
    """Width of ``table`` with nothing wrapped."""
    console = _console()
    return Measurement.get(console, console.options.update_width(10_000), table).maximum


def fit_table(cols: list[Col], rows: list[list[str]], keep: int = 1, show_header: bool = True,
              indent: int = TABLE_INDENT) -> list:
    """One table when it fits the output width (one-line headers if possible), else several.

    ``keep``: the leading columns repeated in every part of a split table (they name the row).
    Each table comes indented by ``indent`` columns under its title.
    """
    out: list = []
    for table in _fit(cols, rows, keep, show_header, output_width() - indent):
        out += [""] * bool(out) + [Padding(table, (0, 0, 0, indent))]  # a blank line between the parts of a split
    return out


def _fit(cols: list[Col], rows: list[list[str]], keep: int, show_header: bool, width: int) -> list[Table]:
    every = list(range(len(cols)))
    # prefer, in order: nothing wraps; only headers wrap; only text wraps; both wrap; split the columns
    for wrap_headers, measure in ((False, _max_width), (True, _max_width), (False, _min_width), (True, _min_width)):
        table = _build(cols, rows, every, wrap_headers, show_header)
        if measure(table) <= width:
            return [table]
    rest = every[keep:]
    for measure in (_max_width, _min_width):
        for count in range(2, len(rest) + 1):  # the fewest parts of about equal column counts that fit
            size = math.ceil(len(rest) / count)
            tables = [_build(cols, rows, every[:keep] + rest[j:j + size], True, show_header)
                      for j in range(0, len(rest), size)]
            if all(measure(t) <= width for t in tables):
                return tables
    return [_build(cols, rows, every[:keep] + [i], True, show_header) for i in rest]  # narrower than any pair


__all__ = ["output_width", "emit", "indented", "Col", "fit_table"]
