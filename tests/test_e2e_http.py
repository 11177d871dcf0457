"""End to end over streamable HTTP on loopback: both eras, bearer tokens, and ownership between token holders."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def http_server(data_dir: Path, tokens: str | None = None) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "CODE_INTERPRETER_DATA_DIR": str(data_dir)}
    if tokens:
        env["CODE_INTERPRETER_AUTH_TOKEN"] = tokens
    proc = subprocess.Popen(
        [sys.executable, "-m", "code_interpreter_mcp", "serve", "--transport", "http", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "server exited")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def with_token(url: str, token: str, mode: Literal["auto", "legacy"] = "auto") -> Client:
    return Client(
        streamable_http_client(
            url, http_client=httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
        ),
        mode=mode,
    )


async def test_http_both_eras(tmp_path: Path) -> None:
    with http_server(tmp_path / "d") as url:
        async with Client(url) as modern:
            r = await modern.call_tool("run_code", {"code": "q = 3\nq * 3"})
            s = r.structured_content
            assert s["result"] == "9"
            # 2026-07-28 has no sessions: the caller passes session_id back
            again = await modern.call_tool("run_code", {"code": "q + 1", "session_id": s["session_id"]})
            assert again.structured_content["result"] == "4"
        async with Client(url, mode="legacy") as legacy:
            a = await legacy.call_tool("run_code", {"code": "w = 'legacy'"})
            b = await legacy.call_tool("run_code", {"code": "w"})
            assert b.structured_content["result"] == "'legacy'"
            assert a.structured_content["session_id"] == b.structured_content["session_id"]
            # host paths are not the HTTP caller's to name
            denied = await legacy.call_tool("upload_file", {"path": "/etc/hostname"})
            assert denied.is_error and "path_refused" in str(denied.content)


async def test_tokens_own_their_sessions(tmp_path: Path) -> None:
    with http_server(tmp_path / "d", tokens="alpha-token-123456,beta-token-654321") as url:
        async with httpx2.AsyncClient() as raw:
            resp = await raw.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            assert resp.status_code == 401
        async with with_token(url, "alpha-token-123456") as alpha:
            r = await alpha.call_tool("run_code", {"code": "open('secret.txt','w').write('alpha only')"})
            s = r.structured_content
        async with with_token(url, "beta-token-654321") as beta:
            stolen = await beta.call_tool(
                "download_file", {"file": s["files"][0]["file_id"], "session_id": s["session_id"]}
            )
            assert stolen.is_error and "session_not_found" in str(stolen.content)
            assert "alpha only" not in str(stolen.content)
            with pytest.raises(Exception):  # noqa: B017 - any protocol error will do; the data must not come
                await beta.read_resource(s["files"][0]["uri"])
        async with with_token(url, "alpha-token-123456") as alpha:
            mine = await alpha.read_resource(s["files"][0]["uri"])
            assert mine.contents[0].text == "alpha only"
