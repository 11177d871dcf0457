"""Tests of structured.py: markers, extraction of JSON blocks, schema checking, validation, strict compatibility."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from typing import Any

import pytest

from code_interpreter_mcp import structured
from code_interpreter_mcp.errors import InvalidSchema
from code_interpreter_mcp.models import JsonError, Violation
from code_interpreter_mcp.structured import (
    Extracted,
    check_schema,
    extract_from_sources,
    extract_last_block,
    is_strict_compatible,
    json_error_from,
    markers,
    new_nonce,
    parse_json_text,
    sentinel_instructions,
    validate,
)

NONCE = "0123456789abcdef0123456789abcdef"
BEGIN, END = markers(NONCE)
PLAIN_BEGIN, PLAIN_END = markers(None)


def block(value_text: str, nonce: str | None = NONCE) -> str:
    begin, end = markers(nonce)
    return f"{begin}\n{value_text}\n{end}"


# ---------------------------------------------------------------------------------------------------------------------
# nonce, markers, instructions


def test_new_nonce_is_128_bit_hex_and_fresh() -> None:
    nonces = {new_nonce() for _ in range(50)}
    assert len(nonces) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", n) for n in nonces)


def test_markers_plain_and_with_nonce() -> None:
    assert markers(None) == ("===BEGIN_JSON===", "===END_JSON===")
    assert markers("abc") == ("===BEGIN_JSON abc===", "===END_JSON abc===")
    for bad in ("", "a b", "a=b"):
        with pytest.raises(ValueError):
            markers(bad)


def test_sentinel_instructions_name_the_markers_and_the_compact_schema() -> None:
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    text = sentinel_instructions(NONCE, schema)
    assert f"\n{BEGIN}\n{END}" in text
    assert json.dumps(schema, separators=(",", ":")) in text
    assert "never invented" in text
    assert "alone between" in text
    assert len(text) - len(json.dumps(schema, separators=(",", ":"))) < 320  # paid on every structured run


# ---------------------------------------------------------------------------------------------------------------------
# extract_last_block


def test_nested_objects_ten_levels_deep() -> None:
    value: Any = {"leaf": [1, {"x": "y"}]}
    for level in range(10):
        value = {f"level{level}": value, "n": level}
    got = extract_last_block(f"Here you go.\n{block(json.dumps(value, indent=2))}\n", NONCE)
    assert got.found and got.problem is None
    assert got.value == value
    assert json.loads(got.raw or "") == value


def test_any_depth_and_wide_objects() -> None:
    deep: Any = "bottom"
    for _ in range(200):
        deep = {"d": [deep]}
    wide = {f"k{i}": {"inner": {"a": i}} for i in range(50)}  # more inner objects than ostruct's regex allowed
    got = extract_last_block(block(json.dumps({"deep": deep, "wide": wide})), NONCE)
    assert got.found
    assert got.value == {"deep": deep, "wide": wide}


def test_braces_and_markers_inside_json_strings() -> None:
    value = {
        "braces": "}{ }} {{ ] [ ",
        "plain": f"{PLAIN_BEGIN} {{}} {PLAIN_END}",
        "nonce_end": f"{END} trailing",
        "nonce_fake_block": f"{BEGIN} 1 {END}",
        "nested": {"s": f"{END}\n}}"},
    }
    text = f"intro {block(json.dumps(value))} outro"
    got = extract_last_block(text, NONCE)
    assert got.found
    assert got.value == value
    # The same with plain markers: the plain and the nonce markers inside the strings are just data.
    plain = extract_last_block(f"intro {block(json.dumps(value), None)} outro", None)
    assert plain.found and plain.value == value


def test_a_block_quoted_inside_the_last_block_does_not_win() -> None:
    inner = {"inner": True}
    outer = {"quoted": f"{BEGIN}\n{json.dumps(inner)}\n{END}", "outer": True}
    got = extract_last_block(f"{block('{}')}\n{block(json.dumps(outer))}", NONCE)
    assert got.value == outer


def test_two_blocks_last_wins() -> None:
    text = "draft:\n" + block('{"v": 1}') + "\nfinal:\n" + block('{"v": 2}') + "\n"
    assert extract_last_block(text, NONCE).value == {"v": 2}


def test_truncated_block_without_end_marker() -> None:
    got = extract_last_block(f'answer {BEGIN}\n{{"a": [1, 2', NONCE)
    assert not got.found
    assert got.value is None
    assert got.problem is not None and "cut off" in got.problem
    assert got.raw == '{"a": [1, 2'


def test_decoded_value_without_end_marker_is_a_problem() -> None:
    got = extract_last_block(f'{BEGIN}\n{{"a": 1}}\nand then prose', NONCE)
    assert not got.found
    assert got.problem is not None and "END marker" in got.problem


def test_undecodable_json_reports_line_and_column() -> None:
    got = extract_last_block(block('{\n  "a": 1,\n}'), NONCE)
    assert not got.found
    assert got.problem is not None
    assert "invalid JSON at line 3, column 1" in got.problem
    assert got.raw == '{\n  "a": 1,\n}'


def test_complete_block_beats_a_later_truncated_one() -> None:
    text = block('{"ok": true}') + f'\n{BEGIN}\n{{"ok": fal'
    got = extract_last_block(text, NONCE)
    assert got.found and got.value == {"ok": True}


def test_broken_block_followed_by_a_good_one() -> None:
    text = f'{BEGIN}\n{{"a": 1,,}}\n{END}\nretry:\n' + block('{"a": 2}')
    assert extract_last_block(text, NONCE).value == {"a": 2}


def test_empty_block_and_missing_marker_cases() -> None:
    assert extract_last_block(f"{BEGIN}\n\n{END}", NONCE).problem is not None
    assert extract_last_block(f"text {BEGIN}", NONCE).problem is not None
    none = extract_last_block('no markers here {"a": 1}', NONCE)
    assert none == Extracted(value=None, raw=None, found=False, problem=None)
    orphan = extract_last_block(f'{{"a": 1}}\n{END}', NONCE)
    assert not orphan.found and orphan.problem is not None and "without a BEGIN" in orphan.problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[1, {"a": [2]}]', [1, {"a": [2]}]),
        ("42", 42),
        ("-1.5e3", -1500.0),
        ('"just a string with } and {"', "just a string with } and {"),
        ("true", True),
        ("null", None),
    ],
)
def test_non_object_json_values(text: str, expected: Any) -> None:
    got = extract_last_block(block(text), NONCE)
    assert got.found
    assert got.value == expected
    assert got.raw == text


def test_nan_and_infinity_are_not_json() -> None:
    got = extract_last_block(block('{"x": NaN}'), NONCE)
    assert not got.found and got.problem is not None and "NaN" in got.problem


@pytest.mark.parametrize(
    "inner",
    [
        '```json\n{"a": 1}\n```',
        '```JSON\r\n{"a": 1}\r\n```',
        '```\n{"a": 1}\n```',
        '```json {"a": 1} ```',
    ],
)
def test_json_fence_inside_the_markers(inner: str) -> None:
    got = extract_last_block(f"{BEGIN}\n{inner}\n{END}", NONCE)
    assert got.found and got.value == {"a": 1}
    assert got.raw == '{"a": 1}'


def test_unclosed_fence_is_a_problem() -> None:
    got = extract_last_block(f'{BEGIN}\n```json\n{{"a": 1}}\n{END}', NONCE)
    assert not got.found and got.problem is not None and "fence" in got.problem


def test_markers_outside_a_fence_work() -> None:
    text = f'```\n{BEGIN}\n{{"a": 1}}\n{END}\n```'
    assert extract_last_block(text, NONCE).value == {"a": 1}


def test_blocks_with_other_or_no_nonce_are_ignored() -> None:
    other = "f" * 32
    text = "\n".join([block('{"mine": 1}'), block('{"other": 2}', other), block('{"plain": 3}', None)])
    assert extract_last_block(text, NONCE).value == {"mine": 1}
    assert extract_last_block(text, other).value == {"other": 2}
    assert extract_last_block(text, None).value == {"plain": 3}
    # A BEGIN with our nonce closed by another nonce's END is not complete.
    mixed = f'{BEGIN}\n{{"a": 1}}\n{markers(other)[1]}'
    assert not extract_last_block(mixed, NONCE).found
    # A truncated block of another nonce is not our problem.
    assert extract_last_block(f'{markers(other)[0]}\n{{"a"', NONCE).problem is None


@pytest.mark.parametrize(
    "template",
    [
        '{b}{{"a":1}}{e}',
        '{b} {{"a":1}} {e}',
        '{b}\n{{"a":1}}\n{e}',
        '{b}\r\n{{\r\n  "a": 1\r\n}}\r\n{e}\r\n',
        '{b}\n\n\t  {{"a":\n1}}  \n\n\t{e}',
        'Result:{b}\n{{"a":1}}\n{e}Done.',
    ],
)
def test_whitespace_and_newline_variants(template: str) -> None:
    got = extract_last_block(template.format(b=BEGIN, e=END), NONCE)
    assert got.found and got.value == {"a": 1}


# ---------------------------------------------------------------------------------------------------------------------
# extract_from_sources


def test_extract_from_sources_first_source_with_a_complete_block_wins() -> None:
    text = "model text " + block('{"from": "text"}')
    logs = block('{"from": "logs"}')
    assert extract_from_sources([text, logs], NONCE).value == {"from": "text"}
    assert extract_from_sources([logs, text], NONCE).value == {"from": "logs"}


def test_extract_from_sources_skips_sources_without_a_complete_block() -> None:
    truncated = f'{BEGIN}\n{{"from": "trunc'
    good = block('{"from": "good"}')
    assert extract_from_sources(["", "no markers", truncated, good], NONCE).value == {"from": "good"}


def test_extract_from_sources_reports_the_first_problem() -> None:
    first = f"{BEGIN}\n[1, 2"
    second = f"{BEGIN}\n{{bad}}\n{END}"
    got = extract_from_sources(["nothing", first, second], NONCE)
    assert not got.found
    assert got.problem is not None and got.problem.startswith("source 2 of 3:") and "cut off" in got.problem
    assert got.raw == "[1, 2"
    assert extract_from_sources([], NONCE) == Extracted()
    assert extract_from_sources(["a", "b"], NONCE) == Extracted()


# ---------------------------------------------------------------------------------------------------------------------
# parse_json_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": [1, {"b": null}]}', {"a": [1, {"b": None}]}),
        ('  \n {"a": 1} \n ', {"a": 1}),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ("```\n[1, 2]\n```", [1, 2]),
        ("\ufeff7", 7),
    ],
)
def test_parse_json_text_accepts(text: str, expected: Any) -> None:
    got = parse_json_text(text)
    assert got.found and got.problem is None
    assert got.value == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ('{"a": 1} trailing', "extra text"),
        ('{"a": }', "invalid JSON"),
        ('{"a": 1', "cut off"),
        ("Infinity", "Infinity"),
    ],
)
def test_parse_json_text_rejects(text: str, needle: str) -> None:
    got = parse_json_text(text)
    assert not got.found
    assert got.problem is not None and needle in got.problem


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
    structured._compiled.cache_clear()
    validate({"a": 1}, {"type": "object", "properties": {"a": {"type": "integer"}}})
    validate({"a": 2}, {"properties": {"a": {"type": "integer"}}, "type": "object"})  # same schema, keys reordered
    check_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    info = structured._compiled.cache_info()
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


# ---------------------------------------------------------------------------------------------------------------------
# big payloads


def test_big_payload_extracts_quickly() -> None:
    rows = [{"id": i, "label": f"row {{{i}}} {BEGIN} {END}", "vals": [i, i / 2, None, True]} for i in range(12_000)]
    payload = json.dumps({"rows": rows})
    assert len(payload) > 1_000_000
    text = "chatter " * 5000 + block(payload) + "\nbye"

    start = time.perf_counter()
    got = extract_last_block(text, NONCE)
    elapsed = time.perf_counter() - start
    assert got.found and got.value == {"rows": rows}
    assert elapsed < 5.0  # about 0.05 s measured; the bound only catches quadratic rescans of the marker strings

    # A truncated copy of the same payload, full of marker strings inside JSON strings, fails quickly too.
    start = time.perf_counter()
    cut = extract_last_block(text[: len(text) // 2], NONCE)
    assert not cut.found and cut.problem is not None
    assert time.perf_counter() - start < 5.0
