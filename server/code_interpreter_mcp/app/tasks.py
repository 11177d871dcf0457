"""MCP tasks over the engine's runs: the 2025-11-25 `tasks` capability and the 2026-07-28
`io.modelcontextprotocol/tasks` extension, both mapped onto the same run registry as `get_run`/`cancel_run`.

A task is a run: its task id is the run's `run_id`, `tasks/get` is `get_run` without waiting, the task's result
is the `run_code` result the run ends with, and `tasks/cancel` is `cancel_run`. Ownership is the run's (the
token's owner), so a task is never visible to another owner.

- 2025-11-25: a `tools/call` of `run_code` with a `task` param is answered at once with `CreateTaskResult`
  (`{task: {...}}`); `tasks/get` returns the task, `tasks/result` waits for the run and returns its
  `CallToolResult`, `tasks/cancel` stops it. The server advertises `capabilities.tasks` and `run_code` says
  `execution.taskSupport: "optional"`.
- 2026-07-28: a `run_code` call whose request declares the extension waits briefly (quick runs return their
  result as usual) and then answers with `resultType: "task"`; `tasks/get` returns the task with its result
  inlined once completed; `tasks/cancel` acknowledges. Requests without the extension are refused with -32021.

Clients that negotiate neither keep `wait_s`/`get_run`. The tools/call answer is shaped in a server middleware,
because the legacy CreateTaskResult is not a CallToolResult and the SDK sieves tool results to that shape. Knows
nothing of how runs work beyond the engine's calls.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, TextContent
from mcp_types import CancelTaskRequestParams, GetTaskPayloadRequestParams, GetTaskRequestParams
from mcp_types.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS, MISSING_REQUIRED_CLIENT_CAPABILITY
from mcp_types.methods import serialize_server_result
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from ..engine import Engine, RunOutput
from ..errors import CIError, RunNotFound
from ..models import RunResult
from ..sessions import new_id
from . import cancels, content, forward
from .auth import current_owner
from .clients import client_name, client_profile

EXTENSION_ID = "io.modelcontextprotocol/tasks"
CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
RELATED_TASK = "io.modelcontextprotocol/related-task"
LEGACY_TASKS_VERSION = "2025-11-25"
TASK_TOOLS = frozenset({"run_code"})
POLL_MS = 1000
KEPT_IMMEDIATE = 256
MODERN_TASK_WAIT_S = 1.0  # a quick run answers with its result; a longer one with a task after this long

_task_wait: ContextVar[float | None] = ContextVar("task_wait", default=None)


def task_wait(wait_s: float | None) -> float | None:
    """The wait of the tool call being handled: short when it is made as a task, else the caller's own."""
    override = _task_wait.get()
    if override is None:
        return wait_s
    return override if wait_s is None else min(wait_s, override)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _working_message(r: RunResult) -> str:
    if r.status == "queued":
        return f"Queued behind {r.waits_for} ({r.position} run(s) of the session go first)."
    last = (r.stdout or r.stderr).rstrip().rsplit("\n", 1)[-1][-200:]
    return f"Running for {r.elapsed_s or 0:.0f} s" + (f"; last output: {last}" if last else ".")


def _declares_extension(params: Mapping[str, Any] | None) -> bool:
    meta = (params or {}).get("_meta")
    caps = meta.get(CAPABILITIES_KEY) if isinstance(meta, Mapping) else None
    extensions = caps.get("extensions") if isinstance(caps, Mapping) else None
    return isinstance(extensions, Mapping) and EXTENSION_ID in extensions


