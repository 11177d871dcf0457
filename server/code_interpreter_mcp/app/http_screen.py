"""The HTTP face of the JSON-RPC screen: an ASGI middleware that answers every malformed POST to the MCP endpoint.

Owns reading a POST body once (up to the SDK's own body cap), running `jsonrpc.screen` on it, answering a bad one
with its JSON-RPC error (HTTP 400, as the SDK does for a parse error) and replaying a good one, byte for byte, to
the SDK's transport. A body over the cap is passed on unread so the SDK refuses it with its 413. Knows nothing of
sessions, auth or tools (auth runs inside, after the screen: a malformed body is refused before any token check,
which reveals nothing).
"""

from __future__ import annotations

import json
from typing import Any

from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .jsonrpc import screen


class JsonRpcScreen:
    def __init__(self, app: ASGIApp, path: str = "/mcp", max_body: int = DEFAULT_MAX_REQUEST_BODY_SIZE) -> None:
        self.app = app
        self.path = path.rstrip("/")
        self.max_body = max_body

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
                await self.app(scope, _replay([], message, receive), send)
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = bool(message.get("more_body", False))
            if size > self.max_body and more:
                await self.app(scope, _replay(chunks, None, receive, more_body=True), send)
                return
        body = b"".join(chunks)
        verdict = screen(body) if body and size <= self.max_body else None
        if verdict is not None and verdict.error is not None:
            await _answer(send, verdict.error.model_dump(by_alias=True, exclude_unset=True))
            return
        await self.app(scope, _replay([body], None, receive), send)


def _replay(chunks: list[bytes], pending: Message | None, receive: Receive, more_body: bool = False) -> Receive:
    """A receive that hands out what was read already, then continues with the client's own stream."""
    queue: list[Message] = [
        {"type": "http.request", "body": c, "more_body": more_body or i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    if pending is not None:
        queue.append(pending)

    async def replayed() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replayed


async def _answer(send: Send, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})
