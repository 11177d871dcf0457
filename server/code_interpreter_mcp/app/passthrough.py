"""A 2026-07-28 `tools/call` for a session homed on another replica, passed to the home as it came (HTTP level).

In the 2026-07-28 era a request stands alone: no handshake and no MCP session, the protocol version, client info
and capabilities in its own `_meta`, the bearer token in its own header. Such a request means the same on any
replica, so the one that got it need not serve it through the MCP layer and then call the home again
(`forward.Forwarder.call`, the tool-level forward): it sends the bytes on, signed as a pass-through
(`forward.RAW`), and streams the home's answer (JSON, or the event stream with its progress) back unchanged. The
home serves it as the client's own request, shaped for that client, and an aborted request stops its run there
as it would on the home itself (the client's disconnect closes the upstream request).

Which requests: POST to the MCP path, `MCP-Protocol-Version: 2026-07-28`, no `Mcp-Session-Id`, one JSON-RPC
`tools/call` of a tool whose session (or run) `forward.target` places on another live replica, not made as a task
(tasks are answered by the tool layer here), from an authenticated caller when auth is on. Anything else, and a
home that cannot be reached before it answered, goes to the app: the tool-level path then routes it (and adopts
the session if its home is gone).

Sits inside the SDK's authentication (it sees the caller's verified identity) and outside its transport.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2

from ..engine import Engine
from ..errors import SessionElsewhere
from ..sessions import new_id
from . import forward
from .http_screen import replayed

logger = logging.getLogger(__name__)

SERVED_BY = b"x-ci-home"
"""Response header naming the replica that served a passed-through request (for operators and tests)."""
_HOP = {b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade"}
_HOP |= {forward.HEADER_B, forward.MODE_HEADER_B}
_SENT_BACK_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"date", b"server"}


class PassThrough:
    def __init__(self, app: Any, engine_of: Callable[[], Engine | None], path: str = "/mcp") -> None:
        self.app, self.engine_of, self.path = app, engine_of, path.rstrip("/")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        engine = self.engine_of()
        if (
            engine is None
            or engine.ctx.homes is None
            or scope.get("type") != "http"
            or scope.get("method") != "POST"
            or str(scope.get("path", "")).rstrip("/") != self.path
            or forward.FORWARDED.get()
            or not _modern_sessionless(scope)
            or not _authenticated(scope)
        ):
            return await self.app(scope, receive, send)
        body, tail = await _read_body(receive)
        replay = replayed([body], tail, receive, more_body=tail is not None)
        if tail is not None:  # the client left while sending
            return await self.app(scope, replay, send)
        route = await _route(engine, body)
        if route is None:
            return await self.app(scope, replay, send)
        forwarder = forward.forwarder_of(engine)
        aborted = await self._pass(forwarder, route, scope, receive, send)
        if aborted is None:
            if route.session_id is not None:
                forward.forget_home(route.session_id)
            await self.app(scope, replay, send)
        elif aborted and route.run_id is not None and engine.runs.task_group is not None:
            # The client stopped its call: the run stops too (a 2026-07-28 abort is a Stop) unless CLIENT_CANCEL
            # keeps runs. Said to the home as a cancel_run of the run id it was given, as for a tool-level forward:
            # the home may only notice the closed request when it next writes to it.
            if engine.settings.client_cancel != "keep":
                bearer = forward.caller_token()
                engine.runs.task_group.start_soon(
                    forward.pass_cancel, forwarder, route.home, route.run_id, route.session_id, bearer, _stop
                )

    async def _pass(
        self, forwarder: forward.Forwarder, route: Route, scope: Any, receive: Any, send: Any
    ) -> bool | None:
        """Stream the request to the home and its answer back. None when the home could not be reached before it
        answered (the caller then serves the request itself); else whether the client went away before the end."""
        home, body = route.home, route.body
        headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() not in _HOP]
        headers.append((forward.HEADER_B, forward.signed_header(forwarder.secret, body, forward.RAW).encode()))
        headers.append((forward.MODE_HEADER_B, forward.RAW.encode()))
        url = home.rstrip("/") + self.path
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        request = forwarder.client.build_request("POST", url, content=body, headers=headers)
        left = anyio.Event()
        reached, answered = True, False
        upstream: httpx2.Response | None = None
        try:
            async with anyio.create_task_group() as tg:
                # From the start: a JSON answer's headers come only with the result, and the client may stop before.
                tg.start_soon(_watch_disconnect, receive, tg.cancel_scope, left)
                try:
                    upstream = await forwarder.client.send(request, stream=True)
                except httpx2.ConnectError as exc:  # nothing reached the home: safe to serve here
                    logger.info("pass-through to %s failed (%s): served here", home, type(exc).__name__)
                    reached = False
                    tg.cancel_scope.cancel()
                else:
                    await _relay(upstream, home, send)
                    answered = True  # a disconnect seen from here on is the end of the exchange, not a Stop
                    tg.cancel_scope.cancel()
        except OSError:  # the client's connection broke under a write
            left.set()
        except httpx2.HTTPError as exc:  # the home went away with the request: never run twice, say so
            logger.info("pass-through to %s cut short: %s", home, type(exc).__name__)
            if route.session_id is not None:
                forward.forget_home(route.session_id)  # asked of the registry again next time
            if upstream is None:
                await _unanswered(send, route.request_id, forward.home_unanswered(home, exc))
        finally:
            if upstream is not None:
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()  # unread: the connection is closed, and the home sees the abort
        if not reached and not left.is_set():
            return None
        return left.is_set() and not answered


async def _unanswered(send: Any, request_id: Any, error: SessionElsewhere) -> None:
    """The tool error a tool-level forward gives when the home does not answer (`forward.Forwarder.call`)."""
    result = {"content": [{"type": "text", "text": error.user_text()}], "isError": True}
    payload = {"jsonrpc": "2.0", "id": request_id, "result": result}
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _relay(upstream: httpx2.Response, home: str, send: Any) -> None:
    headers = [(k.lower(), v) for k, v in upstream.headers.raw if k.lower() not in _SENT_BACK_HOP]
    headers.append((SERVED_BY, home.encode()))
    await send({"type": "http.response.start", "status": upstream.status_code, "headers": headers})
    async for chunk in upstream.aiter_raw():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _watch_disconnect(receive: Any, scope: anyio.CancelScope, left: anyio.Event) -> None:
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            left.set()
            scope.cancel()
            return


async def _stop() -> bool:
    return True


def _modern_sessionless(scope: Any) -> bool:
    version, session = None, None
    for k, v in scope.get("headers") or []:
        if k == b"mcp-protocol-version":
            version = v
        elif k == b"mcp-session-id":
            session = v
    return version == forward.MODERN.encode() and session is None


def _authenticated(scope: Any) -> bool:
    """With auth on, the SDK's middleware put the caller in the scope; an unverified caller is the app's to refuse
    (and never costs a registry lookup here)."""
    user = scope.get("user")
    return user is None or bool(getattr(user, "is_authenticated", False))


async def _read_body(receive: Any) -> tuple[bytes, dict[str, Any] | None]:
    """The whole body (the screen outside has capped its size), and the message that ended it early, if any."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message.get("type") != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


@dataclass
class Route:
    home: str
    body: bytes  # as sent on: a run_code's carries the run id chosen here (in `_meta`, under the signature)
    session_id: str | None
    run_id: str | None
    request_id: Any


async def _route(engine: Engine, body: bytes) -> Route | None:
    """Where a pass-through request goes when its home is another replica; None otherwise."""
    try:
        message = json.loads(body)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("method") != "tools/call" or "id" not in message:
        return None
    params = message.get("params")
    if not isinstance(params, dict) or "task" in params:
        return None
    name, arguments = params.get("name"), params.get("arguments")
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    try:
        home = await forward.target(engine, name, {k: v for k, v in arguments.items() if v is not None})
    except Exception as exc:  # the registry did not answer: the tool layer gives the retryable error
        logger.debug("pass-through routing failed: %s", exc)
        return None
    if home is None:
        return None
    sid = arguments.get("session_id")
    run_id = None
    if name == "run_code":
        meta = params.setdefault("_meta", {})
        if not isinstance(meta, dict):
            return None
        meta[forward.RUN_ID_META] = run_id = new_id("r_")
        body = json.dumps(message).encode()
    return Route(home, body, sid if isinstance(sid, str) else None, run_id, message["id"])
