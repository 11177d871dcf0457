"""A pandas DataFrame as the model and the view read it, INSIDE the sandbox: markdown of its first and last rows
within a fixed size whatever its length, and its first rows as JSON data. Only the rows shown are read.

Loaded by file path at the first DataFrame shown (worker.py hands display.py the loader); stdlib only, the frame
brings pandas with it.
"""

from __future__ import annotations

import math
from typing import Any

TABLE_ROWS = 50
TABLE_COLS = 50
CELL_CHARS = 200  # one table cell's text
MARKDOWN_CHARS = 6000
MARKDOWN_COLS = 20
MARKDOWN_CELL = 40


def _cell(value: object) -> object:
    """A table cell as JSON: numbers stay numbers (NaN and infinities become null), the rest text."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, str):
        return value[:CELL_CHARS]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__ == "numpy":
        try:
            return _cell(item())
        except Exception:
            pass
    iso = getattr(value, "isoformat", None)
    if callable(iso):
        try:
            return str(iso())[:CELL_CHARS]
        except Exception:
            pass
    text = str(value)
    return None if text in ("nan", "NaT", "<NA>") else text[:CELL_CHARS]


def table(df: Any) -> dict[str, object]:
    """The first rows as data: columns, rows, index and the whole shape."""
    n, m = df.shape
    head = df.iloc[:TABLE_ROWS, :TABLE_COLS]
    return {
        "columns": [str(c)[:CELL_CHARS] for c in head.columns],
        "rows": [[_cell(v) for v in row] for row in head.itertuples(index=False, name=None)],
        "index": [_cell(i) for i in head.index],
        "shape": [int(n), int(m)],
        "truncated": n > TABLE_ROWS or m > TABLE_COLS,
    }


def _md(value: object) -> str:
    text = format(value, ".6g") if isinstance(value, float) else str(value)
    text = text.replace("|", "\\|").replace("\n", " ").replace("\r", " ")
    return text if len(text) <= MARKDOWN_CELL else text[: MARKDOWN_CELL - 1] + "…"


def _rows(part: Any, ncols: int, more: bool) -> list[str]:
    lines = []
    values = part.iloc[:, :ncols].itertuples(index=False, name=None)
    for label, row in zip(part.index, values, strict=False):
        cells = [_md(label), *(_md(v) for v in row)] + (["…"] if more else [])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(df: Any, limit: int = MARKDOWN_CHARS) -> str:
    """A markdown table of the first and last rows and at most MARKDOWN_COLS columns, within `limit` characters,
    with the shape under it; fewer rows when the cells are wide."""
    n, m = df.shape
    cols = list(df.columns[:MARKDOWN_COLS])
    more = m > len(cols)
    header = ["", *(_md(c) for c in cols)] + (["…"] if more else [])
    shape = f"{n} rows × {m} columns"
    for shown in (10, 6, 4, 2):
        head_n, tail_n = (n, 0) if n <= shown else ((shown + 1) // 2, shown // 2)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += _rows(df.iloc[:head_n], len(cols), more)
        if tail_n:
            lines.append("| " + " | ".join(["…"] * len(header)) + " |")
            lines += _rows(df.iloc[n - tail_n :], len(cols), more)
        text = "\n".join(lines) + f"\n\n{shape}"
        if len(text) <= limit:
            return text
    return shape
