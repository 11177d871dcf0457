"""The disk quota of a container's data folder (`settings.box_size_mb`): watching it, and what breaching it does.

RLIMIT_FSIZE caps each file at `max_file_bytes`; for the folder as a whole a host-side thread measures each live
container's data folder every `quota_check_interval_s` (0.5 s). A run that pushes the folder past its quota is
interrupted with a DiskQuotaExceeded error (runs.py waits for `quota_hit`), and a worker that keeps growing an
over-quota folder between runs (a background writer) is stopped. A folder over quota stays usable, so code can
delete files; uploads that would not fit are refused (folder.py). A --size tmpfs cannot serve here: files must
persist on the host. A quota fed by kernel events would replace the thread here and nowhere else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread

from ...config import Settings
from ..base import ExecError
from .containers import Container, ContainerRegistry
from .outcome import LOST_SUFFIX
from .pool import WorkerPool

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024


class QuotaGuard:
    """Enforces the quota of every container in `containers`, stopping workers through `pool`."""

    def __init__(self, settings: Settings, containers: ContainerRegistry, pool: WorkerPool) -> None:
        self.quota_mb = settings.box_size_mb
        self.quota_bytes = int(settings.box_size_mb) * _MIB
        interval = settings.quota_check_interval_s
        self.interval = float(interval if interval is not None else 0.5)
        self.containers = containers
        self.pool = pool
        self._watch: _Watch | None = None

    def start(self, token: Any) -> None:
        """Start watching; `token` is the event loop's (anyio.lowlevel.current_token())."""
        self._watch = _Watch(self.containers.live, self.quota_bytes, self._exceeded, token, self.interval)
        self._watch.start()

    async def aclose(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop.set()
            await anyio.to_thread.run_sync(watch.join, 5.0)

    async def _exceeded(self, c: Container) -> None:
        """Called on the loop by the watch: the folder grew past its quota."""
        if c.destroyed or c.worker is None:
            return
        if c.lock.locked():  # a run is in progress: its wait loop interrupts it
            c.quota_hit = c.folder.usage
            return
        async with c.lock:
            if c.destroyed or c.worker is None or c.folder.usage <= self.quota_bytes:
                return  # a run got in first and freed space
            logger.warning(
                "container %s: data folder over its %s MiB quota between runs; stopping its worker",
                c.state.id,
                self.quota_mb,
            )
            await self.pool.stop(c)
            c.state_lost_pending = True
            c.pending_warnings.append(
                f"The worker was stopped between runs because the data folder grew past its {self.quota_mb} MiB "
                f"quota (a background writer?). {LOST_SUFFIX}"
            )

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


class _Watch(threading.Thread):
    """Measures every live container's data folder and reports growth past the quota to the event loop."""

    def __init__(
        self,
        containers: Callable[[], list[Container]],
        quota: int,
        exceeded: Callable[[Container], Any],
        token: Any,
        interval: float,
    ) -> None:
        super().__init__(name="ci-local-quota", daemon=True)
        self.containers = containers
        self.quota = quota
        self.exceeded = exceeded
        self.token = token
        self.interval = interval
        self.stop = threading.Event()

    def run(self) -> None:
        quota = self.quota
        delay = self.interval
        while not self.stop.wait(delay):
            spent = 0.0
            try:
                containers = self.containers()
            except RuntimeError:  # changed size under us: next round
                continue
            for c in containers:
                if c.destroyed or c.worker is None or self.stop.is_set():
                    continue
                try:
                    result = c.folder.measure()
                except OSError:  # being deleted
                    continue
                spent += result.seconds
                if result.usage_bytes > quota and result.usage_bytes > c.quota_mark:
                    c.quota_mark = result.usage_bytes
                    try:
                        anyio.from_thread.run(self.exceeded, c, token=self.token)
                    except Exception:  # the event loop is gone: nothing left to watch
                        logger.debug("quota watch stopping", exc_info=True)
                        return
                elif result.usage_bytes <= quota:
                    c.quota_mark = quota
            # Huge folders: never spend more than ~10% of the time scanning.
            delay = max(self.interval, spent * 10)
