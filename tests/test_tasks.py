"""MCP tasks over runs, through a raw JSON-RPC client of the real server over stdio, in both protocol eras:
the 2025-11-25 `tasks` capability (task-augmented tools/call, tasks/get, tasks/result, tasks/cancel) and the
2026-07-28 `io.modelcontextprotocol/tasks` extension (resultType "task", tasks/get with the result inlined)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

EXT = "io.modelcontextprotocol/tasks"
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {"extensions": {EXT: {}}},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
}
PLAIN_META = {**MODERN_META, "io.modelcontextprotocol/clientCapabilities": {}}
SLOW = "import time\nprint('working', flush=True)\ntime.sleep(2)\nopen('t.txt', 'w').write('task')\n6 * 7"


class Raw:
    """Line-delimited JSON-RPC to a server process; each call returns the reply to its own id."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.next_id = 0

    def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        msg = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        while True:
            reply = json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]
            if reply.get("id") == rid:
                return reply  # type: ignore[no-any-return]

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self._call, method, params)

    def notify(self, method: str) -> None:
        self.proc.stdin.write((json.dumps({"jsonrpc": "2.0", "method": method}) + "\n").encode())  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]


@contextmanager
def raw_server(data_dir: Path) -> Iterator[Raw]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "code_interpreter_mcp", "serve", "--data-dir", str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield Raw(proc)
    finally:
        proc.kill()
        proc.wait()


async def test_legacy_era_task_augmented_run_code(tmp_path: Path) -> None:
    with raw_server(tmp_path / "d") as raw:
        init = await raw.call(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tasks": {}},
                "clientInfo": {"name": "t", "version": "1"},
            },
        )
        assert init["result"]["capabilities"]["tasks"] == {"cancel": {}, "requests": {"tools": {"call": {}}}}
        raw.notify("notifications/initialized")
        tools = {t["name"]: t for t in (await raw.call("tools/list", {}))["result"]["tools"]}
        assert tools["run_code"]["execution"] == {"taskSupport": "optional"}

        started = time.monotonic()
        created = await raw.call(
            "tools/call", {"name": "run_code", "arguments": {"code": SLOW}, "task": {"ttl": 60000}}
        )
        assert time.monotonic() - started < 1.5, "a task call answers at once"
        task = created["result"]["task"]
        assert task["status"] == "working" and task["taskId"].startswith("r_") and "createdAt" in task
        await anyio.sleep(0.5)
        polled = (await raw.call("tasks/get", {"taskId": task["taskId"]}))["result"]
        assert polled["taskId"] == task["taskId"] and polled["status"] == "working"
        assert polled["statusMessage"].endswith("last output: working"), polled

        result = (await raw.call("tasks/result", {"taskId": task["taskId"]}))["result"]
        assert result["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task["taskId"]}
        assert result["isError"] is False
        assert result["structuredContent"]["result"] == "42"
        assert [f["path"] for f in result["structuredContent"]["files"]] == ["t.txt"]
        assert any(c["type"] == "resource_link" for c in result["content"])
        assert (await raw.call("tasks/get", {"taskId": task["taskId"]}))["result"]["status"] == "completed"

        loop = await raw.call(
            "tools/call",
            {"name": "run_code", "arguments": {"code": "import time\nwhile True: time.sleep(0.05)"}, "task": {}},
        )
        cancelled = (await raw.call("tasks/cancel", {"taskId": loop["result"]["task"]["taskId"]}))["result"]
        assert cancelled["status"] == "cancelled"
        # A call refused before it runs still answers as a task, one that completed with the error.
        bad = await raw.call("tools/call", {"name": "run_code", "arguments": {"code": "1", "wait_s": -1}, "task": {}})
        refused = (await raw.call("tasks/result", {"taskId": bad["result"]["task"]["taskId"]}))["result"]
        assert refused["isError"] is True
        missing = await raw.call("tasks/get", {"taskId": "r_" + "0" * 32})
        assert missing["error"]["code"] == -32602
        # Without a task param the same tool answers as usual.
        plain = await raw.call("tools/call", {"name": "run_code", "arguments": {"code": "1 + 1"}})
        assert plain["result"]["structuredContent"]["result"] == "2"


async def test_modern_era_tasks_extension(tmp_path: Path) -> None:
    with raw_server(tmp_path / "d") as raw:
        discover = await raw.call("server/discover", {"_meta": MODERN_META})
        assert EXT in discover["result"]["capabilities"]["extensions"]

        created = (
            await raw.call("tools/call", {"name": "run_code", "arguments": {"code": SLOW}, "_meta": MODERN_META})
        )["result"]
        assert created["resultType"] == "task" and created["status"] == "working"
        assert created["pollIntervalMs"] > 0 and "ttlMs" in created
        task_id = created["taskId"]
        deadline = time.monotonic() + 30
        while True:
            got = (await raw.call("tasks/get", {"taskId": task_id, "_meta": MODERN_META}))["result"]
            assert got["resultType"] == "complete" and got["taskId"] == task_id
            if got["status"] != "working":
                break
            assert time.monotonic() < deadline
            await anyio.sleep(0.3)
        assert got["status"] == "completed"
        assert got["result"]["structuredContent"]["result"] == "42"
        assert got["result"]["structuredContent"]["stdout"] == "working\n"
        assert got["result"]["isError"] is False

        # A quick run answers with its result, task or not.
        quick = await raw.call("tools/call", {"name": "run_code", "arguments": {"code": "3"}, "_meta": MODERN_META})
        assert quick["result"]["resultType"] == "complete" and quick["result"]["structuredContent"]["result"] == "3"

        loop = (
            await raw.call(
                "tools/call",
                {
                    "name": "run_code",
                    "arguments": {"code": "import time\nwhile True: time.sleep(0.05)"},
                    "_meta": MODERN_META,
                },
            )
        )["result"]
        ack = await raw.call("tasks/cancel", {"taskId": loop["taskId"], "_meta": MODERN_META})
        assert ack["result"]["resultType"] == "complete"
        after = (await raw.call("tasks/get", {"taskId": loop["taskId"], "_meta": MODERN_META}))["result"]
        assert after["status"] == "cancelled"

        # A client that does not declare the extension gets no task, and may not poll one.
        undeclared = await raw.call("tasks/get", {"taskId": task_id, "_meta": PLAIN_META})
        assert undeclared["error"]["code"] == -32021
        plain = await raw.call(
            "tools/call",
            {
                "name": "run_code",
                "arguments": {"code": "import time; time.sleep(1.5); 4", "wait_s": 5},
                "_meta": PLAIN_META,
            },
        )
        assert plain["result"]["resultType"] == "complete" and plain["result"]["structuredContent"]["result"] == "4"
