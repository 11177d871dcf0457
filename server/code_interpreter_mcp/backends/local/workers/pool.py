"""The workers of this backend's containers: starting one, replacing one that died, interrupting then killing,
clearing away what an interrupted run left running, and stopping them all; how many may live at once; warm spares.

A container has at most one worker; it starts with the container (a warm spare when one is ready) and is respawned
lazily (the next run reports `state_lost`) after it died, had to be killed, or was evicted. The pool reaches
workers only through the launcher of the isolation profile chosen at start-up (`LAUNCHERS`: one entry per way a
worker can run), so it knows nothing of bubblewrap. Every worker is put into its container's memory group
(memory.py). Caps and spares are capacity.py's (`Capacity`); this module asks it for room before each start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import anyio

from ....config import Settings
from ....errors import BackendError
from ..sandbox import profile as sandbox
from ..sandbox.bubblewrap import BubblewrapLauncher
from ..sandbox.launcher import Launcher, LaunchSpec
from ..sandbox.memory import MemoryLimiter
from ..sandbox.unsandboxed import UnsandboxedLauncher
from .containers import Container
from .process import Printed, WorkerGone, WorkerProcess, WorkerStartError

logger = logging.getLogger(__name__)

REINTERRUPT_S = 0.3  # between SIGINTs while a stopped run has not answered (a cell ends in microseconds on one)


def _bubblewrap(profile: sandbox.Profile, seccomp: bytes | None) -> Launcher:
    return BubblewrapLauncher(profile, seccomp if profile.seccomp else None)


def _unsandboxed(profile: sandbox.Profile, seccomp: bytes | None) -> Launcher:
    return UnsandboxedLauncher()


# Where a worker runs, by the profile's mode: (profile, seccomp program) -> launcher.
LAUNCHERS: dict[sandbox.Mode, Callable[[sandbox.Profile, bytes | None], Launcher]] = {
    "bwrap-root": _bubblewrap,
    "bwrap-userns": _bubblewrap,
    "none": _unsandboxed,
}


def package_sets(settings: Settings) -> Path | None:
    """The installed package sets every worker may import from (None: packages are off on this server)."""
    return settings.package_sets_path if settings.packages_policy != "off" else None


def blas_threads(settings: Settings) -> int:
    """BLAS/OpenMP threads in the sandbox: the setting, else the CPUs this process (and so the sandbox) may use."""
    if settings.blas_threads is not None:
        return int(settings.blas_threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class WorkerPool:
    """Workers for containers, all started one way (the profile's launcher)."""

    def __init__(
        self,
        settings: Settings,
        profile: sandbox.Profile,
        seccomp: bytes | None,
        mpl_cache: Path | None = None,
        memory: MemoryLimiter | None = None,
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.launcher = LAUNCHERS[profile.mode](profile, seccomp)
        self.mpl_cache = mpl_cache  # the prebuilt matplotlib font list new workers get (fonts.py)
        self.packages = package_sets(settings)
        self.memory = memory or MemoryLimiter(int(settings.memory_mb) * 1024 * 1024)
        self.threads = blas_threads(settings)
        # Asked before each worker start for room under the caps (capacity.py sets it); raises CapacityError.
        self.make_room: Callable[[Container], Awaitable[None]] | None = None
        self.snapshot_max_bytes = 0  # > 0: workers get a control socket and save their namespace (snapshots.py)
        self.started: Callable[[WorkerProcess], None] | None = None  # told of each new worker (its snapshots)
        # Before an idle worker is stopped on purpose: its due snapshot written first (snapshots.py).
        self.flush: Callable[[Container], Awaitable[None]] | None = None

    @property
    def sandboxed(self) -> bool:
        return self.launcher.sandboxed

    async def spawn(self, root: Path, uid: int | None, gid: int | None, group: str | None = None) -> WorkerProcess:
        """A new worker for the container folder `root`, in the memory group of container `group` when given.
        WorkerStartError when it does not come up."""
        s = self.settings
        tmp_mb = s.tmp_size_mb if s.tmp_size_mb is not None else min(int(s.box_size_mb), 512)
        spec = LaunchSpec(
            root=root,
            data=root / "data",
            uid=uid,
            gid=gid,
            limits=sandbox.rlimits(s, self.profile),
            tmp_bytes=int(tmp_mb) * 1024 * 1024,
            mpl_cache=self.mpl_cache,
            packages=self.packages,
            threads=self.threads,
            snapshot_max_bytes=self.snapshot_max_bytes,
        )
        worker = await WorkerProcess.spawn(self.launcher, spec)
        if self.started is not None:
            self.started(worker)
        # Before any user code runs (the worker waits for its first request): what it starts stays in the group.
        if group is not None:
            self.memory.place(group, list(worker.process.pids().values()))
        return worker

    async def ensure(self, c: Container) -> tuple[WorkerProcess, bool]:
        """The container's live worker, starting one if needed; True when an earlier one was lost.
        CapacityError when no room can be made for a new one."""
        if c.worker is not None and c.worker.alive():
            return c.worker, False
        lost = c.had_worker
        await self.stop(c)
        c.starting = True  # counted as live from here, so concurrent starts see it
        try:
            if self.make_room is not None:
                await self.make_room(c)
            worker = await self.spawn(c.root, c.uid, c.gid, group=c.state.id)
        except WorkerStartError as exc:
            raise BackendError(f"The sandboxed Python worker did not start: {exc}") from None
        finally:
            c.starting = False
        c.worker = worker
        c.had_worker = True
        return worker, lost

    async def stop(self, c: Container) -> None:
        """Kill the container's worker, if it has one."""
        worker, c.worker = c.worker, None
        if worker is not None:
            await worker.kill()
            self.memory.remove(c.state.id)

    async def stop_all(self, containers: Iterable[Container]) -> None:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for c in containers:
                    if c.worker is not None:
                        tg.start_soon(self.stop, c)

    async def abort(self, c: Container, worker: WorkerProcess, grace: float) -> None:
        """The caller went away mid-run: interrupt, and kill if it does not stop in time. The interrupt is sent
        again every `REINTERRUPT_S` until the result comes: a SIGINT that lands before the cell has started (a
        stop right after the run began) is ignored by the worker, and the cell would then spin until the kill."""
        try:
            with anyio.fail_after(grace):
                again = 0.0
                while True:
                    now = anyio.current_time()
                    if now >= again:
                        worker.interrupt()
                        again = now + REINTERRUPT_S
                    with anyio.move_on_after(again - now):
                        frame = await worker.receive()  # cancellation-safe: a partial frame stays buffered
                        if frame.get("op") == "result":
                            break
        except (TimeoutError, WorkerGone):
            await self._discard(c, worker)
            return
        await self.kill_strays(c, worker, grace)

    async def kill_strays(self, c: Container, worker: WorkerProcess, grace: float) -> None:
        """After an interrupted run: kill processes the code left behind (e.g. a fork bomb), keep the worker."""
        if not self.sandboxed:
            return
        try:
            with anyio.fail_after(max(grace, 1.0)):
                await worker.request({"op": "kill_strays"})
        except (TimeoutError, WorkerGone):
            await self._discard(c, worker)

    async def retire(self, c: Container, worker: WorkerProcess) -> Printed:
        """A worker that died or will not stop mid-run: kill it and return what its run printed. The run that
        saw this reports the loss, so the next one starts fresh without a second report."""
        await worker.kill(close=False)
        printed = await anyio.to_thread.run_sync(worker.read_output, int(self.settings.output_cap_chars))
        worker.close()
        if c.worker is worker:
            c.worker = None
        c.had_worker = False
        self.memory.remove(c.state.id)
        return printed

    async def _discard(self, c: Container, worker: WorkerProcess) -> None:
        """Kill a worker that cannot be trusted to serve the next run; that run reports the loss."""
        if c.worker is worker:
            c.worker = None
        await worker.kill()
        self.memory.remove(c.state.id)
        c.state_lost_pending = True
