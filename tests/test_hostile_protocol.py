"""Malformed protocol traffic against the real server over stdio and HTTP: every request gets its JSON-RPC answer.

Each case is one raw message (a line on stdio, a POST body over HTTP) with the error code it must get back (None:
a broken response, which JSON-RPC never answers); after all of them the server still runs code, promptly."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client

from code_interpreter_mcp.app.jsonrpc import screen
from tests.hostile import LATENCY_BOUND_S
from tests.test_e2e_http import http_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def deep(levels: int) -> Any:
    return json.loads('{"items":' * levels + "{}" + "}" * levels)


def call(request_id: int, arguments: dict[str, Any]) -> bytes:
    message = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": "run_code"}}
    message["params"]["arguments"] = arguments  # type: ignore[index]
    return json.dumps(message).encode()


# (raw message, expected error code, expected id)
CASES: list[tuple[bytes, int | None, Any]] = [
    (b"not json", -32700, None),
    (b"\xff\xfe not utf-8", -32700, None),
    (b'{"jsonrpc":"2.0","id":1,', -32700, None),
    (b'{"jsonrpc":"2.0","id":2}', -32600, 2),
    (b'{"jsonrpc":"1.0","id":3,"method":"ping"}', -32600, 3),
    (b'{"id":4,"method":"ping"}', -32600, 4),
    (b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":"x"}', -32600, 5),
    (b'{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}', -32600, None),
    (b'{"jsonrpc":"2.0","id":6.5,"method":"ping"}', -32600, None),
    (b'{"jsonrpc":"2.0","id":7,"method":42}', -32600, 7),
    (b"[]", -32600, None),
    (b'[{"jsonrpc":"2.0","id":8,"method":"ping"}]', -32600, None),
    (b"42", -32600, None),
    (b'"ping"', -32600, None),
    (call(9, {"code": "1", "output_schema": deep(240)}), -32600, 9),
    (json.dumps({"jsonrpc": "2.0", "id": 10, "method": "ping", "params": {"x": deep(300)}}).encode(), -32600, 10),
    (b'{"jsonrpc":"2.0","result":{},"error":3}', None, None),
]


INIT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}


def test_the_screen_alone() -> None:
    for raw, code, request_id in CASES:
        verdict = screen(raw)
        assert verdict.message is None, raw
        if code is None:
            assert verdict.error is None
        else:
            assert verdict.error is not None and verdict.error.error.code == code, raw
            assert verdict.error.id == request_id, raw
    assert screen(b'{"jsonrpc":"2.0","id":1,"method":"ping"}').message is not None


class StdioServer:
    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "code_interpreter_mcp", "serve", "--data-dir", str(data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def send(self, raw: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(raw + b"\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "no answer"
        line = self.proc.stdout.readline()
        assert line, "the server closed stdout"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def request(self, request_id: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(json.dumps(message).encode())
        while True:
            answer = self.receive()
            if answer.get("id") == request_id:
                return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_stdio_answers_every_malformed_line(tmp_path: Path) -> None:
    server = StdioServer(tmp_path / "d")
    try:
        assert "result" in server.request(100, "initialize", INIT)
        server.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        warm = server.request(101, "tools/call", {"name": "run_code", "arguments": {"code": "1+1"}})
        assert warm["result"]["structuredContent"]["result"] == "2"
        for raw, code, request_id in CASES:
            if code is None:
                continue
            server.send(raw)
            answer = server.receive(timeout=10)
            assert answer["error"]["code"] == code and answer["id"] == request_id, (raw[:60], answer)
        server.send(b'{"jsonrpc":"2.0","result":{},"error":3}')  # a broken response: dropped, nothing to answer
        started = time.monotonic()
        after = server.request(102, "tools/call", {"name": "run_code", "arguments": {"code": "40+2"}})
        assert after["result"]["structuredContent"]["result"] == "42"
        assert time.monotonic() - started < LATENCY_BOUND_S + 1.0
        # A string "null" stays a string end to end: it names no session, so the call says so.
        null = server.request(103, "tools/call", {"name": "run_code", "arguments": {"code": "1", "session_id": "null"}})
        assert null["result"]["isError"] and "No session 'null'" in null["result"]["content"][0]["text"]
    finally:
        server.close()


async def test_http_answers_every_malformed_post(tmp_path: Path) -> None:
    with http_server(tmp_path / "d") as url:
        async with Client(url) as bystander:
            await bystander.call_tool("run_code", {"code": "0"})
            headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
            async with httpx2.AsyncClient(timeout=20) as http:
                init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}
                r = await http.post(url, headers=headers, content=json.dumps(init))
                session = {**headers, "mcp-session-id": r.headers["mcp-session-id"]}
                session["mcp-protocol-version"] = "2025-06-18"
                for raw, code, request_id in CASES:
                    if code is None:
                        continue
                    started = time.monotonic()
                    r = await http.post(url, headers=session, content=raw)
                    assert r.status_code == 400, (raw[:60], r.text)
                    answer = r.json()
                    assert answer["error"]["code"] == code and answer["id"] == request_id, (raw[:60], answer)
                    assert time.monotonic() - started < LATENCY_BOUND_S
            started = time.monotonic()
            ok = await bystander.call_tool("run_code", {"code": "1+1"})
            assert ok.structured_content is not None and ok.structured_content["result"] == "2"
            assert time.monotonic() - started < LATENCY_BOUND_S
