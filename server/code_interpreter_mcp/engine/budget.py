"""The result budget in numbers: how many characters a tool result may hold, the share of it kept for the text
summary the MCP face writes, how a result is measured, and head-and-tail clipping.

One measure serves every tool: the characters of the result's text plus those of its `structuredContent` as
compact JSON, at about 4 characters a token (`RESULT_BUDGET_TOKENS`). Images are not text: they have their own
caps (count and total bytes) in the settings. The engine shapes `structuredContent` to `structured_room`; the face
keeps its summary within `summary_room` (or, for clients that read only `content`, renders the whole result as
text within `budget_chars`). This module knows the settings; it knows nothing of results, files or MCP.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import Settings

CHARS_PER_TOKEN = 4
SUMMARY_MAX_CHARS = 8000


def budget_chars(settings: Settings) -> int:
    return settings.result_budget_tokens * CHARS_PER_TOKEN


def summary_room(settings: Settings) -> int:
    """Characters the text summary next to `structuredContent` may take."""
    return min(SUMMARY_MAX_CHARS, budget_chars(settings) // 5)


def structured_room(settings: Settings) -> int:
    """Characters `structuredContent` may take, the summary's share set aside."""
    return budget_chars(settings) - summary_room(settings)


def json_chars(value: Any) -> int:
    """The size of a JSON value as it travels (compact, UTF-8 characters not escaped)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))


def clip(text: str, limit: int) -> tuple[str, bool]:
    """Keep the head and the tail (the end of a traceback or a log matters most)."""
    if len(text) <= limit:
        return text, False
    head = limit * 2 // 5
    tail = max(0, limit - head - 60)
    cut = len(text) - head - tail
    return f"{text[:head]}\n…[{cut} characters truncated]…\n{text[-tail:] if tail else ''}", True


def share(parts: dict[str, str], room: int) -> dict[str, int]:
    """How many characters each part may keep: small parts keep everything, large ones split the rest."""
    sizes = {k: len(v) for k, v in parts.items()}
    out = dict.fromkeys(parts, 0)
    remaining, pending = room, sorted(parts, key=lambda k: sizes[k])
    while pending:
        k = pending.pop(0)
        out[k] = min(sizes[k], max(0, remaining) // (len(pending) + 1))
        remaining -= out[k]
    return out


def cap_list(items: list[str], limit: int, what: str) -> list[str]:
    """The first `limit` items, and one line counting the rest."""
    if len(items) <= limit:
        return items
    return [*items[:limit], f"… and {len(items) - limit} more {what}"]
