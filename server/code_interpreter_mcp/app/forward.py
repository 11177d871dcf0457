"""Tool calls forwarded between replicas: a call that reaches a replica other than its session's home is sent on
to the home over HTTP, signed with `CLUSTER_SECRET`, and the home's answer (its progress on the way) comes back.

- `target`: where a call goes. Local when no replicas are configured, when the call names no session (a new one is
  made here), when this replica holds the session (from memory: the warm path asks the database nothing), or when
  its home is gone (this replica adopts it, `engine.homes`). Else the home's address.
- `forward`: the same `tools/call` posted to the home's `/mcp` in the 2026-07-28 era (no handshake), with the
  caller's bearer token (so the home derives the same owner: tokens never see each other's sessions on any
  replica), the client's name (so the home shapes the text for it), and a progress token whose notifications are
  relayed to the caller.
- A forwarded `run_code` carries the run id the forwarder chose (in `_meta`, under the signature), so that the
  client's cancel of the call (`notifications/cancelled`, judged by `cancels` as for a local call) is passed on to
  the home as a `cancel_run` of that run (`pass_cancel`); a forwarded `get_run` names its run already.
- `ForwardScreen`: on the home, an ASGI middleware. A request that says it is forwarded (`X-CI-Forward`) must carry
  an HMAC-SHA256 of its timestamp and body under `CLUSTER_SECRET`, at most `MAX_SKEW_S` old; anything else is
  refused (401) before the MCP layer sees it. A verified one is served here, never forwarded again. The same
  screen serves the replicas' own calls, `POST /cluster/<name>` (signed the same way; `Forwarder.internal`), such
  as `stop-idle` for the per-owner cap (`engine.owner_caps`); unsigned ones are refused alike.

Knows the engine's homes and leases, HTTP and JSON-RPC; nothing of what the tools do.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import anyio
import httpx2
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp_types import CLIENT_CAPABILITIES_META_KEY, CLIENT_INFO_META_KEY, PROTOCOL_VERSION_META_KEY

from ..engine import Engine
from ..errors import SessionElsewhere

logger = logging.getLogger(__name__)

HEADER = "x-ci-forward"
MODE_HEADER = "x-ci-forward-mode"
TOOL, RAW = "tool", "raw"
"""The two kinds of forwarded request: a tool call made by the forwarder (`Forwarder.call`: its result is left
whole for the forwarder, which judges its caller's cancel), or the client's own 2026-07-28 request passed on as it
came (`passthrough`: served as the client's, shaped for it, stopped when it is aborted). The mode is signed."""
HEADER_B, MODE_HEADER_B = HEADER.encode(), MODE_HEADER.encode()
CLUSTER_PATH = "/cluster/"
INTERNAL_TIMEOUT_S = 30.0  # a stop-idle writes the stopped worker's snapshot first
Internal = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Serves a replica's own call: (name, payload) -> JSON answer."""
RUN_ID_META = "io.github.code-interpreter-mcp/run-id"
_RUN_ID = re.compile(r"r_[0-9a-f]{32}")
CANCEL_TRIES = 8
CANCEL_RETRY_S = 0.25
"""A cancel can overtake the call it stops (the home has not started the run yet): it is tried again, briefly."""
MAX_SKEW_S = 60.0
MODERN = "2026-07-28"
RUN_ROW_WAIT_S = 0.6
"""A run unknown here is looked up once more after this long: its home writes its start with the next registry
flush (a few times a second), and a caller may name it on another replica before that."""

KNOWN_HOMES = 10_000
_HOMES: dict[str, tuple[str, float]] = {}
"""Session id -> (its live home, until when that is taken as known): a home is asked of the registry at most every
`LEASE_S / 3` per session (a home that died meanwhile fails the forward, which forgets it), so a forwarded warm
call costs no database round trip."""

FORWARDED: ContextVar[str] = ContextVar("ci_forwarded", default="")
"""The mode (`TOOL` or `RAW`) of a verified forwarded request, served here and never forwarded again; "" else."""


def signature(secret: str, timestamp: str, body: bytes, mode: str = TOOL) -> str:
    digest = hashlib.sha256(body).hexdigest()
    return hmac.new(secret.encode(), f"{timestamp}\n{mode}\n{digest}".encode(), hashlib.sha256).hexdigest()


def signed_header(secret: str, body: bytes, mode: str = TOOL) -> str:
    ts = f"{time.time():.3f}"
    return f"{ts}.{signature(secret, ts, body, mode)}"


def verified(secret: str | None, value: str, body: bytes, mode: str = TOOL) -> bool:
    if not secret:
        return False
    ts, _, sig = value.rpartition(".")
    try:
        fresh = abs(time.time() - float(ts)) <= MAX_SKEW_S
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sig, signature(secret, ts, body, mode))


# ---- the forwarder's side --------------------------------------------------------------------------------------


async def target(engine: Engine, tool: str, arguments: dict[str, Any]) -> str | None:
    """The home to forward this call to, or None to serve it here."""
    homes = engine.ctx.homes
    if homes is None or FORWARDED.get() or engine.settings.cluster_secret is None:
        return None
    sid = arguments.get("session_id")
    if not isinstance(sid, str) and tool in ("get_run", "cancel_run"):
        run_id = str(arguments.get("run_id", ""))
        row = await engine.reg.load_run(run_id)
        if row is None and not engine.runs.knows(run_id):  # a run's start is written a moment after it starts
            await anyio.sleep(RUN_ROW_WAIT_S)
            row = await engine.reg.load_run(run_id)
        sid = row.session_id if row is not None else None
    if not isinstance(sid, str) or (sid in homes.held and homes.on_time):
        return None
    known = _HOMES.get(sid)
    if known is not None and known[1] > time.monotonic():
        return known[0]
    leases = homes.leases
    home = await anyio.to_thread.run_sync(leases.home_of, sid)
    if home is None or home[0] in ("", leases.replica):
        return None
    if not await anyio.to_thread.run_sync(leases.alive, home[0]):
        if not (await homes.settled() and await anyio.to_thread.run_sync(leases.alive, home[0])):
            winner = await homes.claim(sid)  # adopt it here; a replica that won the race gets the call
            if winner is None:
                return None
            home = (winner, 0)
    if len(_HOMES) >= KNOWN_HOMES:
        _HOMES.clear()
    _HOMES[sid] = (home[0], time.monotonic() + leases.lease_s / 3)
    return home[0]


def forget_home(session_id: str) -> None:
    """The home did not answer, or refused the call: asked again from the registry next time."""
    _HOMES.pop(session_id, None)


class Forwarder:
    def __init__(self, secret: str, timeout_s: float) -> None:
        self.secret = secret
        timeout = httpx2.Timeout(timeout_s, connect=5.0)
        self.client = httpx2.AsyncClient(timeout=timeout, limits=httpx2.Limits(max_keepalive_connections=32))

    async def call(
        self,
        home: str,
        tool: str,
        arguments: dict[str, Any],
        client: str | None,
        progress: Callable[[float, float | None, str | None], Awaitable[None]] | None,
        bearer: str | None,
        run_id: str | None = None,
    ) -> dict[str, Any]:
        """The home's `tools/call` result (its wire form), made with the caller's bearer token; SessionElsewhere
        when the home does not answer."""
        meta: dict[str, Any] = {
            PROTOCOL_VERSION_META_KEY: MODERN,
            CLIENT_INFO_META_KEY: {"name": client or "code-interpreter-replica", "version": "0"},
            CLIENT_CAPABILITIES_META_KEY: {},
        }
        if run_id is not None:
            meta[RUN_ID_META] = run_id
        if progress is not None:
            meta["progressToken"] = "fw_" + secrets.token_hex(8)
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": tool, "arguments": arguments, "_meta": meta},
            }
        ).encode()
        headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": MODERN,
            "mcp-method": "tools/call",
            "mcp-name": tool,
            HEADER: signed_header(self.secret, body),
        }
        if bearer is not None:
            headers["authorization"] = f"Bearer {bearer}"
        try:
            async with self.client.stream("POST", home.rstrip("/") + "/mcp", content=body, headers=headers) as resp:
                if resp.headers.get("content-type", "").startswith("text/event-stream"):
                    return await _from_events(resp, progress)
                data = json.loads(await resp.aread())
        except (httpx2.HTTPError, ValueError) as exc:
            raise home_unanswered(home, exc) from None
        return _result(data, home)

    async def internal(self, replica: str, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A replica's own call to another (`/cluster/<name>`): its JSON answer."""
        body = json.dumps(payload).encode()
        headers = {"content-type": "application/json", HEADER: signed_header(self.secret, body)}
        url = f"{replica.rstrip('/')}/cluster/{name}"
        resp = await self.client.post(url, content=body, headers=headers, timeout=INTERNAL_TIMEOUT_S)
        resp.raise_for_status()
        answer = resp.json()
        return answer if isinstance(answer, dict) else {}

    async def aclose(self) -> None:
        await self.client.aclose()


def home_unanswered(home: str, exc: BaseException) -> SessionElsewhere:
    """The retryable error of a call its home did not answer (nothing is run twice: the caller tries again)."""
    return SessionElsewhere(
        f"The session's home replica {home} did not answer ({type(exc).__name__}).",
        "Try again in a few seconds: once its lease runs out another replica takes the session over.",
    )


async def _from_events(
    resp: httpx2.Response, progress: Callable[[float, float | None, str | None], Awaitable[None]] | None
) -> dict[str, Any]:
    data: list[str] = []
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].strip())
            continue
        if line or not data:
            continue
        message = json.loads("\n".join(data))
        data = []
        if message.get("method") == "notifications/progress" and progress is not None:
            p = message.get("params") or {}
            await progress(float(p.get("progress", 0)), p.get("total"), p.get("message"))
        elif "result" in message or "error" in message:
            return _result(message, str(resp.url))
    raise ValueError("the home's event stream ended without an answer")


