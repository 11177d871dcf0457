"""A server restart mid-run: the run that was in flight is reported lost, with a clear reason, and the
session's harvested files are kept; a run that finished before the restart is still reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from tests.test_e2e_stdio import params
from tests.test_tasks import Raw, raw_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SLEEPING = {"code": "import time; time.sleep(60)", "wait_s": 1}


async def start(raw: Raw, args: dict[str, Any]) -> dict[str, Any]:
    """A 2025-11-25 handshake (once per process), then one run_code call; its structured result."""
    if raw.next_id == 0:
        info = {"name": "t", "version": "1"}
        await raw.call("initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": info})
        raw.notify("notifications/initialized")
    reply = await raw.call("tools/call", {"name": "run_code", "arguments": args})
    return reply["result"]["structuredContent"]  # type: ignore[no-any-return]


async def test_a_run_in_flight_at_a_restart_is_reported_lost(tmp_path: Path) -> None:
    data = tmp_path / "d"
    with raw_server(data) as raw:
        first = await start(raw, {"code": "open('kept.txt','w').write('k')\n1"})
        assert first["status"] == "ok" and first["run_id"]
        flight = await start(raw, SLEEPING)
        assert flight["status"] == "running"
    # raw_server kills the process: a crash, nothing gets to record the run's end.

    sid = first["session_id"]
    async with Client(params(data)) as c:
        lost = (await c.call_tool("get_run", {"run_id": flight["run_id"], "session_id": sid})).structured_content
        assert lost is not None and lost["status"] == "lost"
        assert lost["error"]["type"] == "RunLost" and "stopped" in lost["error"]["message"]
        assert lost["run_id"] == flight["run_id"]
        earlier = (await c.call_tool("get_run", {"run_id": first["run_id"], "session_id": sid})).structured_content
        assert earlier is not None and earlier["status"] == "ok" and earlier["files"][0]["path"] == "kept.txt"
        files = (
            await c.call_tool("list_container_files", {"session_id": sid, "all_containers": True})
        ).structured_content
        assert files is not None and [f["path"] for f in files["files"]] == ["kept.txt"]
        # The session runs again, in a new container.
        again = (await c.call_tool("run_code", {"code": "2", "session_id": sid})).structured_content
        assert again is not None and again["status"] == "ok" and again["container"]["state_lost"] is True


async def test_a_run_stopped_by_a_shutdown_is_reported_lost(tmp_path: Path) -> None:
    import signal

    data = tmp_path / "d"
    with raw_server(data) as raw:
        flight = await start(raw, SLEEPING)
        assert flight["status"] == "running"
        raw.proc.send_signal(signal.SIGTERM)
        assert raw.proc.wait(timeout=20) == 0
    async with Client(params(data)) as c:
        args = {"run_id": flight["run_id"], "session_id": flight["session_id"]}
        lost = (await c.call_tool("get_run", args)).structured_content
        assert lost is not None and lost["status"] == "lost" and "shut down" in lost["error"]["message"]
