"""Hostile work on caller input: nothing CPU-heavy on the event loop, every limit hit a clear error.

Each case runs against the real server (in-memory MCP client) while a second session's `1+1` is timed; the
guard's processes (`structured/guard.py`) take schema checks and validation off the event loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from code_interpreter_mcp.errors import InvalidSchema
from code_interpreter_mcp.structured.guard import MAX_JSON_DEPTH, Guard, json_depth
from tests.helpers import structured, text_of
from tests.hostile import LATENCY_BOUND_S, hostile_server

pytestmark = pytest.mark.anyio


def doubling_all_of(levels: int) -> dict[str, Any]:
    """A small schema whose validation doubles per level: 2**levels checks of one integer."""
    defs: dict[str, Any] = {"l0": {"type": "integer"}}
    for i in range(1, levels + 1):
        defs[f"l{i}"] = {"allOf": [{"$ref": f"#/$defs/l{i - 1}"}, {"$ref": f"#/$defs/l{i - 1}"}]}
    return {"$defs": defs, "$ref": f"#/$defs/l{levels}"}


BACKTRACKING = {"type": "string", "pattern": "^(a+)+$"}


@pytest.mark.parametrize(
    ("schema", "code"),
    [
        pytest.param(doubling_all_of(30), "1", id="allOf-doubling"),
        pytest.param(BACKTRACKING, "'a' * 40 + '!'", id="backtracking-pattern"),
        pytest.param({"type": "object", "properties": {"x": BACKTRACKING}}, "{'x': 'a' * 36 + '!'}", id="nested"),
    ],
)
async def test_validation_that_never_ends_is_stopped(tmp_path: Path, schema: dict[str, Any], code: str) -> None:
    async with hostile_server(tmp_path, schema_time_limit_s=1.5) as h:
        r, worst = await h.during(lambda: h.call("run_code", {"code": code, "output_schema": schema}))
        s = structured(r)
        assert s["status"] == "ok" and s["json"] is None
        assert "was stopped" in s["json_error"]["message"] and "Simplify the schema" in s["json_error"]["message"]
        assert worst < LATENCY_BOUND_S, worst
        await h.alive()
        # The killed guard process was replaced: the next validation works.
        ok = structured(await h.call("run_code", {"code": "3", "output_schema": {"type": "integer"}}))
        assert ok["json"] == 3 and ok["json_error"] is None


async def test_300000_bad_items_are_counted_only_so_far(tmp_path: Path) -> None:
    async with hostile_server(tmp_path) as h:
        schema = {"type": "array", "items": {"type": "string"}}
        r, worst = await h.during(lambda: h.call("run_code", {"code": "list(range(300_000))", "output_schema": schema}))
        s = structured(r)
        violations = s["json_error"]["violations"]
        assert len(violations) == 51 and "counting stopped at 1000" in violations[-1]["message"]
        assert worst < LATENCY_BOUND_S, worst
        await h.alive()


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 500])
async def test_a_deep_valid_result_keeps_stdout_and_files(tmp_path: Path, depth: int) -> None:
    code = f"print('kept'); open('out.txt', 'w').write('x')\nv = []\nfor _ in range({depth - 1}): v = [v]\nv"
    async with hostile_server(tmp_path) as h:
        r, worst = await h.during(lambda: h.call("run_code", {"code": code, "output_schema": {}}))
        s = structured(r)
        assert s["status"] == "ok" and s["stdout"] == "kept\n" and [f["path"] for f in s["files"]] == ["out.txt"]
        assert s["json"] is None and f"nested {depth} levels deep" in s["json_error"]["message"]
        assert "flatter" in s["json_error"]["message"]
        assert worst < LATENCY_BOUND_S, worst


async def test_a_result_at_the_depth_limit_is_returned(tmp_path: Path) -> None:
    code = f"v = []\nfor _ in range({MAX_JSON_DEPTH - 1}): v = [v]\nv"
    async with hostile_server(tmp_path) as h:
        s = structured(await h.call("run_code", {"code": code, "output_schema": {"type": "array"}}))
        assert s["json_error"] is None and json_depth(s["json"]) == MAX_JSON_DEPTH


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        pytest.param(
            (lambda: [s := {}] and [s := {"items": s} for _ in range(MAX_JSON_DEPTH + 5)][-1])(),
            "levels deep",
            id="too-deep",
        ),
        pytest.param({"type": "strnig"}, "not a valid", id="invalid"),
    ],
)
async def test_schemas_refused_before_any_work(tmp_path: Path, schema: dict[str, Any], expected: str) -> None:
    async with hostile_server(tmp_path) as h:
        r, worst = await h.during(lambda: h.call("run_code", {"code": "1", "output_schema": schema}))
        assert r.is_error and "[invalid_schema]" in text_of(r) and expected in text_of(r)
        assert worst < LATENCY_BOUND_S, worst
        await h.alive()


async def test_harvesting_many_files_does_not_hold_other_sessions(tmp_path: Path) -> None:
    code = "import os\nos.makedirs('many')\nfor i in range(2000): open(f'many/{i}.txt', 'w').write(str(i))"
    async with hostile_server(tmp_path) as h:
        r, worst = await h.during(lambda: h.call("run_code", {"code": code}))
        s = structured(r)
        assert s["status"] == "ok" and len(s["files"]) >= 50
        assert worst < LATENCY_BOUND_S, worst


async def test_guard_unit_limits(tmp_path: Path) -> None:
    guard = Guard(time_limit_s=1.0)
    shared: dict[str, Any] = {"type": "integer"}
    for _ in range(25):
        shared = {"allOf": [shared, shared]}  # small in memory, 2**25 copies as JSON
    try:
        with pytest.raises(InvalidSchema, match="more than 100000"):
            await guard.check_schema(shared)
        with pytest.raises(InvalidSchema, match="not a valid"):
            await guard.check_schema({"type": 3})
        checked = await guard.extract("text", ('"' + "a" * 40 + '!"',), BACKTRACKING)
        assert checked.limited and "longer than 1 s" in (checked.extracted.problem or "")
        fine = await guard.extract("sources", (['===BEGIN_JSON===\n{"a": 1}\n===END_JSON==='], None), {})
        assert fine.extracted.value == {"a": 1} and not fine.violations
    finally:
        await guard.aclose()


async def test_moving_a_big_tree_does_not_hold_other_sessions(tmp_path: Path) -> None:
    """One rename of a directory holding 20,000 entries: its walk is left to a worker thread, not the loop."""
    code = (
        "import os\nfor d in range(20):\n    os.makedirs(f'a/{d}')\n"
        "    for i in range(1000): open(f'a/{d}/{i}', 'w').close()\n"
        "os.rename('a', 'b')\nos.rename('b', 'c')\nlen(os.listdir('c'))"
    )
    async with hostile_server(tmp_path) as h:
        r, worst = await h.during(lambda: h.call("run_code", {"code": code, "wait_s": 300}))
        s = structured(r)
        assert s["status"] == "ok" and s["result"] == "20", s
        assert worst < LATENCY_BOUND_S, worst
        await h.alive()
