"""Tests of structured.markers and structured.extract: nonce, markers, instructions, extraction of JSON blocks."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from code_interpreter_mcp.structured import (
    Extracted,
    extract_from_sources,
    extract_last_block,
    markers,
    new_nonce,
    parse_json_text,
    sentinel_instructions,
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
