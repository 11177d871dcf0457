"""The JSON-result markers: the per-run nonce, the marker lines, and the text that tells a model to use them.

Owns the marker format (`===BEGIN_JSON <nonce>===` … `===END_JSON <nonce>===`, or the plain pair without a nonce).
Knows nothing of decoding or schemas beyond quoting one in the instructions; cheap to import (the openai backend
imports it at start-up).
"""

from __future__ import annotations

import json
import secrets
from typing import Any


def new_nonce() -> str:
    """A fresh per-run nonce: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


def markers(nonce: str | None) -> tuple[str, str]:
    """The BEGIN and END marker strings for `nonce`, or the plain ones (local backend) when `nonce` is None."""
    if nonce is None:
        return "===BEGIN_JSON===", "===END_JSON==="
    if not nonce or any(ch.isspace() for ch in nonce) or "=" in nonce:
        raise ValueError("a marker nonce must be a non-empty string without whitespace or '='")
    return f"===BEGIN_JSON {nonce}===", f"===END_JSON {nonce}==="


def code_prints_block(code: str) -> bool:
    """Whether the code prints its own plain marker block (the documented way on both backends): then the model
    need not be asked for one, and the JSON comes from the code's output at no extra model tokens."""
    return markers(None)[0] in code


def sentinel_instructions(nonce: str, schema: dict[str, Any]) -> str:
    """Appended to the model's instructions: answer with the JSON result between the nonce markers.

    Kept short on purpose: it is paid for on every structured run, and the block replaces the usual prose
    answer rather than adding to it.
    """
    begin, end = markers(nonce)
    compact = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    return (
        "Then, instead of prose, write the code's result as JSON matching this schema, every value taken from "
        f"the tool output (never invented): {compact}\n"
        f"Put it alone between these two lines, copied exactly:\n{begin}\n{end}"
    )
