"""Extraction of the JSON result: the last complete marker block of a text, or a whole text as one JSON value.

Owns the decoding: a real JSON decoder (any depth; braces and even marker strings inside JSON strings cannot confuse
it, unlike a regex), the rules for which block wins, and the problem messages when none is complete. Knows the
marker format only through `markers`; knows nothing of schemas.

Synchronous and CPU-bound; texts can be megabytes, so async callers run these through `guard` (a process with
a time limit), never on the event loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .markers import markers

_WS_RE = re.compile(r"\s*")
# An opening code fence right after the BEGIN marker (models like to wrap JSON in ```json even when told not to).
_FENCE_OPEN_RE = re.compile(r"```[ \t]*(?:json)?[ \t]*", re.IGNORECASE)
_FENCE_CLOSE = "```"


@dataclass
class Extracted:
    """What extraction found.

    `found` is True only for a complete block (or a fully decoded text); then `value` is the decoded JSON (any JSON
    type; `None` may be a legitimate JSON null) and `raw` its source text. When nothing complete was found, `problem`
    says why (a truncated block, invalid JSON, a missing END marker) and `raw` holds the text after the last BEGIN
    marker, for a repair pass; `problem` is None when there was no marker at all.
    """

    value: Any = None
    raw: str | None = None
    found: bool = False
    problem: str | None = None


class _NonStandardNumber(ValueError):
    """NaN/Infinity: Python's json accepts them, JSON (and every client downstream) does not."""


