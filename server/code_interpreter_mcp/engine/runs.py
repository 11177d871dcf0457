"""Runs in the background: the run registry of `run_code`, `get_run` and `cancel_run`.

A run is started in the engine's own task group, not in the request that asked for it, so a client that times
out or disconnects loses nothing: it waits `wait_s`, gets `running` with the run's handle and the output so far,
and collects the result later, from any connection of the same owner. A session runs one piece of code at a time;
runs that arrive meanwhile wait in its queue (`queue`), reported `queued` until their turn. Finished results stay
in memory (the newest few hundred, images too) and on disk (the registry's `runs` rows) for the session's
lifetime, so after a restart a finished run is still reported, and one that was in flight is reported lost, with
the session's harvested files. While anyone waits for a run, progress notifications carry its newest printed
lines, a few a second at most (the engine's housekeeping ticks them).

It owns handles, waiting, cancelling, ownership of runs and their live output; how one run goes is `run`'s, and it
knows no MCP types.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from ..artifacts import record_to_info
from ..errors import BadInput, CIError, NotFound, RunLost, RunNotFound, SessionBusy, SessionNotFound
from ..models import ContainerInfo, ErrorInfo, RunResult
from ..sessions import FileRecord, RunRow, Session, new_id
from .containers import container_info
from .context import EngineContext
from .live import LiveOutput
from .progress import ProgressSink
from .queue import RunQueue
from .run import Runner, Stop, check_run_args
from .shaping import RunOutput

logger = logging.getLogger(__name__)
T = TypeVar("T")
Verdict = Callable[[], Awaitable[bool]]  # asked when a waiting call is cancelled: True stops its run

KEPT_IN_MEMORY = 256  # finished runs whose full output (images too) stays in memory; older ones come from disk
LIVE_INTERVAL_S = 0.3  # new output is sent at most about three times a second
CANCEL_WAIT_S = 5.0  # how long cancel_run waits for the stopped run's result beyond the interrupt grace
LOST_REASON = (
    "The server stopped (restart or crash) while this run was going, so its result was never made. Variables "
    "and imports of that container are gone; files harvested before stay downloadable."
)
SHUTDOWN_REASON = "The server shut down while this run was going; it was stopped before it finished."


@dataclass
class Run:
    id: str
    session: Session
    started_at: float  # unix seconds
    live: LiveOutput
    started_mono: float = field(default_factory=time.monotonic)
    done: anyio.Event = field(default_factory=anyio.Event)
    stop: Stop = field(default_factory=Stop)
    shown: int = 0  # the live output's version last sent in a progress message
    output: RunOutput | None = None
    failure: CIError | None = None  # the run could not start or went wrong outside the code (e.g. capacity)
    sinks: list[ProgressSink] = field(default_factory=list)
    last_value: float = 0.0
    stage: str = "running"
    sent_at: float = 0.0  # monotonic time of the last progress notification
    started: bool = False  # False while it waits in the session's queue

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started_mono

    async def emit(self, message: str | None = None, total: float | None = None) -> None:
        """One progress notification to everyone waiting, its value increasing: the run's stage, then the newest
        lines it printed."""
        if not self.sinks:
            return
        value = max(round(self.elapsed, 3), self.last_value + 0.001)
        self.last_value = value
        self.sent_at = time.monotonic()
        if message is not None:  # the relay's "<stage> (<n> s)": the stage is kept for the output ticks
            self.stage = message.rsplit(" (", 1)[0]
        text = message if message is not None else f"{self.stage} ({value:.0f} s)"
        newest = self.live.newest()
        if newest:
            text = f"{text}\n{newest}"
        for sink in list(self.sinks):
            try:
                await sink(value, total, text)
            except Exception:  # a client that went away must not fail the run
                logger.debug("progress notification failed", exc_info=True)

    async def relay(self, done: float, total: float | None, message: str) -> None:
        await self.emit(message, total)


def check_wait(wait_s: float | None, default: float, maximum: float) -> float:
    wait = default if wait_s is None else wait_s
    if not isinstance(wait, int | float) or not math.isfinite(wait) or wait < 0:
        raise BadInput(f"wait_s must be a number of seconds >= 0, got {wait_s!r}.")
    if wait > maximum:
        raise BadInput(
            f"wait_s {wait:g} exceeds the server's maximum of {maximum:g} s.",
            "Call get_run again to keep waiting; each call waits up to wait_s.",
        )
    return float(wait)


class Runs:
    def __init__(self, ctx: EngineContext, runner: Runner) -> None:
        self.ctx = ctx
        self.runner = runner
        self.task_group: TaskGroup | None = None  # the engine's, set while it runs
        self._runs: dict[str, Run] = {}
        self._active: dict[str, Run] = {}  # session id -> its running run
        self.queue = RunQueue(ctx.settings.max_queued_runs)
        self._last_done: dict[str, str] = {}  # session id -> its last finished run (whose harvest files show)
        self._finished: deque[str] = deque()
        self._closing = False

    def active(self, session: Session) -> Run | None:
        return self._active.get(session.id)

    def guard(self, call: Callable[..., Awaitable[T]], what: str) -> Callable[..., Awaitable[T]]:
        """`call(session, ...)`, refused with SessionBusy while the session runs code: it would otherwise wait for
        the container until the run ends, past any client's timeout."""

        async def guarded(session: Session, *args: Any, **kwargs: Any) -> T:
            run = self._active.get(session.id)
            if run is not None:
                raise SessionBusy(run.id, what)
            return await call(session, *args, **kwargs)

        return guarded

    def beside(self, call: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        """`call(session, ...)`, a file tool: it never waits for a run. While one goes it answers from the last
        harvest (`during_run=True`) and its result says so (`as_of_run`, `run_in_progress`)."""

        async def beside_run(session: Session, *args: Any, **kwargs: Any) -> T:
            run = self._active.get(session.id)
            out = await call(session, *args, during_run=run is not None, **kwargs)
            result = getattr(out, "result", out)  # download_file's output wraps its model
            result.as_of_run = self._last_done.get(session.id)
            result.run_in_progress = run.id if run is not None else None
            return out

        return beside_run

    async def start(
        self,
        session: Session,
        code: str,
        *,
        wait_s: float | None = None,
        progress: ProgressSink | None = None,
        abandoned: Verdict | None = None,
        run_id: str | None = None,
        **options: Any,
    ) -> RunOutput:
        """Start a run in the background and wait for it up to `wait_s` (the setting's default when None). When the
        waiting call is cancelled, `abandoned()` (awaited in the background) says whether the run stops too.
        `run_id` is the id a forwarding replica chose (so that it can pass a cancel on); a new one by default."""
        settings = self.ctx.settings
        wait = check_wait(wait_s, settings.default_wait_s, settings.max_wait_s)
        check_run_args(  # bad arguments fail the call now, not the run later
            settings,
            code,
            options.get("timeout_s"),
            options.get("output_schema"),
            options.get("json_strategy"),
            options.get("instructions"),
        )
        if options.get("output_schema") is not None:  # an invalid schema too, checked off the loop by the guard
            await self.ctx.guard.check_schema(options["output_schema"])
        await self.ctx.ready()
        if self.task_group is None:
            raise RuntimeError("the engine is not running")
        if run_id is None or run_id in self._runs:
            run_id = new_id("r_")
        run = Run(id=run_id, session=session, started_at=time.time(), live=LiveOutput(settings.output_cap_chars))
        self.queue.admit(session.id, run)  # SessionBusy when the queue is full
        self._runs[run.id] = run
        self.task_group.start_soon(self._main, run, code, options)
        return await self._wait(run, wait, progress, abandoned)

    def knows(self, run_id: str) -> bool:
        """Whether the run is one of this process's (running, queued or kept)."""
        return run_id in self._runs

    async def get(
        self,
        run_id: str,
        owner: str | None,
        session_id: str | None = None,
        wait_s: float | None = 0.0,
        progress: ProgressSink | None = None,
        abandoned: Verdict | None = None,
    ) -> RunOutput:
        """The run's result: final when it ended, else `running` after waiting up to `wait_s` (None: no limit)."""
        if wait_s is not None:
            wait_s = check_wait(wait_s, 0.0, self.ctx.settings.max_wait_s)
        run = await self._find(run_id, owner, session_id)
        if isinstance(run, RunOutput):
            return run
        return await self._wait(run, math.inf if wait_s is None else wait_s, progress, abandoned)

    async def cancel(self, run_id: str, owner: str | None, session_id: str | None = None) -> RunOutput:
        """Stop a run the way a timeout does and return its result (still `running` if it would not stop yet)."""
        run = await self._find(run_id, owner, session_id)
        if isinstance(run, RunOutput):
            return run
        run.stop.set()
        return await self._wait(run, self.ctx.settings.interrupt_grace_s + CANCEL_WAIT_S, None)

    async def tick(self) -> None:
        """From the engine's housekeeping, a few times a second: new output of a run reaches whoever waits."""
        for run in list(self._active.values()):
            if run.sinks and run.live.version != run.shown and time.monotonic() - run.sent_at >= LIVE_INTERVAL_S:
                run.shown = run.live.version
                await run.emit()

    async def shutdown(self) -> None:
        """Before the engine closes: running runs are interrupted, harvested and recorded as lost to the shutdown
        (with their output and files so far), within the interrupt grace and a few seconds."""
        self._closing = True
        runs: list[Run] = self.queue.all()  # type: ignore[assignment]
        for run in runs:
            run.stop.set()
        with anyio.move_on_after(self.ctx.settings.interrupt_grace_s + CANCEL_WAIT_S):
            for run in runs:
                await run.done.wait()

    async def stop_session(self, session: Session) -> None:
        """Before a session closes: its queue is cancelled and its running run stopped and awaited (its files
        harvested)."""
        runs: list[Run] = self.queue.of_session(session.id)  # type: ignore[assignment]
        for run in reversed(runs):  # the waiting ones first, so none of them starts when the running one ends
            run.stop.set()
        for run in runs:
            await run.done.wait()

    # ---- internals -----------------------------------------------------------------------------------------

    async def _wait(
        self, run: Run, wait_s: float, progress: ProgressSink | None, abandoned: Verdict | None = None
    ) -> RunOutput:
        if progress is not None:
            run.sinks.append(progress)
        try:
            with anyio.move_on_after(wait_s):
                await run.done.wait()
        except anyio.get_cancelled_exc_class():
            if abandoned is not None and self.task_group is not None and not run.done.is_set():
                self.task_group.start_soon(self._abandoned, run, abandoned)
            raise
        finally:
            if progress is not None:
                run.sinks.remove(progress)
        if run.failure is not None:
            raise run.failure
        if run.output is not None:
            return run.output
        return RunOutput(result=self._running_result(run))

    async def _find(self, run_id: str, owner: str | None, session_id: str | None) -> Run | RunOutput:
        """The run if `owner` may see it (through `session_id` when given); a foreign run is 'not found'."""
        reg = self.ctx.reg
        missing = RunNotFound(f"No run {run_id!r} is known for this client.")
        if not isinstance(run_id, str):
            raise missing
        run = self._runs.get(run_id)
        row: RunRow | None = None
        if run is None:
            row = await reg.load_run(run_id)
            if row is None:
                raise missing
        sid = run.session.id if run is not None else row.session_id  # type: ignore[union-attr]
        if session_id is not None and session_id != sid:
            raise missing
        try:
            session = await reg.get_session(sid, owner)
        except SessionNotFound:
            raise missing from None
        if run is not None:
            return run
        assert row is not None
        return self._from_row(row, session)

    def _from_row(self, row: RunRow, session: Session) -> RunOutput:
        """A run of an earlier process: its stored result, or 'lost' when it never ended."""
        if row.status == "running" and not row.orphaned():
            raise NotFound(
                f"Run {row.id} belongs to another server process that still runs.",
                "Ask the server that started it (the same client connection).",
            )
        data = json.loads(row.result) if row.result else None
        if isinstance(data, dict) and "session_id" in data:  # a result (a run lost to a shutdown has one too)
            return RunOutput(result=RunResult.model_validate(data))
        if row.status == "failed" and data is not None:
            raise RunLost(data.get("message", "The run failed."), data.get("hint") or None)
        reason = data.get("message", LOST_REASON) if data else LOST_REASON
        return RunOutput(result=self._lost_result(row, session, reason))

    def _lost_result(self, row: RunRow, session: Session, reason: str) -> RunResult:
        rec = self.ctx.reg.container_of(session, None)
        records: list[FileRecord] = [r for r in session.latest_files() if r.created_at >= row.started_at]
        return RunResult(
            session_id=session.id,
            container_id=rec.state.id if rec is not None else "",
            backend=self.ctx.backend.name,
            status="lost",
            error=ErrorInfo(type="RunLost", message=reason),
            files=[record_to_info(r) for r in records],
            container=container_info(rec, True) if rec is not None else ContainerInfo(id="", expires_at=None),
            run_id=row.id,
            warnings=["Files the session harvested earlier stay downloadable: see list_container_files."],
        )

    def _queued_result(self, run: Run, cancelled: bool = False) -> RunResult:
        rec = self.ctx.reg.container_of(run.session, None)
        position, ahead = self.queue.position(run.session.id, run)
        if cancelled:
            note = "Cancelled while it waited in the session's queue: it never ran."
        else:
            note = (
                f"Queued: {position} run(s) of this session go first (behind {ahead}). Call "
                f"get_run(run_id={run.id!r}) to wait for the result, or cancel_run to take it out of the queue."
            )
        return RunResult(
            session_id=run.session.id,
            container_id=rec.state.id if rec is not None else "",
            backend=self.ctx.backend.name,
            status="cancelled" if cancelled else "queued",
            error=ErrorInfo(type="Cancelled", message=note) if cancelled else None,
            container=container_info(rec, False) if rec is not None else ContainerInfo(id="", expires_at=None),
            warnings=[note],
            run_id=run.id,
            position=None if cancelled else position,
            waits_for=None if cancelled else ahead,
        )

    def _running_result(self, run: Run) -> RunResult:
        if not run.started:
            return self._queued_result(run)
        rec = self.ctx.reg.container_of(run.session, None)
        stdout, cut_out = run.live.text("stdout")
        stderr, cut_err = run.live.text("stderr")
        elapsed = round(run.elapsed, 3)
        return RunResult(
            session_id=run.session.id,
            container_id=rec.state.id if rec is not None else "",
            backend=self.ctx.backend.name,
            status="running",
            stdout=stdout,
            stderr=stderr,
            container=container_info(rec, False) if rec is not None else ContainerInfo(id="", expires_at=None),
            truncated=cut_out or cut_err,
            warnings=[
                f"Still running after {elapsed:.0f} s. Call get_run(run_id={run.id!r}) to wait for the result "
                "(waiting again is cheap), or cancel_run to stop it."
            ],
            duration_ms=round(elapsed * 1000, 2),
            run_id=run.id,
            elapsed_s=elapsed,
        )

    async def _main(self, run: Run, code: str, options: dict[str, Any]) -> None:
        reg = self.ctx.reg
        reg.add_run_later(run.id, run.session, run.started_at)  # lost at a crash within the first flush interval
        status = "failed"
        try:
            if not await self._turn(run):
                run.output = RunOutput(result=self._queued_result(run, cancelled=True))
                status = "cancelled"
                return
            out = await self.runner.run_code(
                run.session, code, progress=run.relay, on_output=run.live.feed, stop=run.stop, **options
            )
            out.result.run_id = run.id
            if out.result.status == "cancelled" and not (out.result.stdout or out.result.stderr):
                out.result.stdout, cut_out = run.live.text("stdout")
                out.result.stderr, cut_err = run.live.text("stderr")
                out.result.truncated = out.result.truncated or cut_out or cut_err
            if self._closing and out.result.status == "cancelled":
                out.result.status = "lost"
                out.result.error = ErrorInfo(type="RunLost", message=SHUTDOWN_REASON)
            run.output = out
            status = out.result.status
        except CIError as exc:
            run.failure = RunLost(SHUTDOWN_REASON) if self._closing else exc
            status = "lost" if self._closing else status
        except anyio.get_cancelled_exc_class():
            run.failure = RunLost(SHUTDOWN_REASON)
            status = "lost"
            raise
        except Exception:
            if self._closing:
                run.failure, status = RunLost(SHUTDOWN_REASON), "lost"
            else:
                logger.exception("run %s failed", run.id)
                run.failure = RunLost("The run failed inside the server; details are in its log.")
        finally:
            if self._active.get(run.session.id) is run:
                del self._active[run.session.id]
                self._last_done[run.session.id] = run.id
            self.queue.leave(run.session.id, run)
            run.done.set()
            self._finished.append(run.id)
            while len(self._finished) > KEPT_IN_MEMORY:
                self._runs.pop(self._finished.popleft(), None)
            failure = run.failure or RunLost(SHUTDOWN_REASON)
            reg.end_run_later(run.id, status, run.output.result if run.output is not None else failure.as_dict())

    async def _abandoned(self, run: Run, verdict: Verdict) -> None:
        """The call that waited for `run` was cancelled: the verdict on why decides whether the run stops (a queued
        one leaves the queue)."""
        try:
            stop = await verdict()
        except Exception:
            logger.exception("the cancel verdict of run %s failed", run.id)
            return
        if stop and not run.done.is_set():
            logger.info("run %s stopped: its call was cancelled by the client", run.id)
            run.stop.set()

    async def _turn(self, run: Run) -> bool:
        """Wait in the session's queue until the runs ahead ended; False when it was stopped before its turn."""
        if run.stop.requested or not self.queue.started(run.session.id, run):  # an idle session's run: no wait
            with run.stop.scope():
                await self.queue.wait_turn(run.session.id, run)
            if run.stop.requested:
                return False
        run.started, run.started_mono = True, time.monotonic()
        self._active[run.session.id] = run
        return True
