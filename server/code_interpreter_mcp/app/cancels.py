"""Client cancels of a call that waits for a run: what the person meant, read from `notifications/cancelled`.

The mcp 2.3 dispatcher cancels the handler's scope the moment a `notifications/cancelled` names it, before anything
of ours sees the notification, so the handler cannot read the reason. The notification then reaches the server
middleware (`middleware` here), which records its reason per (connection, request id). The abandoned call's
verdict (`verdict_for`) waits for that record, briefly, in the engine's task group: a reason that says the request
timed out (the TypeScript SDK's "Request timed out", the Python SDK's "timed out after 5s") keeps the run for
get_run; any other cancel interrupts it as cancel_run does. A call of the 2025 eras that ends with no
notification at all (the connection closed) keeps the run: runs outlive their requests. In the 2026-07-28 era an
HTTP client cancels by aborting its POST (the SDK's transport turns the cancel into that; there is no reason to
read), so there an abandoned call interrupts its run: with `wait_s` answering "running" well before any client's
timeout, an abort is a person's Stop. `CLIENT_CANCEL` = interrupt | keep overrides the rule. Owns that rule and the
records; knows nothing of runs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

TIMED_OUT = "timed out"
KEPT_RECORDS = 512  # cancels of requests that were not waiting for a run are forgotten past this
NOTIFICATION_WAIT_S = 1.0  # the notification reaches the middleware right after the scope's cancel; a bound only


def _connection(session: object) -> object:
    # The SDK builds a new ServerSession per inbound message; the Connection behind it is the one stable identity.
    return getattr(session, "_connection", session)


def aborts_cancel(protocol: str | None, transport: str) -> bool:
    """Whether an abandoned call with no notification was the client's cancel: a 2026-07-28 request over HTTP."""
    return transport == "http" and protocol in MODERN_PROTOCOL_VERSIONS


def interrupts(reason: str | None, mode: str) -> bool:
    """Whether a client's cancel with this reason stops the run, under `CLIENT_CANCEL=mode`."""
    if mode == "keep":
        return False
    if mode == "interrupt":
        return True
    return TIMED_OUT not in (reason or "").lower()


@dataclass
class _Record:
    seen: anyio.Event = field(default_factory=anyio.Event)
    reason: str | None = None


class CancelReasons:
    def __init__(self) -> None:
        self._records: OrderedDict[tuple[int, str], _Record] = OrderedDict()

    def _record(self, key: tuple[int, str]) -> _Record:
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = _Record()
            while len(self._records) > KEPT_RECORDS:
                self._records.popitem(last=False)
        return record

    def observed(self, connection: object, request_id: Any, reason: Any) -> None:
        record = self._record((id(_connection(connection)), str(request_id)))
        record.reason = reason if isinstance(reason, str) else None
        record.seen.set()

    def verdict_for(
        self, connection: object, request_id: Any, mode: str, aborts: bool = False
    ) -> Callable[[], Awaitable[bool]]:
        """For a call waiting on a run: once it is cancelled, whether the run should be interrupted. `aborts`: the
        call is a 2026-07-28 HTTP request, which a client cancels by aborting it (no notification comes)."""
        key = (id(_connection(connection)), str(request_id))

        async def verdict() -> bool:
            if mode != "auto":
                return mode == "interrupt"
            record = self._record(key)
            with anyio.move_on_after(0.0 if aborts else NOTIFICATION_WAIT_S):
                await record.seen.wait()
            self._records.pop(key, None)
            if not record.seen.is_set():
                return aborts  # else the connection went away, and the run outlives it
            return interrupts(record.reason, mode)

        return verdict

    async def middleware(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """Server middleware: the reason of each `notifications/cancelled`, recorded before it is handed on."""
        if ctx.method == "notifications/cancelled" and ctx.request_id is None:
            params = ctx.params or {}
            if "requestId" in params:
                self.observed(ctx.session, params["requestId"], params.get("reason"))
        return await call_next(ctx)


REASONS = CancelReasons()