def _reject_constant(name: str) -> Any:
    raise _NonStandardNumber(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _skip_ws(text: str, pos: int) -> int:
    match = _WS_RE.match(text, pos)
    return match.end() if match else pos


def _line_col(text: str, start: int, pos: int) -> tuple[int, int]:
    """1-based line and column of `pos`, counted from `start` (the beginning of the block)."""
    line = text.count("\n", start, pos) + 1
    last_nl = text.rfind("\n", start, pos)
    col = pos - (last_nl + 1 if last_nl >= 0 else start) + 1
    return line, col


@dataclass
class _DecodeFailure:
    problem: str
    cut_off: bool = False  # the text ends inside the value: everything after `pos` belongs to it


def _decode_at(text: str, pos: int, origin: int) -> tuple[Any, int] | _DecodeFailure:
    """Decode one JSON value starting at `pos`; the value and its end, or why not (positions relative to origin)."""
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        # An unterminated string runs to the end of the text (a raw newline would have failed earlier as a
        # control character), so like an error at the very end it means the text stops inside the value.
        if exc.pos >= len(text) or exc.msg.startswith("Unterminated string"):
            line, col = _line_col(text, origin, len(text))
            return _DecodeFailure(f"the JSON is cut off (the text ends at line {line}, column {col})", cut_off=True)
        line, col = _line_col(text, origin, exc.pos)
        return _DecodeFailure(f"invalid JSON at line {line}, column {col}: {exc.msg}")
    except _NonStandardNumber as exc:
        return _DecodeFailure(f"invalid JSON: {exc}")
    except RecursionError:
        return _DecodeFailure("the JSON is nested too deeply to decode")


@dataclass
class _Attempt:
    """One BEGIN marker's block: either decoded (value, raw, end) or failed (problem, resume)."""

    ok: bool
    value: Any = None
    raw: str | None = None
    problem: str | None = None
    resume: int = 0  # where to look for the next BEGIN marker


def _try_block(text: str, body: int, end_marker: str) -> _Attempt:
    """Decode the block whose content starts at `body` (just after a BEGIN marker)."""
    pos = _skip_ws(text, body)
    fence = _FENCE_OPEN_RE.match(text, pos)
    if fence is not None:
        pos = _skip_ws(text, fence.end())
    if pos >= len(text):
        return _Attempt(ok=False, problem="the block is empty: the text ends right after the BEGIN marker", resume=pos)
    if text.startswith(end_marker, pos):
        return _Attempt(ok=False, problem="the block is empty: no JSON between the markers", resume=pos)

    decoded = _decode_at(text, pos, pos)
    if isinstance(decoded, _DecodeFailure):
        # Cut off: any later BEGIN lies inside this value's strings, so stop. Otherwise nothing decoded and a later
        # BEGIN (even inside this broken text) may start the real block.
        return _Attempt(ok=False, problem=decoded.problem, resume=len(text) if decoded.cut_off else pos)
    value, value_end = decoded

    after = _skip_ws(text, value_end)
    if fence is not None:
        if not text.startswith(_FENCE_CLOSE, after):
            return _Attempt(ok=False, problem="the ``` fence around the JSON is not closed", resume=value_end)
        after = _skip_ws(text, after + len(_FENCE_CLOSE))
    if not text.startswith(end_marker, after):
        what = "the text ends" if after >= len(text) else "other text follows"
        # Markers inside the decoded value lie within JSON strings: they are data, so resume after the value.
        return _Attempt(
            ok=False,
            problem=f"the JSON value is not followed by the END marker ({what} after it)",
            resume=value_end,
        )
    return _Attempt(ok=True, value=value, raw=text[pos:value_end], resume=after + len(end_marker))


def extract_last_block(text: str, nonce: str | None) -> Extracted:
    """The last complete marker block of `text`, decoded.

    Scans BEGIN markers left to right. A block is complete when one JSON value (optionally inside a ```json fence)
    follows its BEGIN marker and the END marker follows the value, modulo whitespace. The END marker is never
    searched for as a plain string: the value is decoded first, so braces and marker strings inside JSON strings are
    just data. After a complete block the scan resumes past its END marker, so a block quoted inside another block's
    strings never counts. With a nonce only that nonce's markers count; with None only the plain ones.
    """
    begin, end = markers(nonce)
    best: _Attempt | None = None
    last_failure: _Attempt | None = None
    last_failure_body = 0
    pos = 0
    while True:
        start = text.find(begin, pos)
        if start < 0:
            break
        body = start + len(begin)
        attempt = _try_block(text, body, end)
        if attempt.ok:
            best = attempt
        else:
            last_failure, last_failure_body = attempt, body
        pos = max(attempt.resume, body)

    if best is not None:
        return Extracted(value=best.value, raw=best.raw, found=True, problem=None)
    if last_failure is not None:
        raw = text[last_failure_body:]
        end_at = raw.rfind(end)
        if end_at >= 0:
            raw = raw[:end_at]
        return Extracted(
            value=None,
            raw=raw.strip() or None,
            found=False,
            problem=f"no complete JSON block: after the last BEGIN_JSON marker, {last_failure.problem}",
        )
    if end in text:
        return Extracted(problem="an END_JSON marker was found without a BEGIN_JSON marker before it")
    return Extracted()


def extract_from_sources(sources: Sequence[str], nonce: str | None) -> Extracted:
    """Search `sources` in the caller's priority order: the first one holding a complete block wins.

    Within a source the last complete block wins (see `extract_last_block`). When no source has a complete block,
    the first source with a problem reports it (its index is named in the message); when none has any marker, the
    result is empty (`found` False, `problem` None).
    """
    first_problem: tuple[int, Extracted] | None = None
    for index, source in enumerate(sources):
        if not source:
            continue
        got = extract_last_block(source, nonce)
        if got.found:
            return got
        if got.problem is not None and first_problem is None:
            first_problem = (index, got)
    if first_problem is None:
        return Extracted()
    index, got = first_problem
    prefix = f"source {index + 1} of {len(sources)}: " if len(sources) > 1 else ""
    return Extracted(value=None, raw=got.raw, found=False, problem=prefix + (got.problem or ""))


def parse_json_text(text: str) -> Extracted:
    """Decode a whole text as one JSON value (single_pass and repair outputs); a ```json fence is allowed."""
    body = text.strip().lstrip("\ufeff").strip()
    if body.startswith(_FENCE_CLOSE):
        fence = _FENCE_OPEN_RE.match(body)
        if fence is not None and body.endswith(_FENCE_CLOSE) and len(body) >= fence.end() + len(_FENCE_CLOSE):
            body = body[fence.end() : len(body) - len(_FENCE_CLOSE)].strip()
    if not body:
        return Extracted(problem="the output is empty: expected a JSON value")
    decoded = _decode_at(body, 0, 0)
    if isinstance(decoded, _DecodeFailure):
        return Extracted(raw=body, problem=decoded.problem)
    value, value_end = decoded
    rest = _skip_ws(body, value_end)
    if rest < len(body):
        line, col = _line_col(body, 0, rest)
        return Extracted(raw=body, problem=f"extra text after the JSON value at line {line}, column {col}")
    return Extracted(value=value, raw=body[:value_end], found=True)
