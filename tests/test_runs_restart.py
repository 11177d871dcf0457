"""A server restart mid-run: the run that was in flight is reported lost, with a clear reason, and the
session's harvested files are kept; a run that finished before the restart is still reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.test_e2e_stdio import params

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_a_run_in_flight_at_a_restart_is_reported_lost(tmp_path: Path) -> None:
    data = tmp_path / "d"
    proc = subprocess.Popen(
        [sys.executable, "-m", "code_interpreter_mcp", "serve", "--data-dir", str(data)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def send(msg: dict[str, Any]) -> None:
        proc.stdin.write((json.dumps(msg) + "\n").encode())  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    def recv() -> dict[str, Any]:
        return json.loads(proc.stdout.readline())  # type: ignore[union-attr]

    def call(rid: int, name: str, args: dict[str, Any]) -> dict[str, Any]:
        send({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": name, "arguments": args}})
        return recv()["result"]["structuredContent"]  # type: ignore[no-any-return]

    try:
        info = {"name": "t", "version": "1"}
        send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": info},
            }
        )
        recv()
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        first = await anyio.to_thread.run_sync(call, 2, "run_code", {"code": "open('kept.txt','w').write('k')\n1"})
        assert first["status"] == "ok" and first["run_id"]
        flight = await anyio.to_thread.run_sync(
            call, 3, "run_code", {"code": "import time; time.sleep(60)", "wait_s": 1}
        )
        assert flight["status"] == "running"
    finally:
        proc.kill()  # a crash: nothing gets to record the run's end
        proc.wait()

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
