"""Tests of structured.schema: schema checking offline, validation by JSON path, the compiled-validator cache."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from typing import Any

import pytest

from code_interpreter_mcp.errors import InvalidSchema
from code_interpreter_mcp.models import JsonError, Violation
from code_interpreter_mcp.structured import check_schema, json_error_from, schema, validate


def test_jsonschema_is_imported_only_when_a_schema_is_used() -> None:
    code = (
        "import sys\n"
        "from code_interpreter_mcp import structured\n"
        "import code_interpreter_mcp.backends.openai\n"
        "assert structured.markers(None) and structured.is_strict_compatible({'type': 'object'}) is False\n"
        "assert 'jsonschema' not in sys.modules, 'jsonschema imported at start-up'\n"
        "structured.check_schema({'type': 'object'})\n"
        "assert 'jsonschema' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------------------
# check_schema


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) any attempt to open a connection or resolve a name."""
    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args[:2]))
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts


@pytest.mark.parametrize("schema", [[{"type": "object"}], "object", None, 3])
def test_check_schema_rejects_non_objects(schema: Any) -> None:
    with pytest.raises(InvalidSchema, match="must be a JSON object"):
        check_schema(schema)


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "objekt"}, "$.type"),
        ({"type": "object", "properties": {"a": {"type": 5}}}, "$.properties.a.type"),
        ({"required": "a"}, "$.required"),
        ({"pattern": "(unclosed"}, "$.pattern"),
        ({"$schema": "http://example.com/my-draft", "type": "object"}, "unknown $schema"),
        ({"$schema": 7}, "$schema must be a string"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "does not resolve"),
        ({"const": {1, 2}}, "not plain JSON"),
    ],
)
def test_check_schema_rejects_invalid_schemas(schema: Any, needle: str) -> None:
    with pytest.raises(InvalidSchema) as info:
        check_schema(schema)
    assert needle in info.value.message
    assert info.value.code == "invalid_schema"


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "http://127.0.0.1:9/schema.json"},
        {"type": "object", "properties": {"a": {"$ref": "https://example.com/defs.json#/x"}}},
        {"$schema": "http://json-schema.org/draft-07/schema#", "items": {"$ref": "http://example.com/item.json"}},
        {"$id": "https://example.com/root.json", "properties": {"a": {"$ref": "sibling.json"}}},
        {"properties": {"a": {"$ref": "relative.json"}}},
    ],
)
def test_remote_refs_are_refused_without_network(schema: dict[str, Any], no_network: list[str]) -> None:
    with pytest.raises(InvalidSchema, match="remote references are not fetched"):
        check_schema(schema)
    with pytest.raises(InvalidSchema):
        validate({"a": 1}, schema)
    assert no_network == []


@pytest.mark.parametrize(
    "schema",
    [
        True,
        False,
        {},
        {"$ref": "https://json-schema.org/draft/2020-12/schema"},
        {"$defs": {"pos": {"type": "integer", "minimum": 0}}, "properties": {"n": {"$ref": "#/$defs/pos"}}},
        {
            "$id": "https://example.com/root.json",
            "$defs": {"x": {"$id": "https://example.com/x.json", "type": "integer"}},
            "properties": {"a": {"$ref": "x.json"}},
        },
        {"type": "object", "properties": {"child": {"$ref": "#"}}},
    ],
)
def test_check_schema_accepts_valid_schemas_offline(schema: Any, no_network: list[str]) -> None:
    check_schema(schema)
    assert no_network == []


def test_embedded_resources_and_recursion_validate() -> None:
    schema = {
        "$id": "https://example.com/root.json",
        "$defs": {"x": {"$id": "https://example.com/x.json", "type": "integer"}},
        "properties": {"a": {"$ref": "x.json"}, "child": {"$ref": "#"}},
    }
    assert validate({"a": 1, "child": {"a": 2}}, schema) == []
    assert validate({"a": 1, "child": {"a": "no"}}, schema) == [
        Violation(path="$.child.a", message="'no' is not of type 'integer'")
    ]


# ---------------------------------------------------------------------------------------------------------------------
# validate

ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["name"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "price": {"type": "number", "minimum": 0},
                    "dims": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                },
                "required": ["sku", "price"],
            },
        },
        "odd key": {"type": "boolean"},
    },
    "required": ["customer", "items"],
}


def test_valid_value_has_no_violations() -> None:
    value = {"customer": {"name": "Ann", "tags": ["a"]}, "items": [{"sku": "x", "price": 1.5, "dims": [[1, 2]]}]}
    assert validate(value, ORDER_SCHEMA) == []


