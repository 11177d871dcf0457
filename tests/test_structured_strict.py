"""Tests of structured.strict: which schemas OpenAI's strict structured outputs accept as they are."""

from __future__ import annotations

import json
from typing import Any

import pytest

from code_interpreter_mcp.structured import check_schema, is_strict_compatible

# ---------------------------------------------------------------------------------------------------------------------
# is_strict_compatible

STRICT_OK: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "description": "a title", "pattern": "^[A-Z]"},
        "when": {"type": "string", "format": "date-time"},
        "score": {"type": ["number", "null"], "minimum": 0},
        "kind": {"type": "string", "enum": ["a", "b"]},
        "rows": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"v": {"type": "integer"}, "node": {"$ref": "#/$defs/node"}},
                "required": ["v", "node"],
                "additionalProperties": False,
            },
        },
        "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["title", "when", "score", "kind", "rows", "maybe"],
    "additionalProperties": False,
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["name", "children"],
            "additionalProperties": False,
        }
    },
}


def _with(path: list[str], **changes: Any) -> dict[str, Any]:
    schema = json.loads(json.dumps(STRICT_OK))
    node = schema
    for key in path:
        node = node[key]
    for key, value in changes.items():
        if value is None:
            node.pop(key)
        else:
            node[key] = value
    return schema


def test_strict_compatible_schema() -> None:
    check_schema(STRICT_OK)
    assert is_strict_compatible(STRICT_OK)
    assert is_strict_compatible({"type": "object", "properties": {}, "required": [], "additionalProperties": False})


def _nested_objects(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"c": node}, "required": ["c"], "additionalProperties": False}
    return node


@pytest.mark.parametrize(
    "schema",
    [
        _with([], additionalProperties=None),
        _with(["properties", "rows", "items"], additionalProperties=True),
        _with(["$defs", "node"], additionalProperties=None),
        _with([], required=["title"]),
        _with(["properties", "title"], minLength=1),
        _with(["properties", "when"], format="uri"),
        _with(["properties", "kind"], default="a"),
        _with(["properties", "rows", "items", "properties", "node"], description="a node"),  # $ref with siblings
        _with(["properties", "rows", "items", "properties", "node"], **{"$ref": "https://example.com/n.json"}),
        _with(["properties", "maybe"], anyOf=None, oneOf=[{"type": "string"}, {"type": "null"}]),
        _with(["properties", "score"], type=None),
        _with([], **{"$schema": "https://json-schema.org/draft/2020-12/schema"}),
        {"type": "array", "items": {"type": "string"}},
        {"anyOf": [STRICT_OK, {"type": "null"}]},
        {"type": "object", "properties": {"a": {}}, "required": ["a"], "additionalProperties": False},
        {"type": "object", "properties": {"a": True}, "required": ["a"], "additionalProperties": False},
        _nested_objects(11),
        [STRICT_OK],
        True,
    ],
)
def test_strict_incompatible_schemas(schema: Any) -> None:
    assert not is_strict_compatible(schema)


def test_strict_nesting_limit_is_ten_levels() -> None:
    assert is_strict_compatible(_nested_objects(10))
    assert not is_strict_compatible(_nested_objects(11))
