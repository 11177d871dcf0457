"""End to end: `code-interpreter-mcp serve` as a subprocess, driven by the real MCP stdio client in both eras."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, ClientSession, StdioServerParameters, stdio_client
from mcp.types import ImageContent, TextContent

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def params(data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "code_interpreter_mcp", "serve", "--data-dir", str(data_dir), *extra],
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
    )


async def test_handshake_era_session_state_and_files(tmp_path: Path) -> None:
    async with stdio_client(params(tmp_path / "d")) as (read, write), ClientSession(read, write) as s:
        init = await s.initialize()
        assert init.server_info.name == "code-interpreter-mcp"
        tools = {t.name for t in (await s.list_tools()).tools}
        assert {"run_code", "list_container_files", "download_file", "upload_file", "close_session"} <= tools
        r1 = await s.call_tool("run_code", {"code": "z = 40\nprint('out')"})
        assert r1.structured_content["stdout"] == "out\n"
        r2 = await s.call_tool("run_code", {"code": "z + 2"})
        assert r2.structured_content["result"] == "42"
        assert r2.structured_content["session_id"] == r1.structured_content["session_id"]
        r3 = await s.call_tool("run_code", {"code": "open('f.txt','w').write('stdio!')"})
        f = r3.structured_content["files"][0]
        res = await s.read_resource(f["uri"])
        assert res.contents[0].text == "stdio!"


async def test_modern_era_client_and_restart(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with Client(params(data)) as c:
        assert c.protocol_version == "2026-07-28"
        r = await c.call_tool("run_code", {"code": "a = 1\nopen('p.txt','w').write('persist')"})
        s = r.structured_content
        assert s["status"] == "ok"
        # stdio has one client per process: the process default session carries state
        r2 = await c.call_tool("run_code", {"code": "a + 1"})
        assert r2.structured_content["result"] == "2"
        assert r2.structured_content["session_id"] == s["session_id"]
    async with Client(params(data)) as c:
        d = await c.call_tool("download_file", {"file": s["files"][0]["file_id"], "session_id": s["session_id"]})
        assert not d.is_error, d.content
        assert "persist" in str(d.content)
        again = await c.call_tool(
            "run_code",
            {
                "code": "open('p.txt').read() if __import__('os').path.exists('p.txt') else 'gone'",
                "session_id": s["session_id"],
            },
        )
        # A graceful stop saved the variables; the restarted server's new worker loaded them.
        assert again.structured_content["container"]["state_lost"] is False
        assert again.structured_content["container"]["state_restored"]["restored"] == ["a"]


async def test_stdout_stays_clean_and_errors_are_results(tmp_path: Path) -> None:
    async with Client(params(tmp_path / "d")) as c:
        # user code printing to fd 1 must never corrupt the protocol stream
        r = await c.call_tool(
            "run_code",
            {
                "code": "import os, sys\nos.write(1, b'raw fd write\\n')\n"
                'sys.stdout.flush(); print(\'{"jsonrpc": "2.0"}\')'
            },
        )
        assert "raw fd write" in r.structured_content["stdout"]
        bad = await c.call_tool("download_file", {"file": "../x"})
        assert bad.is_error
        assert any(isinstance(b, TextContent) and "path_refused" in b.text for b in bad.content)
        ok = await c.call_tool("run_code", {"code": "1+1"})
        assert ok.structured_content["result"] == "2"


async def test_image_inline_over_stdio(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    async with Client(params(tmp_path / "d")) as c:
        r = await c.call_tool("run_code", {"code": "import matplotlib.pyplot as plt\nplt.bar([1,2],[3,4])"})
        images = [b for b in r.content if isinstance(b, ImageContent)]
        assert len(images) == 1
        assert base64.b64decode(images[0].data)[:4] == b"\x89PNG"


async def test_sigterm_stops_workers_and_records_it(tmp_path: Path) -> None:
    import signal
    import sqlite3
    import subprocess

    import anyio

    data = tmp_path / "d"
    proc = subprocess.Popen(
        [sys.executable, "-m", "code_interpreter_mcp", "serve", "--data-dir", str(data)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def send(msg: dict[str, Any]) -> None:
        proc.stdin.write((json.dumps(msg) + "\n").encode())
        proc.stdin.flush()

    def recv() -> dict[str, Any]:
        return json.loads(proc.stdout.readline())

    send(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
    )
    assert recv()["id"] == 1
    send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    send(
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "run_code", "arguments": {"code": "1+1"}},
        }
    )
    reply = await anyio.to_thread.run_sync(recv)
    container = reply["result"]["structuredContent"]["container_id"]
    assert (data / "containers" / container).exists()
    proc.send_signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(lambda: proc.wait(timeout=20)) == 0
    with sqlite3.connect(data / "registry.sqlite3") as db:
        (status,) = db.execute("SELECT status FROM containers WHERE id = ?", (container,)).fetchone()
    assert status == "stopped"
    assert not (data / "containers" / container).exists()