def test_violations_are_listed_by_json_path() -> None:
    value = {
        "customer": {"name": 5, "tags": ["ok", 3], "extra": 1},
        "items": [
            {"sku": "a", "price": 1},
            {"sku": "b", "price": 2},
            {"sku": "c", "price": "12.50"},
            {"price": -1, "dims": [[1], [2, "x"]]},
        ],
        "odd key": "yes",
    }
    got = validate(value, ORDER_SCHEMA)
    assert [v.path for v in got] == [
        "$.customer",
        "$.customer.name",
        "$.customer.tags[1]",
        "$.items[2].price",
        "$.items[3]",
        "$.items[3].dims[1][1]",
        "$.items[3].price",
        '$["odd key"]',
    ]
    by_path = {v.path: v.message for v in got}
    assert by_path["$.items[2].price"] == "'12.50' is not of type 'number'"
    assert "'sku' is a required property" in by_path["$.items[3]"]
    assert "Additional properties" in by_path["$.customer"]
    assert "minimum" in by_path["$.items[3].price"]


def test_root_violation_path_is_dollar() -> None:
    assert validate([1], {"type": "object"}) == [Violation(path="$", message="[1] is not of type 'object'")]
    assert validate(1, False) == [Violation(path="$", message="False schema does not allow 1")]
    assert validate({"anything": 1}, True) == []


def test_any_of_reports_the_best_match_inside() -> None:
    schema = {
        "type": "object",
        "properties": {
            "shape": {
                "anyOf": [
                    {"type": "object", "properties": {"r": {"type": "number"}}, "required": ["r"]},
                    {"type": "string"},
                ]
            }
        },
    }
    got = validate({"shape": {"r": "big"}}, schema)
    assert got == [Violation(path="$.shape.r", message="'big' is not of type 'number'")]


def test_many_violations_are_capped_with_a_summary() -> None:
    got = validate(list(range(200)), {"type": "array", "items": {"type": "string"}}, max_violations=10)
    assert len(got) == 11
    assert [v.path for v in got[:10]] == [f"$[{i}]" for i in range(10)]
    assert got[10].path == "$" and "190 more" in got[10].message


def test_long_messages_are_clipped() -> None:
    got = validate({"blob": "x" * 100_000}, {"properties": {"blob": {"type": "integer"}}})
    assert len(got) == 1 and len(got[0].message) <= 300


def test_draft07_and_2020_12_schemas_both_work() -> None:
    draft7 = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {"n": {"type": "integer"}},
        "type": "array",
        "items": [{"$ref": "#/definitions/n"}, {"type": "string"}],
        "additionalItems": False,
    }
    assert validate([1, "a"], draft7) == []
    assert [v.path for v in validate([1, 2], draft7)] == ["$[1]"]
    assert [v.path for v in validate([1, "a", 3], draft7)] == ["$"]

    draft2020 = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": {"n": {"type": "integer"}},
        "type": "array",
        "prefixItems": [{"$ref": "#/$defs/n"}, {"type": "string"}],
        "items": False,
    }
    assert validate([1, "a"], draft2020) == []
    assert [v.path for v in validate([1, 2], draft2020)] == ["$[1]"]
    assert [v.path for v in validate([1, "a", 3], draft2020)] == ["$"]

    # The tuple form of `items` is a draft-07 feature: under 2020-12 (also the default) it is not a valid schema.
    with pytest.raises(InvalidSchema, match="draft 2020-12"):
        check_schema({k: v for k, v in draft7.items() if k != "$schema"})


def test_validators_are_cached_by_canonical_schema() -> None:
    schema._compiled.cache_clear()
    validate({"a": 1}, {"type": "object", "properties": {"a": {"type": "integer"}}})
    validate({"a": 2}, {"properties": {"a": {"type": "integer"}}, "type": "object"})  # same schema, keys reordered
    check_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    info = schema._compiled.cache_info()
    assert info.misses == 1 and info.hits == 2
    assert info.maxsize == 64


def test_validate_raises_on_invalid_schema() -> None:
    with pytest.raises(InvalidSchema):
        validate({}, {"type": "nope"})


def test_json_error_from_problem_and_violations() -> None:
    assert json_error_from("no block") == JsonError(message="no block", violations=[])
    violations = [Violation(path="$.a", message="bad"), Violation(path="$.b", message="worse")]
    err = json_error_from(violations)
    assert err.violations == violations
    assert "2 violations" in err.message
    assert "1 violation)" in json_error_from(violations[:1]).message
