"""The stdio transport: the SDK's contract (one JSON-RPC message a line, fd 0 and 1 claimed while serving) with
an answer for every line.

The SDK's `stdio_server` turns a line it cannot parse into an exception on the read stream, which its dispatcher
drops: a malformed request never gets an answer. Here each line goes through `jsonrpc.screen` first and a bad one
is answered on the wire at once (-32700, -32600). A line over the size limit is read through in chunks without
being held (`LineReader`) and answered with its own id and the limit (`oversize`), so the client that sent a
500 MB upload is told, not left waiting; the next line is read as usual. A response that cannot be serialised (a
value too deep for pydantic-core) becomes an error response for its request instead of killing the writer. While
serving, fd 0 reads the null device and fd 1 goes to stderr, as with the SDK, so child processes cannot read the
protocol or corrupt it. Knows nothing of tools or the engine.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from mcp.shared.message import SessionMessage
from mcp_types import INTERNAL_ERROR, JSONRPCError, JSONRPCResponse

from .jsonrpc import error_reply, screen
from .oversize import IdScanner, MessageLimit, Scan

logger = logging.getLogger(__name__)

# A line longer than this goes on in a spill file: what a line over the limit costs in memory at most.
HELD_BYTES = 16 * 1024 * 1024
_CHUNK = 1 << 20
DEFAULT_LIMIT = MessageLimit(256 * 1024 * 1024, "")

ReadStream = ObjectReceiveStream[SessionMessage | Exception]
WriteStream = ObjectSendStream[SessionMessage]


def _claim(fd: int, flags: int, diversion: int) -> BinaryIO:
    """The wire moves to a private descriptor; `fd` itself points at `diversion` while serving."""
    private = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.dup2(diversion, fd)
    return os.fdopen(private, "rb" if flags == os.O_RDONLY else "wb")


def _direct_writer(stdout: BinaryIO) -> Callable[[bytes], Awaitable[None]]:
    """How the server's messages reach the client. A pipe (the usual stdout) is written without blocking, straight
    from the event loop: a reply then costs one `write()`, where a worker thread costs two thread hand-offs per
    message, a large share of a warm call. A stream without a descriptor (in tests) goes through a thread."""
    try:
        fd = stdout.fileno()
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise ValueError("not a pipe")  # a terminal or a file is shared with others: leave its flags alone
        os.set_blocking(fd, False)
    except (AttributeError, OSError, ValueError):
        wrapped = anyio.wrap_file(stdout)

        async def threaded(data: bytes) -> None:
            await wrapped.write(data)
            await wrapped.flush()

        return threaded

    async def direct(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                await anyio.wait_writable(fd)  # the client reads slowly: wait without holding the loop
                continue
            view = view[n:]

    return direct


def _release(fd: int, wire: BinaryIO) -> None:
    try:
        os.set_blocking(wire.fileno(), True)  # as it was: the descriptor goes back to fd 0 or 1
        os.dup2(wire.fileno(), fd)
    except OSError:
        logger.warning("could not restore fd %d after serving", fd)


@dataclass
class Oversize:
    """A line over the limit, read through and dropped: its size and what its top level said."""

    size: int
    scan: Scan


class LineReader:
    """One line at a time from a blocking binary stream, in bounded memory whatever the line's size.

    A line is read in chunks. Up to `HELD_BYTES` it stays in memory (nearly every message); past that it goes on
    into an unlinked file in `spill_dir` and is read back when it ends, so a large upload that is within the limit
    still arrives whole while a line over the limit never held more than `HELD_BYTES` of memory: from that
    point its bytes only pass the id scanner, and once it is over the limit the file is dropped and the rest is
    drained. Without a usable spill folder the line stays in memory up to the limit (as the SDK would hold it).
    """

    def __init__(self, stream: BinaryIO, max_bytes: int, spill_dir: Path | None = None) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self.spill_dir = spill_dir

    def read(self) -> bytes | Oversize | None:
        """The next line (without its newline), an `Oversize`, or None at the end of the stream."""
        held: list[bytes] = []
        size = 0
        spill: BinaryIO | None = None
        scanner: IdScanner | None = None
        try:
            while True:
                part = self.stream.readline(_CHUNK)
                if not part:
                    if not size:
                        return None
                    break  # the last line had no newline: it is still a message
                ended = part.endswith(b"\n")
                if ended:
                    part = part[:-1]
                size += len(part)
                if scanner is not None:
                    scanner.feed(part)
                if size > self.max_bytes:
                    if spill is not None:
                        spill.close()  # what it held is dropped; from here on the bytes are only scanned
                        spill = None
                    if scanner is None:
                        scanner = IdScanner()  # no spill folder: the held head is all there is to scan
                        for earlier in (*held, part):
                            scanner.feed(earlier)
                    held.clear()
                elif spill is not None:
                    spill.write(part)
                else:
                    held.append(part)
                    if size > HELD_BYTES and self.spill_dir is not None:
                        spill, scanner = self._spill(held)
                if ended:
                    break
            if scanner is not None and size > self.max_bytes:
                return Oversize(size, scanner.scan)
            if spill is not None:
                spill.seek(0)
                return spill.read()
            return b"".join(held)
        finally:
            if spill is not None:
                spill.close()

    def _spill(self, held: list[bytes]) -> tuple[BinaryIO | None, IdScanner]:
        """Move the held head to a spill file, through a scanner; (None, scanner): keep holding in memory."""
        scanner = IdScanner()
        for part in held:
            scanner.feed(part)
        try:
            assert self.spill_dir is not None
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            spill = tempfile.TemporaryFile(dir=self.spill_dir)
            for part in held:
                spill.write(part)
        except OSError as exc:
            logger.warning("a large message stays in memory: no spill file in %s (%s)", self.spill_dir, exc)
            self.spill_dir = None
            return None, scanner
        held.clear()
        return spill, scanner


@asynccontextmanager
async def stdio_streams(
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    *,
    limit: MessageLimit = DEFAULT_LIMIT,
    spill_dir: Path | None = None,
) -> AsyncIterator[tuple[ReadStream, WriteStream]]:
    """The read and write streams of the MCP server over stdin/stdout (or the binary files given, unclaimed):
    lines up to `limit` (longer than `HELD_BYTES`: through a file in `spill_dir`), the rest refused."""
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
    reader = LineReader(stdin, limit.max_bytes, spill_dir)
    send_bytes = _direct_writer(stdout)
    read_send, read_receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_send, write_receive = anyio.create_memory_object_stream[SessionMessage](0)
    lock = anyio.Lock(fast_acquire=True)  # nearly always free: a reply need not pass through the loop first

    async def write(payload: str) -> None:
        async with lock:
            await send_bytes(payload.encode() + b"\n")

    async def read_lines() -> None:
        async with read_send:
            while True:
                line = await anyio.to_thread.run_sync(reader.read)
                if line is None:
                    return  # EOF: the client closed the pipe
                if isinstance(line, Oversize):
                    await refuse(line)
                    continue
                if not line.strip():
                    continue
                verdict = screen(line)
                if verdict.message is not None:
                    await read_send.send(SessionMessage(verdict.message))
                elif verdict.error is not None:
                    await write(verdict.error.model_dump_json(by_alias=True, exclude_unset=True))

    async def refuse(line: Oversize) -> None:
        if not line.scan.answered:
            logger.warning("dropped %s of %d bytes, over the %d-byte limit", line.scan.kind, line.size, limit.max_bytes)
            return
        reply = limit.refusal(line.scan, line.size)
        await write(reply.model_dump_json(by_alias=True, exclude_unset=True))

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
