"""The stdio transport: the SDK's contract (one JSON-RPC message a line, fd 0 and 1 claimed while serving) with
an answer for every line.

The SDK's `stdio_server` turns a line it cannot parse into an exception on the read stream, which its dispatcher
drops: a malformed request never gets an answer. Here each line goes through `jsonrpc.screen` first and a bad one
is answered on the wire at once (-32700, -32600); a line over the size cap is drained and refused without being
held; a response that cannot be serialised (a value too deep for pydantic-core) becomes an error response for its
request instead of killing the writer. While serving, fd 0 reads the null device and fd 1 goes to stderr, as with
the SDK, so child processes cannot read the protocol or corrupt it. Knows nothing of tools or the engine.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import BinaryIO

import anyio
import anyio.to_thread
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from mcp.shared.message import SessionMessage
from mcp_types import INTERNAL_ERROR, INVALID_REQUEST, JSONRPCError, JSONRPCResponse

from .jsonrpc import error_reply, screen

logger = logging.getLogger(__name__)

# An upload of the largest harvestable file in base64 fits; a line beyond is refused unread.
MAX_LINE_BYTES = 256 * 1024 * 1024
_CHUNK = 1 << 20

ReadStream = ObjectReceiveStream[SessionMessage | Exception]
WriteStream = ObjectSendStream[SessionMessage]


def _claim(fd: int, flags: int, diversion: int) -> BinaryIO:
    """The wire moves to a private descriptor; `fd` itself points at `diversion` while serving."""
    private = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.dup2(diversion, fd)
    return os.fdopen(private, "rb" if flags == os.O_RDONLY else "wb")


def _release(fd: int, wire: BinaryIO) -> None:
    try:
        os.dup2(wire.fileno(), fd)
    except OSError:
        logger.warning("could not restore fd %d after serving", fd)


def _read_line(stdin: BinaryIO) -> tuple[bytes, int]:
    """One line and its full size (blocking); a line over the cap is drained and comes back empty."""
    line = stdin.readline(MAX_LINE_BYTES + 1)
    if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
        return line, len(line)
    size = len(line)
    while line and not line.endswith(b"\n"):
        line = stdin.readline(_CHUNK)
        size += len(line)
    return b"", size


@asynccontextmanager
async def stdio_streams(
    stdin: BinaryIO | None = None, stdout: BinaryIO | None = None
) -> AsyncIterator[tuple[ReadStream, WriteStream]]:
    """The read and write streams of the MCP server over stdin/stdout (or the binary files given, unclaimed)."""
    claimed: list[tuple[int, BinaryIO]] = []
    if stdin is None:
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            stdin = _claim(0, os.O_RDONLY, null)
        finally:
            os.close(null)
        claimed.append((0, stdin))
    if stdout is None:
        stdout = _claim(1, os.O_WRONLY, 2)
        claimed.append((1, stdout))
    reader = stdin
    writer = anyio.wrap_file(stdout)
    read_send, read_receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_send, write_receive = anyio.create_memory_object_stream[SessionMessage](0)
    lock = anyio.Lock()

    async def write(payload: str) -> None:
        async with lock:
            await writer.write(payload.encode() + b"\n")
            await writer.flush()

    async def read_lines() -> None:
        async with read_send:
            while True:
                line, size = await anyio.to_thread.run_sync(_read_line, reader)
                if not size:
                    return  # EOF: the client closed the pipe
                if not line.strip():
                    if size > MAX_LINE_BYTES:
                        too_big = f"Invalid Request: the message is {size} bytes; the limit is {MAX_LINE_BYTES}"
                        reply = error_reply(INVALID_REQUEST, too_big)
                        await write(reply.model_dump_json(by_alias=True, exclude_unset=True))
                    continue
                verdict = screen(line)
                if verdict.message is not None:
                    await read_send.send(SessionMessage(verdict.message))
                elif verdict.error is not None:
                    await write(verdict.error.model_dump_json(by_alias=True, exclude_unset=True))

    async def write_messages() -> None:
        async with write_receive:
            async for item in write_receive:
                payload = _serialised(item)
                if payload is not None:
                    await write(payload)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_lines)
            tg.start_soon(write_messages)
            yield read_receive, write_send
            tg.cancel_scope.cancel()
    finally:
        for fd, wire in claimed:
            _release(fd, wire)


def _serialised(item: SessionMessage) -> str | None:
    message = item.message
    try:
        return message.model_dump_json(by_alias=True, exclude_unset=True)
    except (ValueError, RecursionError) as exc:
        logger.error("a message could not be serialised: %s", exc)
        if not isinstance(message, JSONRPCResponse | JSONRPCError):
            return None  # a notification or request of ours: nobody waits on it
        reply = error_reply(
            INTERNAL_ERROR, "The result could not be serialised (nested too deeply for JSON-RPC).", message.id
        )
        return reply.model_dump_json(by_alias=True, exclude_unset=True)
