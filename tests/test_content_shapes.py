"""Content each client understands: a raw JSON-RPC client at 2025-03-26 gets no content type that version lacks
on any tool; the three RESOURCE_LINKS modes; a client that introduces itself as `claude-code` (which drops
`content` when `structuredContent` is present) gets tools without outputSchema and results whose text and images
carry everything, and RESULT_SHAPE=both restores the usual shape for it."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from mcp import Client
from mcp.types import CallToolResult, ImageContent, Implementation, ResourceLink

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.app.clients import profile_for
from code_interpreter_mcp.config import Settings
from tests.helpers import structured, text_of

pytestmark = pytest.mark.anyio

FILES_CODE = (
    "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\n"
    "open('table.csv', 'w').write('a,b\\n1,2\\n')\nopen('blob.bin', 'wb').write(bytes(range(256)) * 1000)\n"
    "{'answer': 42}"
)
TYPES_2025_03_26 = {"text", "image", "audio", "resource"}


class RawStdio:
    """The real server as a subprocess, spoken to in hand-written JSON-RPC lines."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        self.next_id = 0
        self.buffer = b""

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send((json.dumps(msg) + "\n").encode())

    async def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self.buffer:
            self.buffer += await self.proc.stdout.receive()
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        await self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        with anyio.fail_after(60):
            while True:
                msg = await self._line()
                if msg.get("id") == self.next_id:
                    assert "result" in msg, msg
                    return msg["result"]  # type: ignore[no-any-return]

    async def call(self, tool: str, /, **args: Any) -> dict[str, Any]:
        return await self.request("tools/call", {"name": tool, "arguments": args})


async def raw_server(data: Path, version: str, client: str, env: dict[str, str] | None = None) -> RawStdio:
    cmd = [sys.executable, "-m", "code_interpreter_mcp", "serve", "--data-dir", str(data)]
    proc = await anyio.open_process(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    raw = RawStdio(proc)
    init = await raw.request(
        "initialize", {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": client, "version": "1"}}
    )
    assert init["protocolVersion"] == version
    await raw.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    return raw


async def close(raw: RawStdio) -> None:
    assert raw.proc.stdin is not None
    await raw.proc.stdin.aclose()
    with anyio.fail_after(20):
        await raw.proc.wait()


async def all_tools(raw: RawStdio, tmp_path: Path) -> list[dict[str, Any]]:
    """One result of every tool, files and images included."""
    run = await raw.call("run_code", code=FILES_CODE)
    assert not run.get("isError"), run
    results = [run, await raw.call("run_code", code="1/0")]
    results.append(await raw.call("list_container_files"))
    for name in ("table.csv", "blob.bin"):
        results.append(await raw.call("download_file", file=name))
    png = next(line.split()[1] for line in run["content"][0]["text"].splitlines() if line.startswith("file: figure"))
    results.append(await raw.call("download_file", file=png))
    results.append(await raw.call("upload_file", name="u.txt", content_base64=base64.b64encode(b"hi").decode()))
    results.append(await raw.call("close_session"))
    return results


@pytest.mark.slow
async def test_a_2025_03_26_client_gets_only_what_it_knows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    raw = await raw_server(tmp_path / "d", "2025-03-26", "old-client")
    try:
        tools = (await raw.request("tools/list", {}))["tools"]
        assert tools and all("outputSchema" not in t for t in tools)
        results = await all_tools(raw, tmp_path)
        for r in results:
            assert {c["type"] for c in r["content"]} <= TYPES_2025_03_26, r["content"]
            assert "structuredContent" not in r
        run = results[0]["content"]
        assert any(c["type"] == "image" for c in run)
        assert "ci://sessions/" in run[0]["text"] and "result: {'answer': 42}" in run[0]["text"]
        assert "ZeroDivisionError" in results[1]["content"][0]["text"]
    finally:
        await close(raw)


@pytest.mark.slow
async def test_a_raw_claude_code_client_gets_content_only(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    raw = await raw_server(tmp_path / "d", "2025-11-25", "claude-code")
    try:
        tools = (await raw.request("tools/list", {}))["tools"]
        assert all("outputSchema" not in t for t in tools)
        run = await raw.call("run_code", code=FILES_CODE)
        assert "structuredContent" not in run
        text = run["content"][0]["text"]
        assert "status: ok" in text and "session s_" in text and "result: {'answer': 42}" in text
        assert "id=f_" in text and "table.csv" in text
        assert any(c["type"] == "image" for c in run["content"])
    finally:
        await close(raw)
    raw = await raw_server(tmp_path / "d2", "2025-11-25", "claude-code", env={"CODE_INTERPRETER_RESULT_SHAPE": "both"})
    try:
        tools = (await raw.request("tools/list", {}))["tools"]
        assert all("outputSchema" in t for t in tools)
        run = await raw.call("run_code", code=FILES_CODE)
        assert run["structuredContent"]["status"] == "ok"
        assert {c["type"] for c in run["content"]} == {"text", "image", "resource_link"}
    finally:
        await close(raw)


async def test_claude_code_over_the_2026_envelope(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    settings = Settings(data_dir=tmp_path / "d")
    me = Implementation(name="claude-code", version="2.1.280")
    async with Client(build_server(settings), raise_exceptions=True, client_info=me) as c:
        assert c.protocol_version == "2026-07-28"
        tools = (await c.list_tools()).tools
        assert all(t.output_schema is None for t in tools)
        r = await c.call_tool("run_code", {"code": FILES_CODE, "output_schema": {"type": "object"}})
        assert r.structured_content is None
        text = text_of(r)
        assert 'json: {"answer":42}' in text and "id=f_" in text
        assert [x for x in r.content if isinstance(x, ImageContent)]
        listing = await c.call_tool("list_container_files", {})
        assert listing.structured_content is None and "table.csv" in text_of(listing)


async def links_in(settings: Settings) -> tuple[CallToolResult, dict[str, Any]]:
    async with Client(build_server(settings), raise_exceptions=True) as c:
        r = await c.call_tool("run_code", {"code": FILES_CODE})
        return r, structured(r)


@pytest.mark.parametrize("mode", ["all", "non_inline", "none"])
async def test_resource_links_modes(tmp_path: Path, mode: str) -> None:
    pytest.importorskip("matplotlib")
    r, s = await links_in(Settings(data_dir=tmp_path / "d", resource_links=mode))  # type: ignore[arg-type]
    linked = {c.name for c in r.content if isinstance(c, ResourceLink)}
    assert [c for c in r.content if isinstance(c, ImageContent)]
    names = {f["name"] for f in s["files"]}
    png = next(n for n in names if n.endswith(".png"))
    expected = {"all": names, "non_inline": names - {png}, "none": set()}[mode]
    assert linked == expected
    if mode == "none":
        assert all(f["uri"] in text_of(r) for f in s["files"])  # the URIs are in the text instead


def test_profiles() -> None:
    s = Settings()
    assert profile_for(s, "claude-code", "2025-11-25").content_only
    assert profile_for(s, "Claude-Code ", "2026-07-28").content_only
    assert not profile_for(s, "Visual Studio Code", "2025-11-25").content_only
    old = profile_for(s, "x", "2025-03-26")
    assert old.content_only and not old.links
    assert profile_for(s, "x", "2025-06-18").links
    assert not profile_for(Settings(result_shape="both"), "claude-code", "2025-11-25").content_only
    assert profile_for(Settings(result_shape="content_only"), "x", "2025-11-25").content_only
    assert not profile_for(Settings(resource_links="none"), "x", "2025-11-25").links