class RunTasks(Extension):
    identifier = EXTENSION_ID

    def __init__(self) -> None:
        # When each task was made, for createdAt (a task of an earlier process reports its first sighting).
        self._created: dict[str, float] = {}
        # Legacy task calls answered without a run (refused arguments, a busy session): their final results.
        self._immediate: dict[str, dict[str, Any]] = {}
        # The statusMessage of a working task as its last poll saw it (elapsed time, newest output line).
        self._working: dict[str, str] = {}

    def methods(self) -> list[MethodBinding]:
        legacy = frozenset({LEGACY_TASKS_VERSION})
        return [
            MethodBinding("tasks/get", GetTaskRequestParams, self._get),
            MethodBinding("tasks/cancel", CancelTaskRequestParams, self._cancel),
            MethodBinding("tasks/result", GetTaskPayloadRequestParams, self._result, protocol_versions=legacy),
        ]

    # ---- tools/call as a task ------------------------------------------------------------------------------

    async def middleware(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """Server middleware: a task-augmented `run_code` call gets a task handle instead of waiting."""
        params = ctx.params or {}
        if ctx.method != "tools/call" or params.get("name") not in TASK_TOOLS:
            return await call_next(ctx)
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        if modern and not _declares_extension(params):
            return await call_next(ctx)
        if not modern and not (ctx.protocol_version == LEGACY_TASKS_VERSION and isinstance(params.get("task"), dict)):
            return await call_next(ctx)
        token = _task_wait.set(MODERN_TASK_WAIT_S if modern else 0.0)
        try:
            result = await call_next(ctx)
        finally:
            _task_wait.reset(token)
        wire = dict(result) if isinstance(result, Mapping) else {}
        run = wire.get("structuredContent") or {}
        if run.get("status") in ("queued", "running") and run.get("run_id"):
            task = self._task_fields(run["run_id"], None, modern)
        elif modern:
            return result  # finished within the brief wait, or refused: the plain result
        else:
            task_id = new_id("t_")
            self._immediate[task_id] = wire
            while len(self._immediate) > KEPT_IMMEDIATE:
                del self._immediate[next(iter(self._immediate))]
            task = self._task_fields(task_id, wire, modern)
        if modern:
            return {"resultType": "task", **task}
        return {"task": task}

    # ---- the task methods ----------------------------------------------------------------------------------

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: GetTaskRequestParams) -> dict[str, Any]:
        modern = self._check(ctx)
        return self._task_fields(params.task_id, await self._final(ctx, params.task_id, 0.0), modern)

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: CancelTaskRequestParams) -> dict[str, Any]:
        modern = self._check(ctx)
        engine: Engine = ctx.lifespan_context
        # CLIENT_CANCEL=keep: no cancel of a client stops a run, tasks/cancel neither (cancel_run still does).
        if params.task_id not in self._immediate and engine.settings.client_cancel != "keep":
            await self._call(ctx, params.task_id, cancel=True)
        if modern:
            return {}
        return self._task_fields(params.task_id, await self._final(ctx, params.task_id, 0.0), modern)

    async def _result(self, ctx: ServerRequestContext[Any, Any], params: GetTaskPayloadRequestParams) -> dict[str, Any]:
        wire = await self._final(ctx, params.task_id, None)
        assert wire is not None  # waited without a limit
        if "error" in wire:
            raise MCPError(code=INTERNAL_ERROR, message=wire["error"]["message"])
        meta = {**wire.get("_meta", {}), RELATED_TASK: {"taskId": params.task_id}}
        return {**wire, "_meta": meta}

    def _check(self, ctx: ServerRequestContext[Any, Any]) -> bool:
        """Whether the request is of the modern era; one there must declare the extension."""
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        if modern and not _declares_extension(ctx.params):
            raise MCPError(
                code=MISSING_REQUIRED_CLIENT_CAPABILITY,
                message="Missing required client capability",
                data={"requiredCapabilities": {"extensions": {EXTENSION_ID: {}}}},
            )
        return modern

    async def _call(
        self, ctx: ServerRequestContext[Any, Any], task_id: str, wait_s: float | None = 0.0, cancel: bool = False
    ) -> RunOutput | CallToolResult:
        """The run's state (`get_run`, or `cancel_run`): from this replica, or the `get_run`/`cancel_run` result
        of the replica that is its session's home."""
        engine: Engine = ctx.lifespan_context
        home = await forward.target(engine, "get_run", {"run_id": task_id})
        if home is not None:
            return await self._call_home(engine, home, task_id, wait_s, cancel, client_name(ctx))
        try:
            if cancel:
                return await engine.cancel_run(task_id, current_owner())
            aborts = cancels.aborts_cancel(ctx.protocol_version, engine.settings.transport)
            verdict = cancels.REASONS.verdict_for(ctx.session, ctx.request_id, engine.settings.client_cancel, aborts)
            return await engine.get_run(task_id, current_owner(), None, wait_s, None, verdict)
        except RunNotFound:
            raise MCPError(code=INVALID_PARAMS, message="Failed to retrieve task: Task not found") from None

    async def _call_home(
        self, engine: Engine, home: str, task_id: str, wait_s: float | None, cancel: bool, client: str | None
    ) -> CallToolResult:
        forwarder, bearer = forward.forwarder_of(engine), forward.caller_token()
        if cancel:
            return CallToolResult.model_validate(
                await forwarder.call(home, "cancel_run", {"run_id": task_id}, client, None, bearer)
            )
        while True:  # no limit (tasks/result): the home's longest wait, again until the run ends
            wait = engine.settings.max_wait_s if wait_s is None else wait_s
            wire = await forwarder.call(home, "get_run", {"run_id": task_id, "wait_s": wait}, client, None, bearer)
            result = CallToolResult.model_validate(wire)
            run = result.structured_content or {}
            if wait_s is not None or result.is_error or run.get("status") not in ("queued", "running"):
                if result.is_error and "No run" in str(result.content):
                    raise RunNotFound(f"No run {task_id!r} is known for this client.")
                return result

    async def _final(
        self, ctx: ServerRequestContext[Any, Any], task_id: str, wait_s: float | None
    ) -> dict[str, Any] | None:
        """The task's final tools/call result on the wire (an `error` entry when it failed), None while it runs."""
        if task_id in self._immediate:
            return self._immediate[task_id]
        try:
            out = await self._call(ctx, task_id, wait_s)
        except CIError as exc:  # the run could not start or went wrong outside the code
            result = CallToolResult(content=[TextContent(text=str(content.tool_error(exc)))], is_error=True)
        else:
            run = out.result if isinstance(out, RunOutput) else _run_of(out)
            if run is not None and run.status in ("queued", "running"):
                self._working[task_id] = _working_message(run)
                return None
            if run is not None and run.status == "lost":
                message = run.error.message if run.error else "The run was lost."
                return {"error": {"code": INTERNAL_ERROR, "message": message}, "lost": True}
            if isinstance(out, CallToolResult):
                result = out  # shaped by the home for this client already
            else:
                result = content.run_result(out, client_profile(ctx, ctx.lifespan_context.settings))
        dumped = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        return serialize_server_result("tools/call", ctx.protocol_version, dumped)

    def _task_fields(self, task_id: str, wire: dict[str, Any] | None, modern: bool) -> dict[str, Any]:
        now = time.time()
        created = self._created.setdefault(task_id, now)
        run = (wire or {}).get("structuredContent") or {}
        if wire is None:
            status, message = "working", self._working.pop(task_id, "The code is running.")
        elif "error" in wire:
            status, message = "failed", wire["error"]["message"]
        elif run.get("status") == "cancelled":
            status, message = "cancelled", "The run was cancelled."
        else:
            status, message = "completed", f"The run ended: {run.get('status', 'error')}."
        task: dict[str, Any] = {
            "taskId": task_id,
            "status": status,
            "statusMessage": message,
            "createdAt": _iso(created),
            "lastUpdatedAt": _iso(now),
        }
        if not modern:
            return {**task, "ttl": None, "pollInterval": POLL_MS}
        task.update(ttlMs=None, pollIntervalMs=POLL_MS)
        if status == "completed" and wire is not None:
            task["result"] = wire
        elif status == "failed" and wire is not None:
            task["error"] = wire["error"]
        return task


def _run_of(result: CallToolResult) -> RunResult | None:
    """The run a home replica's `get_run`/`cancel_run` answer describes (None for a tool error)."""
    if result.is_error or not isinstance(result.structured_content, dict):
        return None
    return RunResult.model_validate(result.structured_content)


def legacy_capabilities() -> dict[str, Any]:
    """`capabilities.tasks` of the 2025-11-25 handshake: task-augmented tools/call, and cancel."""
    return {"cancel": {}, "requests": {"tools": {"call": {}}}}
