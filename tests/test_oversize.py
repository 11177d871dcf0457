"""Messages over the size limit still get their answer (app/oversize.py, app/stdio.py, app/http_screen.py): the
id found while the message streams past, the -32600 naming the limit and the way to send a large file, bounded
memory while a 700 MB line is drained, and the next request on the same connection served as usual."""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from code_interpreter_mcp.app import stdio
from code_interpreter_mcp.app.oversize import MAX_STEPS, IdScanner, MessageLimit, Scan, message_limit
from code_interpreter_mcp.app.stdio import LineReader, Oversize
from code_interpreter_mcp.config import Settings, load_settings
from tests.test_e2e_http import http_server
from tests.test_hostile_protocol import INIT, StdioServer

MIB = 1024 * 1024


def scanned(raw: bytes, chunk: int | None = None) -> Scan:
    scanner = IdScanner()
    if chunk is None:
        scanner.feed(raw)
    else:
        for i in range(0, len(raw), chunk):
            scanner.feed(raw[i : i + chunk])
    return scanner.scan


BLOB = b"QUFB" * 2000
# (message, the id it answers with, whether it is answered at all)
SCANS: list[tuple[bytes, Any, bool]] = [
    (b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"x":"' + BLOB + b'"}}', 7, True),
    # The TypeScript SDK writes the id last, behind the payload.
    (b'{"method":"tools/call","params":{"x":"' + BLOB + b'"},"jsonrpc":"2.0","id":"req-9"}', "req-9", True),
    # Escapes inside strings: a \" does not end the string, a \\ before the quote does.
    (b'{"method":"x","params":{"a":"\\"},\\\\' + BLOB + b'\\\\"},"id":"a\\"b"}', 'a"b', True),
    # Only the top level's id counts, however deep others are.
    (b'{"method":"x","params":[[[{"id":3}]],{"id":4}],"id":-12}', -12, True),
    (b'{"\\u0069d":5,"method":"y","params":{}}', 5, True),
    (b'{ "id" : 8 , "method" : "x" }', 8, True),
    (b'{"id":1,"id":2,"method":"x"}', 2, True),  # repeated: the last one, as json.loads does
    (b'{"id":true,"method":"x"}', None, True),  # not a usable id: answered with id null
    (b'{"id":1.5,"method":"x"}', None, True),
    (b'{"id":{"a":1},"method":"x"}', None, True),
    (b'{"method":"notifications/x","params":{"x":"' + BLOB + b'"}}', None, False),  # a notification
    (b'{"result":{"x":"' + BLOB + b'"},"id":4}', 4, False),  # a response: never answered
    (b"[" + BLOB + b"]", None, True),  # a batch or not an object: id null
    (b"not json at all", None, True),
    (b'{"method":"x","params":{"x":"' + BLOB, None, True),  # cut off: the id may have been anywhere
]


@pytest.mark.parametrize(("raw", "request_id", "answered"), SCANS)
def test_the_id_is_found_whatever_the_chunking(raw: bytes, request_id: Any, answered: bool) -> None:
    rng = random.Random(len(raw))
    for chunk in (None, 1, 2, 3, 7, 64, rng.randint(5, 500)):
        scan = scanned(raw, chunk)
        assert (scan.request_id, scan.answered) == (request_id, answered), (raw[:50], chunk)


def test_a_pathological_message_is_given_up_on_quickly() -> None:
    raw = b'{"method":"x","params":' + b"[" * (MAX_STEPS + 10) + b'],"id":3}'
    started = time.monotonic()
    scan = scanned(raw, 1 << 20)
    assert time.monotonic() - started < 10
    assert scan.request_id is None and scan.answered


def test_the_refusal_names_the_limit_and_the_way_instead() -> None:
    stdio_limit = message_limit(Settings(transport="stdio"), "stdio")
    assert stdio_limit.max_bytes == 256 * MIB
    reply = stdio_limit.refusal(Scan(request_id=9, has_id=True), 700 * 1000 * 1000)
    assert reply.id == 9 and reply.error.code == -32600
    text = reply.error.message
    assert "700,000,000 bytes" in text and "256 MiB" in text and "CODE_INTERPRETER_MAX_MESSAGE_MB" in text
    assert "upload_file(path=" in text
    http = message_limit(Settings(transport="http"), "http")
    assert http.max_bytes == 4 * MIB
    assert "ALLOW_HOST_PATHS" in http.refusal(Scan(), 5 * MIB, read_all=False).error.message
    assert message_limit(Settings(max_message_mb=1.5), "http").max_bytes == int(1.5 * MIB)


def lines(*parts: bytes) -> io.BytesIO:
    return io.BytesIO(b"".join(part + b"\n" for part in parts))


def test_the_line_reader_keeps_lines_whole_and_refuses_the_long_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stdio, "_CHUNK", 64)
    monkeypatch.setattr(stdio, "HELD_BYTES", 256)
    within = b'{"id":1,"method":"x","params":{"b":"' + b"A" * 900 + b'"}}'  # spilled, then read back whole
    over = b'{"method":"x","params":{"b":"' + b"A" * 5000 + b'"},"id":2}'
    for spill_dir in (tmp_path / "spill", None):
        reader = LineReader(lines(b'{"id":0}', within, over, b'{"id":3}'), max_bytes=2000, spill_dir=spill_dir)
        assert reader.read() == b'{"id":0}'
        assert reader.read() == within
        refused = reader.read()
        assert isinstance(refused, Oversize) and refused.size == len(over) and refused.scan.request_id == 2
        assert reader.read() == b'{"id":3}'
        assert reader.read() is None
    assert LineReader(io.BytesIO(b'{"id":4}'), 100).read() == b'{"id":4}'  # the last line needs no newline
    assert not any((tmp_path / "spill").iterdir())  # spill files are unlinked


