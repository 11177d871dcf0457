"""What a matplotlib figure shows, read from its artists, for a model that cannot see the PNG: runs in the sandbox.

`describe(fig)` gives the figure's type (line, scatter, bar, histogram, pie, box, or "mixed" for several), and
per axes its title, labels, scales, tick labels and elements: line and scatter series with their points, bars
with their labels and heights, a histogram's bins and counts, pie wedges with labels and angles, boxes with their
five numbers and outliers. Long series are sampled evenly to `MAX_POINTS` and say so. `summary(chart)` is the
one line a model's text gets. Duck-typed on matplotlib's classes by name: this module imports nothing of it.
"""

from __future__ import annotations

import math

MAX_POINTS = 200  # per series; more are sampled evenly (first and last kept)
MAX_ELEMENTS = 100  # bars, wedges, boxes or series per axes
MAX_TEXT = 200


def _num(v: object) -> float | int | str | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(v)[:MAX_TEXT]
    if math.isnan(f) or math.isinf(f):
        return None
    return int(f) if f.is_integer() and abs(f) < 2**53 else round(f, 10)


def _text(s: object) -> str:
    return str(s or "")[:MAX_TEXT]


def _sample(xs: list, ys: list, points: int) -> dict[str, object]:
    n = len(xs)
    if n <= points:
        return {"x": [_num(x) for x in xs], "y": [_num(y) for y in ys]}
    idx = sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})
    return {"x": [_num(xs[i]) for i in idx], "y": [_num(ys[i]) for i in idx], "sampled_from": n}


def _label(artist: object) -> str | None:
    label = _text(artist.get_label())  # type: ignore[attr-defined]
    return None if not label or label.startswith("_") else label


def _is_rect_line(line: object) -> bool:
    xs, ys = list(line.get_xdata()), list(line.get_ydata())  # type: ignore[attr-defined]
    return len(xs) == 5 and xs[0] == xs[4] and ys[0] == ys[4] and len(set(xs)) == 2 and len(set(ys)) == 2


def _boxes(lines: list, points: int) -> tuple[list[dict[str, object]], set[int]]:
    """Box plots: per box a closed rectangle, two whiskers, two caps, a median and a fliers line (matplotlib's
    bxp order)."""
    boxes, used = [], set()
    i = 0
    while i + 5 < len(lines):
        if not _is_rect_line(lines[i]):
            i += 1
            continue
        box, wlo, whi, _clo, _chi, med = lines[i : i + 6]
        wx = list(wlo.get_xdata())
        vertical = len(wx) == 2 and wx[0] == wx[1]
        pick = (lambda ln: list(ln.get_ydata())) if vertical else (lambda ln: list(ln.get_xdata()))
        try:
            q = sorted(set(pick(box)))
            low, high = pick(wlo)[1], pick(whi)[1]
            median = pick(med)[0]
        except (IndexError, TypeError):
            i += 1
            continue
        entry: dict[str, object] = {"q1": _num(q[0]), "median": _num(median), "q3": _num(q[-1]),
                                    "whisker_low": _num(low), "whisker_high": _num(high)}  # fmt: skip
        used.update(id(x) for x in lines[i : i + 6])
        j = i + 6
        if j < len(lines) and lines[j].get_linestyle() in ("None", "none", " ", ""):
            entry["outliers"] = [_num(v) for v in pick(lines[j])][:points]
            used.add(id(lines[j]))
            j += 1
        boxes.append(entry)
        i = j
    return boxes, used