def _result(message: dict[str, Any], home: str) -> dict[str, Any]:
    if isinstance(message.get("result"), dict):
        return message["result"]
    error = message.get("error") or {}
    raise SessionElsewhere(f"The session's home replica {home} refused the call: {str(error.get('message'))[:300]}")


def caller_token() -> str | None:
    """The bearer token of the call being served (the home derives the same owner from it)."""
    token = get_access_token()
    return token.token if token is not None else None


async def pass_cancel(
    forwarder: Forwarder,
    home: str,
    run_id: str,
    session_id: object,
    bearer: str | None,
    verdict: Callable[[], Awaitable[bool]],
) -> None:
    """After a forwarded call was cancelled: the home's run stops too when the client's cancel means it (the
    verdict: a stop, not a timeout, under CLIENT_CANCEL), as it would on the home itself."""
    if not await verdict():
        return
    arguments: dict[str, Any] = {"run_id": run_id}
    if isinstance(session_id, str):
        arguments["session_id"] = session_id
    for _ in range(CANCEL_TRIES):
        try:
            wire = await forwarder.call(home, "cancel_run", arguments, None, None, bearer)
        except SessionElsewhere as exc:
            logger.warning("cancel of run %s not passed on to %s: %s", run_id, home, exc.message)
            return
        if not wire.get("isError"):
            return
        await anyio.sleep(CANCEL_RETRY_S)  # not started there yet, most likely
    logger.warning("cancel of run %s not taken by %s", run_id, home)


