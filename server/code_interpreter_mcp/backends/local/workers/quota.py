"""The disk quota of a container's data folder (`settings.box_size_mb`), enforced from the folder's change events.

The folder's tracker (folder.py, changes.py) keeps its real-block usage from inotify events and calls back on the
event loop, in the pump that read the event of the write that crossed the limit, so an idle container costs
nothing (no thread, no timer, no scan). What a breach does:
- during a run: every process the run started is killed at once (SIGKILL, host side), the run is interrupted
  (SIGINT, so its variables are kept) and reports DiskQuotaExceeded. If the folder still grows past the limit by
  `HARD_MARGIN` (code that ignores the interrupt, a thread of the worker), the whole sandbox is killed at once and
  the run reports the quota error with `state_lost`;
- between runs (a process or thread left running by the code): the sandbox is killed at once and the next run says
  `state_lost` and why, in a warning.
A folder over quota stays usable, so code can delete files; uploads that would not fit are refused (folder.py).

The margin, what a folder can exceed the quota by: `HARD_MARGIN` (4 MiB) plus, for each process writing at the
moment of the breach, the write call in flight (its event comes when the call returns; one call is bounded by
RLIMIT_FSIZE, `max_file_bytes`) and what it writes in the reaction time (0.1 to 0.4 ms measured). `fallocate`
is refused in the sandbox (seccomp.py: EOPNOTSUPP), so glibc's posix_fallocate writes a byte per block and is seen
like any writer; sparse files count the blocks they really allocated. Two gaps the kernel gives no event for are
bounded by RLIMIT_FSIZE per file: stores through a shared mmap into a file's holes (seen when it is closed), and
writes to a file deleted while open. Without bubblewrap (unsafe mode) there is no seccomp filter, so fallocate is
not bounded there.
"""

from __future__ import annotations

import logging
import signal

from ....config import Settings
from ...base import ExecError
from ..sandbox import procs
from .containers import Container
from .outcome import LOST_SUFFIX
from .pool import WorkerPool
from .service import Service

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024
HARD_MARGIN = 4 * _MIB


class QuotaGuard:
    """Enforces the quota of each watched container, stopping workers through `pool`."""

    def __init__(self, settings: Settings, pool: WorkerPool, service: Service) -> None:
        self.quota_mb = settings.box_size_mb
        self.quota_bytes = int(settings.box_size_mb) * _MIB
        self.pool = pool
        self.service = service

    def watch(self, c: Container) -> None:
        """Enforce the quota on `c` from now on (its folder is open)."""
        tracker = c.folder.tracker
        if tracker is not None:
            tracker.set_quota(self.quota_bytes, lambda used: self._exceeded(c, used))

    def _exceeded(self, c: Container, used: int) -> None:
        """On the loop, inside the pump that saw the folder grow past its quota (again): must not block."""
        worker = c.worker
        if c.destroyed or worker is None or not worker.alive():
            return
        if c.running:
            c.quota_hit = used
            root = worker.process.pids().get("init", worker.worker_pid)
            if root is not None:
                procs.kill([p for p in procs.descendants(root) if p != worker.worker_pid])
            if used > self.quota_bytes + HARD_MARGIN:
                c.quota_killed = True
                worker.process.send_signal(signal.SIGKILL)  # the sandbox's init follows its only child
            if c.wake is not None:
                c.wake.cancel()
            return
        logger.warning(
            "container %s: data folder over its %s MiB quota between runs; stopping its worker",
            c.state.id,
            self.quota_mb,
        )
        worker.process.send_signal(signal.SIGKILL)
        c.state_lost_pending = True
        c.pending_warnings.append(
            f"The worker was stopped between runs because the data folder grew past its {self.quota_mb} MiB "
            f"quota (a background writer?). {LOST_SUFFIX}"
        )
        self.service.spawn("quota-stop", lambda: self._reap(c, worker))

    async def _reap(self, c: Container, worker: object) -> None:
        async with c.lock:
            if c.worker is worker:
                await self.pool.stop(c)

    def error(self, c: Container, interrupted: bool) -> ExecError:
        used = max(c.folder.usage, c.quota_hit or 0) // _MIB
        what = "the run was interrupted" if interrupted else "it is over quota"
        return ExecError(
            "DiskQuotaExceeded",
            f"The data folder grew to {used} MiB, over its {self.quota_mb} MiB quota; {what}. "
            "Delete files in /mnt/data to free space.",
        )

    def over_quota_warning(self, c: Container) -> str | None:
        """What a run reports while the folder stays over quota after it."""
        if c.folder.usage <= self.quota_bytes:
            return None
        return (
            f"The data folder uses {c.folder.usage // _MIB} MiB, over its {self.quota_mb} MiB "
            "quota: delete files in /mnt/data; runs that keep writing are interrupted."
        )