class _Stream(io.RawIOBase):
    """A binary stream of `size` bytes made on demand: a huge line without holding it anywhere."""

    def __init__(self, head: bytes, size: int, tail: bytes) -> None:
        self.head, self.size, self.tail, self.pos = head, size, tail, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        body_end = len(self.head) + self.size
        n = 0
        view = memoryview(buffer)
        while n < len(view):
            if self.pos < len(self.head):
                piece = self.head[self.pos : self.pos + len(view) - n]
            elif self.pos < body_end:
                piece = b"A" * min(len(view) - n, body_end - self.pos)
            else:
                start = self.pos - body_end
                piece = self.tail[start : start + len(view) - n]
            if not piece:
                break
            view[n : n + len(piece)] = piece
            n += len(piece)
            self.pos += len(piece)
        return n


def upload_parts(request_id: int, size: int) -> tuple[bytes, bytes]:
    """A `tools/call` of upload_file with `size` bytes of base64, its id last (as the TypeScript SDK writes it)."""
    head = b'{"jsonrpc":"2.0","method":"tools/call","params":{"name":"upload_file","arguments":'
    head += b'{"name":"big.bin","content_base64":"'
    return head, b'"}},"id":' + str(request_id).encode() + b"}"


def huge_line(request_id: int, size: int, block: int = MIB) -> Iterator[bytes]:
    head, tail = upload_parts(request_id, size)
    yield head
    chunk = b"A" * block
    for _ in range(size // block):
        yield chunk
    yield b"A" * (size % block) + tail + b"\n"


def vm_peak_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of `pid`, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]), int(fields["VmRSS"].split()[0])


def test_the_line_reader_drains_a_huge_line_in_bounded_memory(tmp_path: Path) -> None:
    import resource

    head, tail = upload_parts(5, 700 * 1000 * 1000)
    stream = io.BufferedReader(_Stream(head, 700 * 1000 * 1000, tail + b'\n{"id":6}\n'), buffer_size=MIB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reader = LineReader(stream, 256 * MIB, tmp_path)
    refused = reader.read()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert isinstance(refused, Oversize) and refused.scan.request_id == 5
    assert refused.size == len(head) + 700 * 1000 * 1000 + len(tail)
    assert grown_mib <= 64, grown_mib
    assert reader.read() == b'{"id":6}'


@pytest.mark.slow
def test_stdio_answers_a_700_mb_line_with_its_id_in_bounded_memory(tmp_path: Path) -> None:
    server = StdioServer(tmp_path / "d")
    try:
        assert "result" in server.request(1, "initialize", INIT)
        server.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        warm = server.request(2, "tools/call", {"name": "run_code", "arguments": {"code": "x = 41\nx + 1"}})
        assert warm["result"]["structuredContent"]["result"] == "42"
        peak_before, _ = vm_peak_kib(server.proc.pid)
        assert server.proc.stdin is not None
        started = time.monotonic()
        for part in huge_line(77, 700 * 1000 * 1000):
            server.proc.stdin.write(part)
        server.proc.stdin.flush()
        answer = server.receive(timeout=120)
        elapsed = time.monotonic() - started
        peak_after, _ = vm_peak_kib(server.proc.pid)
        assert answer["id"] == 77 and answer["error"]["code"] == -32600, answer
        message = answer["error"]["message"]
        assert "256 MiB" in message and "MAX_MESSAGE_MB" in message and "upload_file(path=" in message
        grown_mib = (peak_after - peak_before) / 1024
        print(f"server peak RSS grew {grown_mib:.1f} MiB draining 700 MB in {elapsed:.1f} s")
        assert grown_mib <= 64, f"the server grew {grown_mib:.0f} MiB draining the line"
        assert elapsed < 60
        after = server.request(3, "tools/call", {"name": "run_code", "arguments": {"code": "x + 2"}})
        assert after["result"]["structuredContent"]["result"] == "43"  # same connection, same session
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.anyio
async def test_http_answers_an_oversized_body_413_with_its_id(tmp_path: Path) -> None:
    with http_server(tmp_path / "d") as url:
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        async with httpx2.AsyncClient(timeout=60) as http:
            init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}
            r = await http.post(url, headers=headers, content=json.dumps(init))
            session = {**headers, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}

            async def body() -> Any:
                for part in huge_line(42, 40 * MIB):
                    yield part

            r = await http.post(url, headers=session, content=body())
            assert r.status_code == 413, r.text
            answer = r.json()
            assert answer["id"] == 42 and answer["error"]["code"] == -32600
            assert "4 MiB" in answer["error"]["message"] and "MAX_MESSAGE_MB" in answer["error"]["message"]
            # The same connection (the body was read through) serves the next request.
            call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
            call["params"] = {"name": "run_code", "arguments": {"code": "6*7"}}  # type: ignore[assignment]
            r = await http.post(url, headers=session, content=json.dumps(call))
            assert r.status_code == 200, r.text
            assert '"42"' in r.text or "42" in r.text
            # A body just under the limit still goes through to the SDK.
            small = {"jsonrpc": "2.0", "id": 3, "method": "ping", "params": {"pad": "A" * (3 * MIB)}}
            r = await http.post(url, headers=session, content=json.dumps(small))
            assert r.status_code == 200, r.text


def test_the_limit_is_a_setting() -> None:
    settings = load_settings(environ={"CODE_INTERPRETER_MAX_MESSAGE_MB": "8"})
    assert settings.max_message_bytes("stdio") == settings.max_message_bytes("http") == 8 * MIB
    assert MessageLimit(8 * MIB, "").refusal(Scan(), 9 * MIB).id is None