def forwarded_run_id(meta: object) -> str | None:
    """The run id a forwarding replica chose for this call (only ever read from a verified forwarded request)."""
    if not FORWARDED.get() or not isinstance(meta, dict):
        return None
    value = meta.get(RUN_ID_META)
    return value if isinstance(value, str) and _RUN_ID.fullmatch(value) else None


_FORWARDERS: dict[str, Forwarder] = {}


def forwarder_of(engine: Engine) -> Forwarder:
    secret = engine.settings.cluster_secret
    assert secret is not None  # target() forwards nothing without one
    return forwarder_for(secret.get_secret_value(), engine.settings.max_wait_s + 120)


def forwarder_for(secret: str, timeout_s: float) -> Forwarder:
    """One client (its pool of connections to the other replicas) per secret, for the process's life."""
    made = _FORWARDERS.get(secret)
    if made is None:
        made = _FORWARDERS[secret] = Forwarder(secret, timeout_s)
    return made


# ---- the home's side --------------------------------------------------------------------------------------------


class ForwardScreen:
    """ASGI middleware: a forwarded request is verified before anything else sees it (see the module's docstring)."""

    def __init__(self, app: Any, secret: str | None, max_bytes: int, internal: Internal | None = None) -> None:
        self.app, self.secret, self.max_bytes, self.internal = app, secret, max_bytes, internal

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        claimed = mode = None
        for k, v in scope.get("headers") or []:
            if k == HEADER_B:
                claimed = v
            elif k == MODE_HEADER_B:
                mode = v.decode("latin-1")
        mode = mode or TOOL
        cluster = str(scope.get("path", "")).startswith(CLUSTER_PATH)
        if claimed is None and cluster:
            return await _refuse(send, 401, "a replica's call that is not signed with CLUSTER_SECRET is refused")
        if claimed is None:
            return await self.app(scope, receive, send)
        body = bytearray()
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _refuse(send, 413, "the forwarded request is over the message limit")
        if mode not in (TOOL, RAW) or (cluster and mode != TOOL):
            return await _refuse(send, 401, "a forwarded request of an unknown kind is refused")
        if not verified(self.secret, claimed.decode("latin-1"), bytes(body), mode):
            return await _refuse(send, 401, "a forwarded request that is not signed with CLUSTER_SECRET is refused")
        if cluster:
            return await self._serve_internal(str(scope["path"])[len(CLUSTER_PATH) :], bytes(body), send)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        token = FORWARDED.set(mode)
        try:
            await self.app(scope, replay, send)
        finally:
            FORWARDED.reset(token)

    async def _serve_internal(self, name: str, body: bytes, send: Any) -> None:
        try:
            payload = json.loads(body)
            if self.internal is None or not isinstance(payload, dict):
                raise ValueError("no such call")
            answer = await self.internal(name, payload)
        except Exception as exc:  # a replica's call is never the server's crash
            logger.warning("replica call %s failed: %s", name, exc)
            return await _refuse(send, 400, f"the replica call {name!r} failed")
        data = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


async def _refuse(send: Any, status: int, message: str) -> None:
    payload = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})
