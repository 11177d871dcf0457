"""A client's cancel of a call that waits for a run, against the real server over stdio (hand-written JSON-RPC
lines, so the exact `notifications/cancelled` of each SDK is sent): a cancel that is not a timeout interrupts the
run (variables kept), the TypeScript SDK's timeout text keeps it for get_run, a cancelled queued call leaves the
queue, tasks/cancel does the same for an MCP task, and CLIENT_CANCEL overrides the rule."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from code_interpreter_mcp.app.cancels import interrupts
from tests.test_content_shapes import RawStdio, close, raw_server

pytestmark = pytest.mark.anyio

GRACE_S = 1.0
SPIN = "i = 0\nwhile True:\n    i += 1"
TS_TIMEOUT = "Request timed out"  # the McpError message the TypeScript SDK's own timeout cancels with


def test_the_rule_on_reasons() -> None:
    assert interrupts(None, "auto") and interrupts("caller cancelled", "auto") and interrupts("User stop", "auto")
    for timeout in (TS_TIMEOUT, "timed out after 5s", "MCP error -32001: Request Timed Out"):
        assert not interrupts(timeout, "auto") and interrupts(timeout, "interrupt")
    assert not interrupts(None, "keep") and not interrupts("caller cancelled", "keep")


@asynccontextmanager
async def server(tmp_path: Path, mode: str = "auto", version: str = "2025-11-25") -> AsyncIterator[RawStdio]:
    """The real server over stdio with a short interrupt grace and `CLIENT_CANCEL=mode`, closed afterwards."""
    env = {"CODE_INTERPRETER_INTERRUPT_GRACE_S": str(GRACE_S), "CODE_INTERPRETER_CLIENT_CANCEL": mode}
    raw = await raw_server(tmp_path / "d", version, "test-client", env=env)
    try:
        yield raw
    finally:
        await close(raw)


async def start(raw: RawStdio, params: dict[str, Any], method: str = "tools/call") -> int:
    """Send a request without waiting for its answer; its id."""
    raw.next_id += 1
    await raw.send({"jsonrpc": "2.0", "id": raw.next_id, "method": method, "params": params})
    return raw.next_id


async def cancel(raw: RawStdio, request_id: int, reason: str | None) -> None:
    params: dict[str, Any] = {"requestId": request_id}
    if reason is not None:
        params["reason"] = reason
    await raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})


def structured(result: dict[str, Any]) -> dict[str, Any]:
    assert not result.get("isError"), result
    return result["structuredContent"]  # type: ignore[no-any-return]


async def spin_cancelled(raw: RawStdio, sid: str, reason: str | None) -> float:
    """A call waiting for a spinning run, cancelled after a second; when the cancel went out."""
    rid = await start(raw, {"name": "run_code", "arguments": {"code": SPIN, "session_id": sid, "wait_s": 60}})
    await anyio.sleep(1.0)
    await cancel(raw, rid, reason)
    return time.monotonic()


@pytest.mark.slow
async def test_a_cancel_without_reason_interrupts_and_the_next_call_runs_at_once(tmp_path: Path) -> None:
    async with server(tmp_path) as raw:
        sid = structured(await raw.call("run_code", code="kept = 42"))["session_id"]
        sent = await spin_cancelled(raw, sid, None)
        after = structured(await raw.call("run_code", code="kept, i > 0", session_id=sid))
        assert time.monotonic() - sent < GRACE_S + 1 + 1.0  # + the next run itself, generously
        assert after["status"] == "ok" and after["result"] == "(42, True)", after
        assert after["container"]["state_lost"] is False


@pytest.mark.slow
async def test_the_typescript_timeout_keeps_the_run_for_get_run(tmp_path: Path) -> None:
    async with server(tmp_path) as raw:
        sid = structured(await raw.call("run_code", code="x = 1"))["session_id"]
        code = "import time; time.sleep(3); x = 2; 'done'"
        rid = await start(raw, {"name": "run_code", "arguments": {"code": code, "session_id": sid, "wait_s": 60}})
        await anyio.sleep(1.0)
        await cancel(raw, rid, TS_TIMEOUT)
        await anyio.sleep(1.5)  # past the verdict's wait: the run must still go
        probe = structured(await raw.call("run_code", code="x", session_id=sid, wait_s=0))
        assert probe["status"] == "queued", probe
        kept = structured(await raw.call("get_run", run_id=probe["waits_for"], wait_s=20))
        assert kept["status"] == "ok" and kept["result"] == "'done'"
        assert structured(await raw.call("get_run", run_id=probe["run_id"], wait_s=20))["result"] == "2"


@pytest.mark.slow
async def test_a_cancelled_queued_call_leaves_the_queue(tmp_path: Path) -> None:
    async with server(tmp_path) as raw:
        long = structured(await raw.call("run_code", code="import time; time.sleep(2.5)", wait_s=0))
        sid = long["session_id"]
        side = {"code": "open('side.txt', 'w').write('ran')", "session_id": sid, "wait_s": 60}
        rid = await start(raw, {"name": "run_code", "arguments": side})
        await anyio.sleep(0.5)
        await cancel(raw, rid, "User pressed stop")
        after = structured(await raw.call("run_code", code="import os; os.path.exists('side.txt')", session_id=sid))
        assert after["status"] == "ok" and after["result"] == "False"
        assert structured(await raw.call("get_run", run_id=long["run_id"]))["status"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "reason", "stops"), [("interrupt", TS_TIMEOUT, True), ("keep", None, False)])
async def test_client_cancel_setting(tmp_path: Path, mode: str, reason: str | None, stops: bool) -> None:
    async with server(tmp_path, mode) as raw:
        sid = structured(await raw.call("run_code", code="kept = 7"))["session_id"]
        await spin_cancelled(raw, sid, reason)
        probe = structured(await raw.call("run_code", code="kept", session_id=sid, wait_s=GRACE_S + 2.5))
        if stops:
            assert probe["status"] == "ok" and probe["result"] == "7", probe
        else:
            assert probe["status"] == "queued", probe  # the spinning run goes on
            stopped = await raw.call("cancel_run", run_id=probe["waits_for"])
            assert stopped["structuredContent"]["status"] == "cancelled"  # an error result: the run did not finish


async def task_of_spin(raw: RawStdio, sid: str) -> str:
    params = {"name": "run_code", "arguments": {"code": SPIN, "session_id": sid}, "task": {}}
    answer = await raw.request("tools/call", params)
    assert answer["task"]["status"] == "working", answer
    return answer["task"]["taskId"]  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "keep"])
async def test_tasks_cancel_follows_the_setting(tmp_path: Path, mode: str) -> None:
    async with server(tmp_path, mode) as raw:
        sid = structured(await raw.call("run_code", code="kept = 9"))["session_id"]
        task_id = await task_of_spin(raw, sid)
        with anyio.fail_after(GRACE_S + 8):
            cancelled = await raw.request("tasks/cancel", {"taskId": task_id})
        assert cancelled["status"] == ("cancelled" if mode == "auto" else "working"), cancelled
        if mode == "keep":
            await raw.call("cancel_run", run_id=task_id)
        after = structured(await raw.call("run_code", code="kept", session_id=sid))
        assert after["status"] == "ok" and after["result"] == "9"


@pytest.mark.slow
async def test_a_cancelled_tasks_result_wait_interrupts_unless_it_timed_out(tmp_path: Path) -> None:
    async with server(tmp_path) as raw:
        sid = structured(await raw.call("run_code", code="kept = 3"))["session_id"]
        task_id = await task_of_spin(raw, sid)
        rid = await start(raw, {"taskId": task_id}, "tasks/result")
        await anyio.sleep(0.5)
        await cancel(raw, rid, TS_TIMEOUT)  # a timed-out wait: the task goes on
        await anyio.sleep(1.5)
        assert (await raw.request("tasks/get", {"taskId": task_id}))["status"] == "working"
        rid = await start(raw, {"taskId": task_id}, "tasks/result")
        await anyio.sleep(0.5)
        await cancel(raw, rid, None)  # the person stopped it
        after = structured(await raw.call("run_code", code="kept", session_id=sid, wait_s=GRACE_S + 3))
        assert after["status"] == "ok" and after["result"] == "3"
        assert (await raw.request("tasks/get", {"taskId": task_id}))["status"] == "cancelled"
