"""Structured output: everything about `output_schema` that needs no backend and no model.

Modules, one responsibility each:
- `markers`: the per-run nonce, the marker lines (`===BEGIN_JSON <nonce>===` … `===END_JSON <nonce>===`) and the
  text that tells a model to use them;
- `extract`: the last complete marker block of a text, or a whole text as one JSON value, with a real JSON decoder;
- `schema`: schema checking (any draft, never touching the network) and validation into `Violation`s by JSON path;
- `strict`: whether a schema fits OpenAI's strict structured outputs;
- `report`: the `JsonError` a caller sees (no jsonschema: the server builds it from what the guard found);
- `guard`: the processes that run `schema` and `extract` on caller input, with time, size and nesting limits.

This package is the public face: callers write `structured.check_schema(...)`, not the module paths. The names of
`schema` are loaded on first use (PEP 562), so importing this package for markers or the strict check, as the
openai backend does at start-up, does not import jsonschema.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .extract import Extracted, extract_from_sources, extract_last_block, parse_json_text
from .markers import code_prints_block, markers, new_nonce, sentinel_instructions
from .report import MAX_VIOLATIONS, json_error_from
from .strict import is_strict_compatible

if TYPE_CHECKING:
    from .schema import check_schema, json_path, validate

__all__ = [
    "MAX_VIOLATIONS",
    "Extracted",
    "check_schema",
    "code_prints_block",
    "extract_from_sources",
    "extract_last_block",
    "is_strict_compatible",
    "json_error_from",
    "json_path",
    "markers",
    "new_nonce",
    "parse_json_text",
    "sentinel_instructions",
    "validate",
]

_FROM_SCHEMA = frozenset({"check_schema", "json_path", "validate"})


def __getattr__(name: str) -> Any:
    if name in _FROM_SCHEMA:
        value = getattr(importlib.import_module(f"{__name__}.schema"), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
