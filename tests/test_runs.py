"""Runs that outlive the request: wait_s, get_run, cancel_run, session_busy and live output, through a real
in-memory MCP client on the real local backend."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.types import ResourceLink

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.models import RunResult
from tests.helpers import structured, text_of

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", default_timeout_s=60, reaper_interval_s=0.2, interrupt_grace_s=1.0)


@pytest.fixture
async def client(settings: Settings):
    async with Client(build_server(settings), raise_exceptions=True) as c:
        yield c


async def call(client: Client, tool: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
    return structured(await client.call_tool(tool, args, read_timeout_seconds=timeout))


async def test_a_run_longer_than_the_clients_timeout_is_collected_with_get_run(client: Client) -> None:
    code = (
        "import time\nfor i in range(12):\n    print('step', i, flush=True)\n    time.sleep(1)\n"
        "open('out.csv', 'w').write('a,b\\n1,2\\n')\n'finished'"
    )
    started = time.monotonic()
    first = await call(client, "run_code", timeout=5, code=code, wait_s=3)
    assert time.monotonic() - started < 5, "the call must answer before the client's 5 s timeout"
    RunResult.model_validate(first)
    assert first["status"] == "running" and first["run_id"].startswith("r_")
    assert first["elapsed_s"] >= 2.5
    assert "get_run" in first["warnings"][0]
    run_id, sid = first["run_id"], first["session_id"]

    final: dict[str, Any] = first
    while final["status"] == "running":  # each wait stays within the client's timeout
        final = await call(client, "get_run", timeout=5, run_id=run_id, wait_s=3)
    assert final["status"] == "ok", final
    assert final["run_id"] == run_id and final["session_id"] == sid
    assert final["result"] == "'finished'"
    assert "step 11" in final["stdout"]
    assert [f["path"] for f in final["files"]] == ["out.csv"]

    again = await client.call_tool("get_run", {"run_id": run_id})  # kept: the same result, links included
    assert structured(again)["files"] == final["files"]
    assert any(isinstance(c, ResourceLink) for c in again.content)


async def test_running_output_so_far_and_wait_zero(client: Client) -> None:
    r = await call(client, "run_code", code="print('early', flush=True)\nimport time; time.sleep(3)", wait_s=1.5)
    assert r["status"] == "running" and "early" in r["stdout"]
    text = text_of(await client.call_tool("get_run", {"run_id": r["run_id"], "wait_s": 0}))
    assert "still running" in text and r["run_id"] in text
    done = await call(client, "get_run", run_id=r["run_id"], wait_s=10)
    assert done["status"] == "ok" and done["stdout"] == "early\n"


async def test_cancel_run_keeps_the_sessions_variables(client: Client) -> None:
    first = await call(client, "run_code", code="x = 41\nx")
    sid = first["session_id"]
    r = await call(
        client, "run_code", session_id=sid, wait_s=1, code="import time\nwhile True:\n    x += 1\n    time.sleep(0.05)"
    )
    assert r["status"] == "running"
    cancelled = await call(client, "cancel_run", run_id=r["run_id"])
    assert cancelled["status"] == "cancelled", cancelled
    assert cancelled["error"]["type"] == "Cancelled" and "kept" in cancelled["error"]["message"]
    after = await call(client, "run_code", session_id=sid, code="x > 41")
    assert after["status"] == "ok" and after["result"] == "True"
    assert after["container"]["state_lost"] is False
    # The cancelled run's result stays the final one.
    assert (await call(client, "get_run", run_id=r["run_id"]))["status"] == "cancelled"


async def test_a_second_run_queues_and_file_tools_answer_during_a_run(client: Client) -> None:
    # Was test_session_busy_names_the_running_run: a second run now waits its turn instead of session_busy.
    r = await call(client, "run_code", code="import time; time.sleep(4)", wait_s=0)
    assert r["status"] == "running"
    sid, run_id = r["session_id"], r["run_id"]
    queued = await call(client, "run_code", code="1", session_id=sid, wait_s=0)
    assert queued["status"] == "queued" and queued["position"] == 1 and queued["waits_for"] == run_id
    closing = await client.call_tool("close_session", {"session_id": "s_" + "1" * 32})
    assert closing.is_error  # other calls are answered meanwhile
    # File tools answer at once from the last harvest, naming the run in progress.
    started = time.monotonic()
    listed = await call(client, "list_container_files", session_id=sid)
    assert listed["run_in_progress"] == run_id
    missing = await client.call_tool("download_file", {"file": "x.txt", "session_id": sid})
    assert missing.is_error and "[session_busy]" not in text_of(missing)
    uploading = await client.call_tool("upload_file", {"name": "u.txt", "content_base64": "aGk=", "session_id": sid})
    assert uploading.is_error and "[session_busy]" in text_of(uploading) and run_id in text_of(uploading)
    assert time.monotonic() - started < 2
    await call(client, "get_run", run_id=run_id, wait_s=10)
    assert (await call(client, "get_run", run_id=queued["run_id"], wait_s=10))["result"] == "1"
    assert (await call(client, "run_code", code="3", session_id=sid))["status"] == "ok"


async def test_unknown_and_foreign_runs_are_not_found(client: Client) -> None:
    for args in ({"run_id": "r_" + "0" * 32}, {"run_id": "nonsense"}):
        r = await client.call_tool("get_run", args)
        assert r.is_error and "[not_found]" in text_of(r)
    r = await call(client, "run_code", code="1", wait_s=5)
    assert r["status"] == "ok" and r["run_id"]
    wrong = await client.call_tool("get_run", {"run_id": r["run_id"], "session_id": "s_" + "1" * 32})
    assert wrong.is_error and "[not_found]" in text_of(wrong)
    bad = await client.call_tool("run_code", {"code": "1", "wait_s": 10_000})
    assert bad.is_error and "wait_s" in text_of(bad)


async def test_printed_lines_arrive_in_progress_messages_before_the_run_ends(client: Client) -> None:
    messages: list[tuple[float, str]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append((time.monotonic(), message or ""))

    code = "import time\nfor i in range(6):\n    print(f'line {i}', flush=True)\n    time.sleep(0.5)"
    started = time.monotonic()
    result = await client.call_tool("run_code", {"code": code}, progress_callback=on_progress)
    ended = time.monotonic()
    assert structured(result)["status"] == "ok"
    seen = {m for _, m in messages}
    assert any("line 0" in m for m in seen), messages
    first_line = min(t for t, m in messages if "line 0" in m)
    assert first_line - started < ended - started - 1.0, "line 0 must be shown while the run still goes"
    assert any("line 4" in m for m in seen)
    # Rate-limited: a few a second at most.
    assert len(messages) <= (ended - started) * 4 + 2


async def test_close_session_stops_its_run(client: Client) -> None:
    r = await call(client, "run_code", code="import time; time.sleep(30)", wait_s=0.5)
    started = time.monotonic()
    closed = await call(client, "close_session", session_id=r["session_id"])
    assert closed["closed"] is True and time.monotonic() - started < 10
    gone = await client.call_tool("get_run", {"run_id": r["run_id"]})
    assert gone.is_error and "[not_found]" in text_of(gone)


async def test_a_run_keeps_going_when_the_request_is_abandoned(client: Client) -> None:
    r = await call(client, "run_code", code="print('a', flush=True)", wait_s=5)
    assert r["status"] == "ok"
    with anyio.move_on_after(1):
        await client.call_tool(
            "run_code", {"code": "import time; time.sleep(2); 'kept'", "session_id": r["session_id"]}
        )
    await anyio.sleep(0.2)
    # In memory no notifications/cancelled is sent, so the abandoned call's run goes on; the next one queues.
    queued = await call(client, "run_code", code="1", session_id=r["session_id"], wait_s=0)
    assert queued["status"] == "queued"
    done = await call(client, "get_run", run_id=queued["waits_for"], wait_s=10)
    assert done["status"] == "ok" and done["result"] == "'kept'"
