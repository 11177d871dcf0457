"""One run in a container: send the code to its worker, wait for the answer, and stop the run when it must stop.

Run control: a wall-clock timeout sends SIGINT (state kept, status "timeout"), then after
`settings.interrupt_grace_s` the worker is killed (`state_lost`). A quota breach seen by the quota watch does the
same with a DiskQuotaExceeded error. Cancelling the calling task interrupts, then kills, shielded (pool.py). What
the outcome then says is outcome.py's; starting, replacing and killing workers is the pool's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import anyio

from ....config import Settings
from ....errors import BackendError, ContainerExpired
from ...base import ExecOutcome, ExecRequest, Progress
from . import outcome
from .containers import Container
from .pool import WorkerPool
from .process import WorkerGone, WorkerProcess
from .quota import HARD_MARGIN, QuotaGuard
from .snapshots import Keeper, Restored
from .streaming import CaptureTail

logger = logging.getLogger(__name__)

# How long a run's answer is awaited by busy-waiting before the event loop takes over: long enough for a trivial
# run (about 20 us in the worker), short enough that other sessions never notice the loop was held.
SPIN_S = 0.0002


class Runner:
    """Runs code in containers' workers, one run per container at a time."""

    def __init__(self, settings: Settings, pool: WorkerPool, quota: QuotaGuard, keeper: Keeper | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.quota = quota
        self.keeper = keeper  # namespace snapshots (None: off)

    async def execute(self, c: Container, request: ExecRequest, progress: Progress) -> ExecOutcome:
        async with c.lock:
            if c.destroyed:
                raise ContainerExpired(f"Container {c.state.id} was deleted.")
            if not c.state.usable():
                raise ContainerExpired(f"Container {c.state.id} expired after being idle.")
            warnings = list(c.pending_warnings)
            c.pending_warnings.clear()
            state_lost = c.state_lost_pending
            c.state_lost_pending = False
            c.quota_hit = None
            worker, restarted = await self.pool.ensure(c)
            restored = Restored()
            if worker.fresh:
                worker.fresh = False
                if self.keeper is not None:
                    worker, restored = await self._restore(c, worker, request)
            if self.keeper is not None:
                warnings.extend(self.keeper.take_notes(c))
            c.running = True
            try:
                result = await self._run(c, worker, request, progress)
            finally:
                c.folder.pump()  # a breach by the run's last writes is the run's, not a background writer's
                c.running = False
                c.quota_killed = False
            if restored.info is not None:
                result.state_restored = restored.info  # the earlier loss was made good: only this run's own counts
            else:
                result.state_lost = result.state_lost or state_lost or restarted or restored.lost is not None
            if restored.lost is not None:
                warnings.append(f"the session's variables could not be restored: {restored.lost}")
            if restored.info is not None:  # what stopped the last worker took its variables, and they came back
                warnings = [w.replace(outcome.LOST_SUFFIX, outcome.RESTORED_SUFFIX) for w in warnings]
            elif result.state_lost and self.keeper is not None and self.keeper.has_snapshot(c):
                if result.error is not None and outcome.LOST_SUFFIX in result.error.message:
                    result.error.message += " " + outcome.COMES_BACK
            over = self.quota.over_quota_warning(c)
            if over is not None:
                warnings.append(over)
            if not self.pool.sandboxed:
                warnings.insert(0, outcome.UNSAFE_WARNING)
            result.warnings = warnings + result.warnings
            c.quota_hit = None
            c.state.last_active_at = time.time()
            result.container = c.snapshot()
            return result

    async def _restore(
        self, c: Container, worker: WorkerProcess, request: ExecRequest
    ) -> tuple[WorkerProcess, Restored]:
        """The session's last snapshot into a worker that has not run anything; a worker that dies or hangs on
        it is replaced (and that one is not tried again), so a snapshot never fails the run."""
        assert self.keeper is not None
        packages = self._package_sets(request.package_paths) if request.package_paths else []
        try:
            return worker, await self.keeper.restore(c, worker, packages, float(request.timeout_s))
        except (WorkerGone, TimeoutError) as exc:
            logger.info("restoring the snapshot of %s failed: %s", c.state.id, exc)
            await self.pool.retire(c, worker)
            worker, _ = await self.pool.ensure(c)
            worker.fresh = False
            return worker, Restored(lost=f"loading the snapshot stopped the worker ({exc})")

    async def _run(self, c: Container, worker: WorkerProcess, request: ExecRequest, progress: Progress) -> ExecOutcome:
        structured = request.structured is not None
        cap = int(self.settings.output_cap_chars)
        req = {"op": "exec", "code": request.code, "run": int(request.run_number), "structured": structured, "cap": cap}
        if request.package_paths:
            req["packages"] = self._package_sets(request.package_paths)
        if request.env:
            req["env"] = request.env
        grace = float(self.settings.interrupt_grace_s)
        try:
            rid = await worker.send(req)
            resp, reason = worker.poll_response(rid, SPIN_S), None
            if resp is None:
                tail = CaptureTail({"stdout": worker.out_fd, "stderr": worker.err_fd}, request.on_output)
                resp, reason = await self._wait_result(c, worker, rid, float(request.timeout_s), grace, tail)
        except WorkerGone as exc:
            logger.info("worker of %s died: %s", c.state.id, exc)
            if c.quota_killed:
                printed = await self.pool.retire(c, worker)
                error = outcome.kept_writing(self.quota.error(c, interrupted=True), HARD_MARGIN // 2**20)
                return outcome.lost(printed, "error", error)
            return await self._died(c, worker, str(exc), exc.eof)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self.pool.abort(c, worker, grace)
            raise
        if resp is None:  # it ignored SIGINT for the whole grace period
            await progress(0, None, "restarting the worker")
            return await self._ignored_interrupt(c, worker, reason, request.timeout_s)
        if resp.get("op") != "result":
            return await self._died(c, worker, "the worker answered out of protocol", eof=False)
        result = outcome.from_answer(resp, structured, cap)
        if reason is not None and resp.get("interrupted") is True:
            if reason == "timeout":
                outcome.timed_out(result, request.timeout_s)
            else:
                result.status = "error"
                result.error = self.quota.error(c, interrupted=True)
            await self.pool.kill_strays(c, worker, grace)
        elif reason == "quota":
            result.warnings.append(self.quota.error(c, interrupted=False).message)
        return result

    def _package_sets(self, paths: list[Path]) -> list[str]:
        """The sets as the worker names them: relative to the store every worker binds (sitepaths.py)."""
        root = self.pool.packages
        if root is None:
            raise BackendError("Packages are turned off on this server, so no package set can be mounted.")
        try:
            return [str(p.relative_to(root)) for p in paths]
        except ValueError:
            raise BackendError(f"A package set must lie in {root}; got {paths}.") from None

    async def _wait_result(
        self, c: Container, worker: WorkerProcess, rid: int, timeout_s: float, grace: float, tail: CaptureTail
    ) -> tuple[dict[str, Any] | None, str | None]:
        """The run's answer, interrupting it at the time limit or on a quota breach. (None, reason) when it would
        not stop within the grace period."""
        deadline = anyio.current_time() + timeout_s
        reason: str | None = None
        kill_at: float | None = None
        poll = 0.25
        while True:
            now = anyio.current_time()
            tail.poll()
            if reason is None:
                if c.quota_hit is not None:
                    reason = "quota"
                elif now >= deadline:
                    reason = "timeout"
                elif self.pool.memory.over_rss(worker.process.pids().get("init", worker.worker_pid)):
                    return None, "memory"  # the no-cgroup fallback: no interrupt frees memory reliably
                if reason is not None:
                    worker.interrupt()
                    kill_at = now + grace
            if kill_at is not None and now >= kill_at:
                return None, reason
            wake = kill_at if kill_at is not None else min(deadline, now + poll)
            with anyio.move_on_after(max(wake - now, 0)) as scope:
                c.wake = scope
                try:
                    return await worker.response(rid), reason
                finally:
                    c.wake = None

    async def _died(self, c: Container, worker: WorkerProcess, detail: str, eof: bool) -> ExecOutcome:
        if eof:
            # Let it finish dying first, so its own exit status (signal, code) is what gets reported.
            await worker.wait(1.0)
        oom = self.pool.memory.oom_kills(c.state.id) > 0
        printed = await self.pool.retire(c, worker)
        reason = worker.exit_reason() if eof else detail
        if oom:
            reason = (
                f"out of memory: the container's processes together reached memory_mb={self.settings.memory_mb} "
                f"MiB and the kernel stopped the worker ({reason})"
            )
        return outcome.worker_died(printed, reason, cpu_seconds=self.settings.cpu_seconds, destroyed=c.destroyed)

    async def _ignored_interrupt(
        self, c: Container, worker: WorkerProcess, reason: str | None, timeout_s: float
    ) -> ExecOutcome:
        printed = await self.pool.retire(c, worker)
        if reason == "memory":
            return outcome.lost(printed, "error", outcome.over_memory(int(self.settings.memory_mb)))
        if reason == "quota":
            return outcome.lost(printed, "error", outcome.ignored_quota(self.quota.error(c, interrupted=True)))
        return outcome.lost(printed, "timeout", outcome.ignored_timeout(timeout_s))
