"""How many workers live at once, which idle one makes room, and the warm spares started ahead of need.

- Caps: `max_live_containers` (default from available memory: 3/4 of MemAvailable over min(memory_mb, 200 MiB), a
  typical worker with pandas loaded, clamped to 2..200) and `max_live_containers_per_owner` (default: none). Spares
  count as live. A worker about to start first takes a spare's place, then the least recently used idle worker's
  (the same owner's when the owner's cap is what is reached): that worker is stopped, its container and files stay,
  and its next run reports `state_lost` and why. When every worker is busy running code, the start fails with
  CapacityError, never with the host running out of memory.
- Among replicas (`neighbours`, set by the engine): the owner's live workers on the other replicas count against
  its cap too; when it is reached, an idle worker of the owner here makes room first, else the other replicas are
  asked to stop idle ones of the owner; CapacityError when none can.
- Spares (`warm_workers`, default 1): a spare is a worker started in a fresh container folder with its own uid
  (containers.new_folder). A new container adopts a spare whole (folder, uid, worker), so its first run costs a
  warm run; the pool refills in the background (service.py). The first spare starts right after the probe.

Owns: the caps, the choice of whom to evict, the spares. Must not know runs or files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from ....config import Settings
from ....errors import CapacityError
from ...base import Neighbours
from ..sandbox.profile import Profile
from ..tracking.changes import ChangeTracker, Inotify
from ..tracking.folder import open_tracker
from .containers import Container, ContainerRegistry, NewFolder
from .outcome import LOST_SUFFIX
from .pool import WorkerPool
from .process import WorkerProcess
from .service import Service

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024
TYPICAL_WORKER = 200 * _MIB
# One empty cell run in a spare before it is offered: the worker's first exec (compile, capture files, the cell
# machinery's first pass) is then paid here, not by the session's first run. It leaves no variable behind.
WARM_UP = {"op": "exec", "code": "None", "run": 0, "structured": False, "cap": 1000}
REFILL_DELAY_S = 0.1  # a first run takes about a millisecond; a spare's start about 50 ms of CPU


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 * 1024 * _MIB


def default_max_live(memory_mb: int) -> int:
    per_worker = min(int(memory_mb) * _MIB, TYPICAL_WORKER)
    return max(2, min(200, int(available_memory() * 0.75) // per_worker))


class Spare:
    """A worker with a folder (already tracked) and no container yet."""

    def __init__(self, folder: NewFolder, worker: WorkerProcess, tracker: ChangeTracker) -> None:
        self.folder = folder
        self.worker = worker
        self.tracker = tracker


class Capacity:
    """The caps on live workers of `containers` and the warm spares of `pool`."""

    def __init__(
        self,
        settings: Settings,
        containers: ContainerRegistry,
        pool: WorkerPool,
        profile: Profile,
        service: Service,
        hub: Inotify | None = None,
    ) -> None:
        self.hub = hub
        self.max_live = settings.max_live_containers or default_max_live(settings.memory_mb)
        self.max_per_owner = settings.max_live_containers_per_owner
        self.warm_target = min(int(settings.warm_workers), self.max_live)
        self.containers = containers
        self.pool = pool
        self.profile = profile
        self.service = service
        self.spares: list[Spare] = []
        self._filling = 0
        self._claimed = 0  # spares taken by containers not yet holding them
        self._spare_ready = anyio.Event()  # set when a spare start ends (either way)
        self.evictions = 0
        self._lock = anyio.Lock()  # one decision about room at a time
        self._closed = False
        self.neighbours: Neighbours | None = None
        pool.make_room = self.make_room

    # ------------------------------------------------------------------------------------------ counting

    def live(self) -> list[Container]:
        """Containers whose worker is alive or starting."""
        return [
            c
            for c in self.containers.live()
            if not c.destroyed and (c.starting or (c.worker is not None and c.worker.alive()))
        ]

    def describe(self) -> dict[str, object]:
        return {
            "max_live_containers": self.max_live,
            "max_live_containers_per_owner": self.max_per_owner,
            "live_workers": len(self.live()),
            "warm_workers": self.warm_target,
            "spares_ready": len(self.spares),
            "evictions": self.evictions,
        }

    # ------------------------------------------------------------------------------------------ room

    async def make_room(self, c: Container) -> None:
        """Before a worker starts for `c`: stop a spare or the LRU idle worker if a cap is reached.
        CapacityError when every candidate is busy."""
        async with self._lock:
            if self.max_per_owner is not None:
                await self._owner_room(c, self.max_per_owner)
            others = [x for x in self.live() if x is not c]
            if len(others) + len(self.spares) + self._filling + self._claimed < self.max_live:
                return
            if self.spares:
                await self._drop_spare(self.spares.pop(0))
                return
            await self._evict(others, c, f"CODE_INTERPRETER_MAX_LIVE_CONTAINERS={self.max_live}")

    async def _owner_room(self, c: Container, cap: int) -> None:
        setting = f"CODE_INTERPRETER_MAX_LIVE_CONTAINERS_PER_OWNER={cap}"
        mine = [x for x in self.live() if x is not c and x.owner == c.owner]
        elsewhere = self.neighbours.live_elsewhere(c.owner) if self.neighbours is not None else 0
        over = len(mine) + elsewhere + 1 - cap
        while over > 0 and mine:
            try:
                await self._evict(mine, c, setting)
            except CapacityError:
                if self.neighbours is None or not elsewhere:
                    raise
                break
            mine = [x for x in self.live() if x is not c and x.owner == c.owner]
            over -= 1
        if over > 0 and self.neighbours is not None and elsewhere:
            over -= await self.neighbours.evict_elsewhere(c.owner, over)
        if over > 0:
            raise CapacityError(
                f"All of this owner's {len(mine) + elsewhere} sandbox workers ({len(mine)} here, {elsewhere} on other "
                f"replicas) are busy running code ({setting}); no idle one can make room."
            )

    async def stop_idle_of(self, owner_is: Callable[[str | None], bool], n: int, setting: str) -> int:
        """Stop up to `n` idle workers of the owner (`owner_is`), least recently used first, for the owner's cap on
        another replica; how many were stopped. Takes no lock of this replica's room: two replicas asking each
        other at once must not wait on each other."""
        stopped = 0
        for _ in range(n):
            idle = [x for x in self.live() if owner_is(x.owner)]
            if not idle:
                break
            try:
                await self._evict(idle, idle[0], setting)
            except CapacityError:  # all of them busy
                break
            stopped += 1
        return stopped

    async def _evict(self, candidates: list[Container], c: Container, cap: str) -> None:
        idle = [x for x in candidates if not x.lock.locked() and not x.starting and x.worker is not None]
        for victim in sorted(idle, key=lambda x: x.state.last_active_at):
            try:
                victim.lock.acquire_nowait()
            except anyio.WouldBlock:
                continue
            try:
                if victim.destroyed or victim.worker is None:
                    continue
                logger.info("evicting the idle worker of %s to make room for %s (%s)", victim.state.id, c.state.id, cap)
                if self.pool.flush is not None:
                    await self.pool.flush(victim)  # its variables come back from that snapshot
                await self.pool.stop(victim)
                victim.state_lost_pending = True
                victim.pending_warnings.append(
                    f"This session's worker was stopped while idle to make room for another session ({cap}, least "
                    f"recently used first). {LOST_SUFFIX}"
                )
                self.evictions += 1
                return
            finally:
                victim.lock.release()
        busy = len(candidates)
        raise CapacityError(f"All {busy} sandbox workers are busy running code ({cap}); no idle one can make room.")

    # ------------------------------------------------------------------------------------------ spares

    async def take(self, wait_s: float = 5.0) -> Spare | None:
        """`claim`, first waiting for a spare being started when none is ready (the first call after start-up):
        finishing that start is quicker than a second one beside it."""
        if not self.spares and self._filling:
            with anyio.move_on_after(wait_s):
                while not self.spares and self._filling:
                    self._spare_ready = anyio.Event()
                    await self._spare_ready.wait()
        return self.claim()

    def claim(self) -> Spare | None:
        """A ready spare for a new container (no longer a spare, still counted until `adopted()`)."""
        while self.spares:
            spare = self.spares.pop(0)
            if spare.worker.alive():
                self._claimed += 1
                return spare
            self.service.spawn("drop-spare", lambda s=spare: self._drop_spare(s))  # type: ignore[misc]
        return None

    def adopted(self, spare: Spare | None) -> None:
        """The container that claimed `spare` holds its worker now (or failed): refill the pool, a moment later
        so that starting the next spare does not compete for the CPU with this container's first run."""
        if spare is not None:
            self._claimed -= 1
        self.refill(REFILL_DELAY_S)

    def refill(self, delay_s: float = 0.0) -> None:
        if not self._closed and len(self.spares) + self._filling < self.warm_target:
            self.service.spawn("refill", lambda: self._refill(delay_s))

    async def _refill(self, delay_s: float = 0.0) -> None:
        if delay_s:
            await anyio.sleep(delay_s)
        while not self._closed and len(self.spares) + self._filling < self.warm_target:
            async with self._lock:
                if len(self.live()) + len(self.spares) + self._filling + self._claimed >= self.max_live:
                    return  # no room: live workers come first
                self._filling += 1
            try:
                folder = await self.containers.new_folder(self.profile)
                try:
                    tracker = await open_tracker(folder.root / "data", self.hub)
                    worker = None
                    try:
                        worker = await self.pool.spawn(folder.root, folder.uid, folder.gid, group=folder.cid)
                        with anyio.fail_after(10):
                            await worker.request(WARM_UP)
                    except BaseException:
                        tracker.close()
                        if worker is not None:
                            with anyio.CancelScope(shield=True):
                                await worker.kill()
                            self.pool.memory.remove(folder.cid)
                        raise
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self.containers.drop_folder(folder)
                    raise
            finally:
                self._filling -= 1
                self._spare_ready.set()
            spare = Spare(folder, worker, tracker)
            if self._closed:
                await self._drop_spare(spare)
                return
            self.spares.append(spare)

    async def _drop_spare(self, spare: Spare) -> None:
        spare.tracker.close()
        with anyio.CancelScope(shield=True):
            await spare.worker.kill()
            self.pool.memory.remove(spare.folder.cid)
            await self.containers.drop_folder(spare.folder)

    async def aclose(self) -> None:
        self._closed = True
        spares, self.spares = self.spares, []
        for spare in spares:
            await self._drop_spare(spare)