def _axes(a: object, points: int) -> dict[str, object]:
    info: dict[str, object] = {
        "title": _text(a.get_title()),  # type: ignore[attr-defined]
        "xlabel": _text(a.get_xlabel()),  # type: ignore[attr-defined]
        "ylabel": _text(a.get_ylabel()),  # type: ignore[attr-defined]
        "xscale": a.get_xscale(),  # type: ignore[attr-defined]
        "yscale": a.get_yscale(),  # type: ignore[attr-defined]
        "xticklabels": [_text(t.get_text()) for t in a.get_xticklabels() if t.get_text()][:MAX_ELEMENTS],  # type: ignore[attr-defined]
        "yticklabels": [_text(t.get_text()) for t in a.get_yticklabels() if t.get_text()][:MAX_ELEMENTS],  # type: ignore[attr-defined]
    }
    kinds: list[str] = []
    lines = list(a.get_lines())  # type: ignore[attr-defined]
    boxes, used = _boxes(lines, points)
    if boxes:
        labels = info["xticklabels"] if isinstance(info["xticklabels"], list) else []
        for k, box in enumerate(boxes):
            if k < len(labels):
                box["label"] = labels[k]
        info["boxes"] = boxes[:MAX_ELEMENTS]
        kinds.append("box")
    series = []
    for line in lines:
        if id(line) in used:
            continue
        xs, ys = list(line.get_xdata()), list(line.get_ydata())
        if not xs:
            continue
        series.append({"label": _label(line), **_sample(xs, ys, points)})
    if series:
        info["series"] = series[:MAX_ELEMENTS]
        kinds.append("line")
    for coll in a.collections:  # type: ignore[attr-defined]
        if type(coll).__name__ != "PathCollection":
            continue
        offsets = coll.get_offsets()
        if len(offsets) == 0:
            continue
        entry = {"label": _label(coll), **_sample([o[0] for o in offsets], [o[1] for o in offsets], points)}
        info.setdefault("scatter", []).append(entry)  # type: ignore[union-attr]
        if "scatter" not in kinds:
            kinds.append("scatter")
    rects, wedges = [], []
    for patch in a.patches:  # type: ignore[attr-defined]
        name = type(patch).__name__
        if name == "Rectangle" and patch.get_visible():
            rects.append(patch)
        elif name == "Wedge":
            wedges.append(patch)
    if wedges:
        texts = [_text(t.get_text()) for t in a.texts]  # type: ignore[attr-defined]
        out = []
        for k, w in enumerate(wedges[:MAX_ELEMENTS]):
            angle = (w.theta2 - w.theta1) % 360 or 360.0
            entry = {"label": _label(w) or (texts[2 * k] if 2 * k < len(texts) else None),
                     "degrees": _num(round(angle, 6)), "fraction": _num(round(angle / 360, 6))}  # fmt: skip
            out.append(entry)
        info["wedges"] = out
        kinds.append("pie")
    if rects:
        hist = _contiguous(rects)
        if hist:
            info["bins"] = [_num(r.get_x()) for r in rects] + [_num(rects[-1].get_x() + rects[-1].get_width())]
            info["counts"] = [_num(r.get_height()) for r in rects]
            kinds.append("histogram")
        else:
            labels = info["xticklabels"] if isinstance(info["xticklabels"], list) else []
            bars = []
            for k, r in enumerate(rects[:MAX_ELEMENTS]):
                bar = {"x": _num(r.get_x() + r.get_width() / 2), "height": _num(r.get_height())}
                label = _label(r) or (labels[k] if k < len(labels) and len(labels) == len(rects) else None)
                if label:
                    bar["label"] = label
                if r.get_y():
                    bar["bottom"] = _num(r.get_y())
                bars.append(bar)
            info["bars"] = bars
            kinds.append("bar")
    info["type"] = kinds[0] if len(kinds) == 1 else ("mixed" if kinds else "empty")
    if len(kinds) > 1:
        info["types"] = kinds
    return info


def _contiguous(rects: list) -> bool:
    """A histogram's bars touch: each starts where the one before ends (bars of a bar chart have gaps)."""
    if len(rects) < 2:
        return False
    return all(
        abs(rects[k].get_x() + rects[k].get_width() - rects[k + 1].get_x()) < 1e-9 * max(1.0, abs(rects[k].get_x()))
        for k in range(len(rects) - 1)
    )


def describe(fig: object, points: int = MAX_POINTS) -> dict[str, object]:
    """The chart a figure shows, per axes, at most `points` per series; its `type` is the one axes' type, or
    "subplots" for several."""
    axes = [_axes(ax, points) for ax in fig.axes[:MAX_ELEMENTS]]  # type: ignore[attr-defined]
    title = ""
    suptitle = getattr(fig, "_suptitle", None)
    if suptitle is not None:
        title = _text(suptitle.get_text())
    kinds = [a["type"] for a in axes if a["type"] != "empty"]
    kind = kinds[0] if len(kinds) == 1 else ("subplots" if kinds else "empty")
    return {"type": kind, "title": title or (axes[0]["title"] if len(axes) == 1 else ""), "axes": axes}


_KIND = {"line": "line chart", "scatter": "scatter plot", "bar": "bar chart", "histogram": "histogram",
         "pie": "pie chart", "box": "box plot", "mixed": "chart"}  # fmt: skip
MAX_JSON = 12_000  # characters of one chart's data in a result; beyond, points are sampled more coarsely


def bounded(fig: object) -> dict[str, object]:
    """`describe` within `MAX_JSON` characters: fewer points per series first, then only the shape of it."""
    import json

    for points in (MAX_POINTS, 50, 10):
        chart = describe(fig, points)
        if len(json.dumps(chart)) <= MAX_JSON:
            return chart
    keep = ("title", "xlabel", "ylabel", "xscale", "yscale", "type", "types")
    chart["axes"] = [{k: a[k] for k in keep if k in a} for a in chart["axes"]]  # type: ignore[union-attr]
    chart["elements_left_out"] = True
    return chart


# What the summary counts, per axes: (key, noun, how many).
_COUNTED = (
    ("series", "series", len),
    ("scatter", "points", lambda v: sum(len(s["x"]) for s in v)),
    ("bars", "bars", len),
    ("counts", "bins", len),
    ("wedges", "wedges", len),
    ("boxes", "boxes", len),
)


def summary(chart: dict[str, object]) -> str:
    """One line: the kind, the title and what it holds, e.g. `line chart "Sales" (2 series, 12 points each)`."""
    axes = chart.get("axes") or []
    parts = []
    for a in axes if isinstance(axes, list) else []:
        kind = a.get("type", "")
        bits = [f"{count(a[key])} {noun}" for key, noun, count in _COUNTED if a.get(key)]
        title = f' "{a["title"]}"' if a.get("title") else ""
        parts.append(f"{_KIND.get(kind, kind)}{title}" + (f" ({', '.join(bits)})" if bits else ""))
    head = f'"{chart["title"]}": ' if chart.get("title") and len(parts) > 1 else ""
    return head + "; ".join(parts) if parts else "an empty figure"
