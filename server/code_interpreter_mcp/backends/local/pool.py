"""The workers of this backend's containers: starting one, replacing one that died, interrupting then killing,
clearing away what an interrupted run left running, and stopping them all.

A container has at most one worker; it starts eagerly with the container and is respawned lazily (the next run
reports `state_lost`) after it died or had to be killed. The pool reaches workers only through the launcher of the
isolation profile chosen at start-up (`LAUNCHERS`: one entry per way a worker can run), so it knows nothing of
bubblewrap. Caps on live workers, eviction of idle ones and warm spares belong here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import anyio

from ...config import Settings
from ...errors import BackendError
from . import sandbox
from .bubblewrap import BubblewrapLauncher
from .containers import Container
from .launcher import Launcher, LaunchSpec
from .process import Printed, WorkerGone, WorkerProcess, WorkerStartError
from .unsandboxed import UnsandboxedLauncher

logger = logging.getLogger(__name__)


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


class WorkerPool:
    """Workers for containers, all started one way (the profile's launcher)."""

    def __init__(
        self, settings: Settings, profile: sandbox.Profile, seccomp: bytes | None, mpl_cache: Path | None = None
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.launcher = LAUNCHERS[profile.mode](profile, seccomp)
        self.mpl_cache = mpl_cache  # the prebuilt matplotlib font list new workers get (fonts.py)
        self.packages = package_sets(settings)

    @property
    def sandboxed(self) -> bool:
        return self.launcher.sandboxed

    async def spawn(self, root: Path, uid: int | None, gid: int | None) -> WorkerProcess:
        """A new worker for the container folder `root`. WorkerStartError when it does not come up."""
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
        )
        return await WorkerProcess.spawn(self.launcher, spec)

    async def ensure(self, c: Container) -> tuple[WorkerProcess, bool]:
        """The container's live worker, starting one if needed; True when an earlier one was lost."""
        if c.worker is not None and c.worker.alive():
            return c.worker, False
        lost = c.had_worker
        await self.stop(c)
        try:
            worker = await self.spawn(c.root, c.uid, c.gid)
        except WorkerStartError as exc:
            raise BackendError(f"The sandboxed Python worker did not start: {exc}") from None
        c.worker = worker
        c.had_worker = True
        return worker, lost

    async def stop(self, c: Container) -> None:
        """Kill the container's worker, if it has one."""
        worker, c.worker = c.worker, None
        if worker is not None:
            await worker.kill()

    async def stop_all(self, containers: Iterable[Container]) -> None:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for c in containers:
                    if c.worker is not None:
                        tg.start_soon(self.stop, c)

    async def abort(self, c: Container, worker: WorkerProcess, grace: float) -> None:
        """The caller went away mid-run: interrupt, and kill if it does not stop in time."""
        worker.interrupt()
        try:
            with anyio.fail_after(grace):
                while True:
                    frame = await worker.receive()
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
        return printed

    async def _discard(self, c: Container, worker: WorkerProcess) -> None:
        """Kill a worker that cannot be trusted to serve the next run; that run reports the loss."""
        if c.worker is worker:
            c.worker = None
        await worker.kill()
        c.state_lost_pending = True
