"""Acceptance of sentinel-validated JSON: run_code with output_schema through a real MCP client.

openai backend (on the in-process API emulator): two_pass_sentinel is ONE model call on the happy path, single_pass
still returns files although annotations are dropped under text.format, a repair pass fixes a missing or invalid
block (or fails with violations by path), an invalid schema is refused before anything runs, and the markers carry a
per-run nonce that user data cannot imitate. local backend: the two ways of giving the JSON through the CLI.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.emulator import Emulator, Recorded
from tests.helpers import emulator_client, text_of
from tests.helpers import structured as sc

pytestmark = pytest.mark.anyio

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"total": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["total"],
}
NONCE_RE = re.compile(r"===BEGIN_JSON ([0-9a-f]{32})===")


@pytest.fixture
async def client(emu: Emulator, tmp_path: Path) -> AsyncIterator[Client]:
    async with emulator_client(emu, tmp_path) as c:
        yield c


async def run(client: Client, code: str, **kw: Any) -> dict[str, Any]:
    r = await client.call_tool("run_code", {"code": code, "output_schema": SCHEMA, **kw})
    assert not r.is_error, text_of(r)
    return sc(r)


def response_requests(emu: Emulator) -> list[Recorded]:
    return [r for r in emu.requests if r.kind == "responses"]


# ----- two_pass_sentinel -----------------------------------------------------------------------------------------


async def test_sentinel_happy_path_is_one_model_call(emu: Emulator, client: Client) -> None:
    code = (
        "open('/mnt/data/items.csv', 'w').write('n\\n3\\n4\\n')\n"
        "rows = [3, 4]\n{'total': sum(rows), 'tags': ['a', 'b']}"
    )
    before = emu.calls["responses"]
    s = await run(client, code)
    assert emu.calls["responses"] - before == 1  # no second model call on the happy path
    assert s["json"] == {"total": 7, "tags": ["a", "b"]} and s["json_error"] is None
    st = s["structured"]
    assert st["strategy"] == "two_pass_sentinel" and st["path"] == "sentinel" and st["model_calls"] == 1
    assert s["model_calls"] == 1
    # Usage is reported, once, and the structured figure is the run's.
    assert st["usage"]["total_tokens"] > 0 and st["usage"] == s["usage"]
    assert s["usage"]["total_tokens"] == s["usage"]["input_tokens"] + s["usage"]["output_tokens"]
    # Files still come back under structured output (pass 1 has no text.format, so citations survive too).
    assert [f["path"] for f in s["files"]] == ["items.csv"]
    assert s["files"][0]["sha256"] == hashlib.sha256(b"n\n3\n4\n").hexdigest()
    assert "ci://sessions/" in s["text"]
    # The request: no text.format, and instructions naming the markers with this run's nonce.
    (req,) = response_requests(emu)[-1:]
    assert "text" not in req.json
    nonces = set(NONCE_RE.findall(req.json["instructions"]))
    assert len(nonces) == 1
    nonce = nonces.pop()
    assert f"===END_JSON {nonce}===" in req.json["instructions"]
    assert f"===BEGIN_JSON {nonce}===" in s["text"]  # the model answered with the same nonce
    assert "json: valid" in text_of(
        await client.call_tool("run_code", {"code": "{'total': 1}", "output_schema": SCHEMA})
    )
    # Each run has its own nonce.
    second = NONCE_RE.findall(response_requests(emu)[-1].json["instructions"])
    assert second and second[0] != nonce


async def test_plain_or_foreign_markers_in_user_data_do_not_collide(emu: Emulator, client: Client) -> None:
    # Data that merely contains markers (the code does not spell them: it prints what it read).
    user_blocks = (
        "m = '==='\nprint(m + 'BEGIN_JSON' + m)\nprint('{\"total\": 999}')\nprint(m + 'END_JSON' + m)\n"
        "print(m + 'BEGIN_JSON 0123456789abcdef0123456789abcdef' + m)\nprint('{\"total\": 998}')\n"
        "print(m + 'END_JSON 0123456789abcdef0123456789abcdef' + m)\n"
    )
    # The model's nonce block wins over user blocks printed in the output.
    s = await run(client, user_blocks + "{'total': 5}")
    assert s["json"] == {"total": 5} and s["structured"]["path"] == "sentinel"
    # A model answer that quotes only the user's blocks has no result: they are not taken as one. The repair pass
    # runs instead (here it answers 6), so a collision would show as path "sentinel" with 999 or 998.
    emu.behaviour.model_text = (
        'The code printed:\n===BEGIN_JSON===\n{"total": 999}\n===END_JSON===\n'
        '===BEGIN_JSON 0123456789abcdef0123456789abcdef===\n{"total": 998}\n'
        "===END_JSON 0123456789abcdef0123456789abcdef===\n"
    )
    emu.behaviour.repair_text = '{"total": 6}'
    before = emu.calls["responses"]
    quoted = await run(client, user_blocks + "None")
    assert quoted["json"] == {"total": 6} and quoted["structured"]["path"] == "repair"
    assert quoted["structured"]["model_calls"] == 2 and emu.calls["responses"] - before == 2


async def test_code_that_prints_its_own_block_costs_no_extra_tokens(emu: Emulator, client: Client) -> None:
    code = (
        "import json\nprint('work done')\nprint('===BEGIN_JSON===')\nprint(json.dumps({'total': 41}))\n"
        "print('===END_JSON===')"
    )
    plain = await client.call_tool("run_code", {"code": code})
    before = emu.calls["responses"]
    s = await run(client, code)
    assert s["json"] == {"total": 41} and s["structured"]["path"] == "sentinel"
    assert s["model_calls"] == 1 and emu.calls["responses"] - before == 1
    # The model was not asked for a block of its own, so the run costs what a plain run costs.
    assert not NONCE_RE.search(response_requests(emu)[-1].json["instructions"])
    assert s["usage"]["total_tokens"] == sc(plain)["usage"]["total_tokens"]
    # An invalid printed block still goes to the one repair pass.
    emu.behaviour.repair_text = '{"total": 40}'
    bad = await run(client, code.replace("41", "'forty'"))
    assert bad["json"] == {"total": 40} and bad["structured"]["path"] == "repair"


# ----- single_pass -----------------------------------------------------------------------------------------------


async def test_single_pass_drops_annotations_but_files_still_come_back(emu: Emulator, client: Client) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    code = f"open('/mnt/data/plot.png', 'wb').write({png!r})\nopen('/mnt/data/t.txt', 'w').write('t')\n{{'total': 3}}"
    before = emu.calls["responses"]
    s = await run(client, code, json_strategy="single_pass")
    assert emu.calls["responses"] - before == 1
    assert s["json"] == {"total": 3} and s["structured"]["path"] == "single_pass"
    assert s["structured"]["strategy"] == "single_pass" and s["structured"]["model_calls"] == 1
    fmt = response_requests(emu)[-1].json["text"]["format"]
    assert fmt["type"] == "json_schema" and fmt["schema"] == SCHEMA
    # The answer is bare JSON without a single citation, yet both files are harvested from the container's list.
    assert json.loads(s["text"]) == {"total": 3}
    files = {f["path"]: f for f in s["files"]}
    assert set(files) == {"plot.png", "t.txt"}
    assert files["plot.png"]["sha256"] == hashlib.sha256(png).hexdigest()
    assert files["plot.png"]["mime_type"] == "image/png"


async def test_single_pass_as_the_configured_strategy(emu: Emulator, tmp_path: Path) -> None:
    async with emulator_client(emu, tmp_path, structured_strategy="single_pass") as client:
        s = await run(client, "{'total': 11}")
        assert s["json"] == {"total": 11} and s["structured"]["path"] == "single_pass"
        assert "text" in response_requests(emu)[-1].json


# ----- repair ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("broken", ["missing", "invalid"])
async def test_repair_succeeds(emu: Emulator, client: Client, broken: str) -> None:
    if broken == "missing":
        emu.behaviour.model_text = "I ran the code and got a total."  # no marker block at all
    else:
        emu.behaviour.sentinel_json = '{"total": "seven"}'  # a block that breaks the schema
    emu.behaviour.repair_text = '{"total": 7}'
    before = emu.calls["responses"]
    s = await run(client, "open('/mnt/data/r.txt', 'w').write('r')\nprint('total is 7')")
    assert s["json"] == {"total": 7} and s["json_error"] is None
    assert s["structured"]["path"] == "repair" and s["structured"]["model_calls"] == 2 and s["model_calls"] == 2
    assert emu.calls["responses"] - before == 2
    assert s["stdout"].startswith("total is 7") and [f["path"] for f in s["files"]] == ["r.txt"]
    repair = response_requests(emu)[-1].json
    assert repair["tools"] == [] and repair["text"]["format"]["schema"] == SCHEMA
    if broken == "invalid":
        assert '{"total": "seven"}' in repair["input"] and "$.total" in repair["input"]
    assert s["usage"]["total_tokens"] > 0 and s["structured"]["usage"] == s["usage"]


async def test_repair_failing_reports_violations_and_keeps_everything_else(emu: Emulator, client: Client) -> None:
    emu.behaviour.sentinel_json = '{"total": "many", "tags": [1]}'
    emu.behaviour.repair_text = '{"total": "still many", "tags": [2]}'
    r = await client.call_tool(
        "run_code", {"code": "open('/mnt/data/k.txt', 'w').write('k')\nprint('out')", "output_schema": SCHEMA}
    )
    s = sc(r)
    assert not r.is_error and s["status"] == "ok"  # the code ran fine; only its JSON is wrong
    assert s["json"] is None
    assert {v["path"] for v in s["json_error"]["violations"]} == {"$.total", "$.tags[0]"}
    assert s["structured"]["path"] == "repair" and s["structured"]["model_calls"] == 2
    assert s["stdout"] == "out\n" and [f["path"] for f in s["files"]] == ["k.txt"]
    assert "json_error" in text_of(r) and "$.tags[0]" in text_of(r)
    # A repair answer that is not JSON at all is a clear message too.
    emu.behaviour.repair_text = "Sorry, I cannot."
    s2 = sc(await client.call_tool("run_code", {"code": "print('again')", "output_schema": SCHEMA}))
    assert s2["json"] is None and s2["json_error"]["message"] and s2["json_error"]["violations"] == []
    assert s2["stdout"] == "again\n"


async def test_a_run_that_raised_gets_no_invented_json(emu: Emulator, client: Client) -> None:
    """BUG (engine/json_result.py, resolve_json): when the code raised and the model's answer has no JSON
    block, the engine still makes the repair call, with "Raw output: The code raised an error..." and no data. A
    real model under strict structured outputs must then answer schema-valid JSON, i.e. invent it (the emulator's
    repair_text below plays that model), and the result carries that invented JSON as valid. Suggested fix: repair
    only when there is something to repair: add `and (outcome.status == "ok" or extracted.raw is not None)` to that
    condition (a run that raised keeps its repair only for a block that was found but broken); otherwise json stays
    null with the json_error."""
    emu.behaviour.repair_text = '{"total": 42}'
    r = await client.call_tool("run_code", {"code": "rows = []\n1 / len(rows)", "output_schema": SCHEMA})
    s = sc(r)
    assert s["status"] == "error" and s["error"]["type"] == "ZeroDivisionError"
    assert s["json"] is None and s["json_error"] is not None
    assert s["model_calls"] == 1


async def test_invalid_schema_is_refused_before_anything_runs(emu: Emulator, client: Client) -> None:
    bad = {"type": "object", "properties": {"total": {"type": "no-such-type"}}}
    r = await client.call_tool("run_code", {"code": "open('/mnt/data/x', 'w').write('x')", "output_schema": bad})
    assert r.is_error and re.search(r"\[invalid_schema\] .+ Hint: ", text_of(r))
    assert sum(emu.calls.values()) == 0 and emu.containers == {}  # no model call, no container
    s = await run(client, "{'total': 1}")  # a session with a container: still nothing runs for a bad schema
    calls = dict(emu.calls)
    r = await client.call_tool(
        "run_code", {"code": "print('no')", "output_schema": {"required": "total"}, "session_id": s["session_id"]}
    )
    assert r.is_error and "invalid_schema" in text_of(r) and dict(emu.calls) == calls


# ----- local backend through the CLI -----------------------------------------------------------------------------


async def cli_run(tmp_path: Path, code: str, name: str) -> tuple[int, dict[str, Any]]:
    source = tmp_path / f"{name}.py"
    source.write_text(code)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    proc = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "code_interpreter_mcp",
            "run",
            str(source),
            "--schema",
            str(schema),
            "--backend",
            "local",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout)


async def test_cli_local_last_expression_and_printed_block(tmp_path: Path) -> None:
    rc, out = await cli_run(tmp_path, "data = {'total': 6, 'tags': ['x']}\ndata\n", "last")
    assert rc == 0 and out["backend"] == "local"
    assert out["json"] == {"total": 6, "tags": ["x"]} and out["json_error"] is None
    assert out["structured"] == {"strategy": "local", "path": "last_expression", "model_calls": 0, "usage": None}
    printed = (
        "import json\nprint('noise')\nprint('===BEGIN_JSON===')\nprint(json.dumps({'total': 8}))\n"
        "print('===END_JSON===')\nx = 1\n"
    )
    rc, out = await cli_run(tmp_path, printed, "printed")
    assert rc == 0 and out["json"] == {"total": 8} and out["structured"]["path"] == "sentinel"
    assert out["stdout"].startswith("noise\n")


async def test_cli_local_invalid_json_exits_1_with_json_error(tmp_path: Path) -> None:
    rc, out = await cli_run(tmp_path, "{'total': 'many', 'tags': [1]}\n", "invalid")
    assert rc == 1 and out["status"] == "ok" and out["json"] is None
    assert {v["path"] for v in out["json_error"]["violations"]} == {"$.total", "$.tags[0]"}
    rc, out = await cli_run(tmp_path, "x = 1\n", "missing")
    assert rc == 1 and out["json"] is None and "BEGIN_JSON" in out["json_error"]["message"]
