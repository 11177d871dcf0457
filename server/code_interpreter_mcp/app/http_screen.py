"""The HTTP face of the JSON-RPC screen: an ASGI middleware that answers every malformed or oversized POST to the
MCP endpoint.

Owns reading a POST body once (up to the message limit, the SDK's own body cap set to the same), running
`jsonrpc.screen` on it, answering a bad one with its JSON-RPC error (HTTP 400, as the SDK does for a parse error)
and replaying a good one, byte for byte, to the SDK's transport. A body over the limit is read through without
being held, its id found on the way (`oversize`), and answered 413 with a JSON-RPC error carrying that id: the SDK
would answer a bare 413 before reading, which leaves the client without the id it waits on and, as the body was
not read, the connection unusable. Reading through is capped (`DRAIN_MAX_BYTES`); past it the answer goes out at
once and the server closes the connection. Knows nothing of sessions, auth or tools (auth runs inside, after the
screen: a malformed or oversized body is refused before any token check, which reveals nothing but the limit).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .jsonrpc import screen
from .oversize import IdScanner, MessageLimit

logger = logging.getLogger(__name__)

# A client that keeps sending is not read forever: it gets its answer and the connection closes.
DRAIN_MAX_BYTES = 2 * 1024 * 1024 * 1024
DEFAULT_LIMIT = MessageLimit(DEFAULT_MAX_REQUEST_BODY_SIZE, "")


class JsonRpcScreen:
    def __init__(self, app: ASGIApp, path: str = "/mcp", limit: MessageLimit = DEFAULT_LIMIT) -> None:
        self.app = app
        self.path = path.rstrip("/")
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != self.path:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, replayed(chunks, message, receive, more_body=bool(chunks)), send)
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = bool(message.get("more_body", False))
            if size > self.limit.max_bytes:
                await self._refuse(chunks, size, more, receive, send)
                return
        body = b"".join(chunks)
        verdict = screen(body) if body else None
        if verdict is not None and verdict.error is not None:
            await _answer(send, 400, verdict.error.model_dump(by_alias=True, exclude_unset=True))
            return
        await self.app(scope, replayed([body], None, receive), send)

    async def _refuse(self, chunks: list[bytes], size: int, more: bool, receive: Receive, send: Send) -> None:
        """Read the rest of an over-limit body through the id scanner only, then answer 413 with its id."""
        scanner = IdScanner()
        for chunk in chunks:
            scanner.feed(chunk)
        chunks.clear()
        while more and size <= DRAIN_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer
            chunk = message.get("body", b"")
            scanner.feed(chunk)
            size += len(chunk)
            more = bool(message.get("more_body", False))
        if not scanner.scan.answered:
            # Streamable HTTP: input the server does not take gets an error status, its body an error with no id.
            logger.warning(
                "refused %s of %d bytes, over the %d-byte limit", scanner.scan.kind, size, self.limit.max_bytes
            )
            scanner.scan.request_id = None
        reply = self.limit.refusal(scanner.scan, size, read_all=not more)
        await _answer(send, 413, reply.model_dump(by_alias=True, exclude_unset=True))


def replayed(chunks: list[bytes], pending: Message | None, receive: Receive, more_body: bool = False) -> Receive:
    """A receive that hands out what was read already, then continues with the client's own stream."""
    queue: list[Message] = [
        {"type": "http.request", "body": c, "more_body": more_body or i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    if pending is not None:
        queue.append(pending)

    async def receive_again() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return receive_again


async def _answer(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
