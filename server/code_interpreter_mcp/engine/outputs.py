"""A run's outputs (what it displayed, in order) as the result carries them, within their share of the budget.

Every output keeps its `text/plain` and its place; the rest goes in by what a reader needs most when room is short:
first each output's markdown (a DataFrame's table as the model reads it), then the table rows (fewer when they do
not fit) and chart data, then the parts only a view renders (HTML, SVG, LaTeX, JSON). A part left out is named
in the output's text/plain. Files named by path become the harvested file's id. Knows the result models and the
registry's file records only.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..models import Output, TableData
from ..sessions import FileRecord
from .budget import json_chars

LEFT_OUT = " [left out for the result budget: {}]"
CHART_DATA = "chart data"  # what a figure whose chart did not fit names as left out
_MODEL_PARTS = ("text/markdown",)


def run_outputs(items: list[dict[str, Any]], records: list[FileRecord], room: int) -> list[Output]:
    """The backend's checked output items as `Output`s whose JSON fits in about `room` characters."""
    by_path = {r.path: r for r in records}
    outs: list[Output] = []
    used = 0
    for item in items:
        plain = str(item.get("data", {}).get("text/plain", ""))
        path = item.get("path")
        record = by_path.get(path) if isinstance(path, str) else None
        out = Output(
            kind=item.get("kind", "display"),
            data={"text/plain": item.get("summary") or plain},
            file_id=record.file_id if record is not None else None,
            path=path if isinstance(path, str) else None,
            stdout_at=item.get("stdout_at"),
        )
        used += json_chars(out.model_dump(mode="json", exclude_none=True))
        outs.append(out)
    left: list[list[str]] = [[] for _ in outs]

    def fits(size: int) -> bool:
        nonlocal used
        if used + size > room:
            return False
        used += size
        return True

    for k, item in enumerate(items):  # what the model reads first
        for mime in _MODEL_PARTS:
            value = item.get("data", {}).get(mime)
            if value is not None:
                if fits(json_chars(value) + len(mime) + 6):
                    outs[k].data[mime] = value
                else:
                    left[k].append(mime)
    for k, item in enumerate(items):  # then the data behind tables and charts
        table = item.get("table")
        if isinstance(table, dict):
            try:
                checked: TableData | None = TableData.model_validate(table)
            except ValidationError:
                checked = None
            while checked is not None and not fits(json_chars(checked.model_dump(mode="json")) + 10):
                checked = _fewer_rows(checked)
            if checked is not None:
                outs[k].table = checked
            else:
                left[k].append("table rows")
        chart = item.get("chart")
        if isinstance(chart, dict):
            if fits(json_chars(chart) + 10):
                outs[k].chart = chart
            else:
                left[k].append(CHART_DATA)
    for k, item in enumerate(items):  # then what only a view renders
        for mime, value in item.get("data", {}).items():
            if mime == "text/plain" or mime in _MODEL_PARTS:
                continue
            if fits(json_chars(value) + len(mime) + 6):
                outs[k].data[mime] = value
            else:
                left[k].append(mime)
    for out, parts in zip(outs, left, strict=True):
        if parts:
            out.data["text/plain"] = str(out.data["text/plain"]) + LEFT_OUT.format(", ".join(parts))
    return outs


def _fewer_rows(table: TableData) -> TableData | None:
    """Half the rows (the first ones), or None when none are left to drop."""
    if not table.rows:
        return None
    keep = len(table.rows) // 2
    index = table.index[:keep] if table.index is not None else None
    return table.model_copy(update={"rows": table.rows[:keep], "index": index, "truncated": True})
