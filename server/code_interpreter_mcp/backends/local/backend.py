"""LocalBackend: the Backend protocol over containers that are folders on this host, each with one long-lived
Python worker in bubblewrap.

A thin adapter: the isolation probe (probe.py) picks the profile, the registry (containers.py) keeps the containers
and their folders, the pool (pool.py) their workers, capacity.py the caps and warm spares, the runner (runs.py) one
run, the quota guard (quota.py) the disk quota, each container's data folder (folder.py) its files from one shared
inotify instance, and service.py the background tasks (reading that instance, refilling spares). This module wires
them up and keeps none of their logic.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from ...config import Settings
from ...errors import BackendError, CIError, ContainerExpired
from ...storage.snapshots import SnapshotStore
from ..base import (
    Capabilities,
    ContainerState,
    CopySink,
    ExecOutcome,
    ExecRequest,
    FetchResult,
    Neighbours,
    Progress,
    RemoteFile,
    RepairOutcome,
)
from .sandbox import fonts, seccomp
from .sandbox import profile as sandbox
from .sandbox.memory import MemoryLimiter
from .sandbox.uids import UidAllocator
from .tracking.changes import Inotify, serve
from .workers import containers
from .workers.capacity import Capacity
from .workers.containers import Container, ContainerRegistry
from .workers.pool import WorkerPool, package_sets
from .workers.probe import IsolationProbe
from .workers.quota import HARD_MARGIN, QuotaGuard
from .workers.runs import Runner
from .workers.service import Service
from .workers.snapshots import Keeper

logger = logging.getLogger(__name__)


class _Started:
    """What exists only between start() and aclose()."""

    def __init__(
        self,
        pool: WorkerPool,
        quota: QuotaGuard,
        runner: Runner,
        capacity: Capacity,
        service: Service,
        hub: Inotify | None,
        keeper: Keeper | None = None,
    ) -> None:
        self.pool = pool
        self.quota = quota
        self.runner = runner
        self.capacity = capacity
        self.service = service
        self.hub = hub
        self.keeper = keeper


class LocalBackend:
    """The `local` backend. Construct with `LocalBackend(settings)`, then `await start()`."""

    name = "local"
    capabilities = Capabilities(model=False, signals_code_done=False, packages=True, streams_output=True, env=True)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.isolation = "bubblewrap"
        self.profile: sandbox.Profile | None = None
        self.quota_bytes = int(settings.box_size_mb) * 1024 * 1024
        uids = UidAllocator()
        self._containers = ContainerRegistry(settings.containers_dir, uids)
        self._seccomp = seccomp.program()
        self._probe = IsolationProbe(settings, uids, self._seccomp)
        self._pool: WorkerPool | None = None  # kept after aclose(), for describe()
        self._capacity: Capacity | None = None
        self._live: _Started | None = None
        # Sessions' namespace snapshots: the engine counts them against its store and deletes a closed session's.
        self.snapshots = SnapshotStore(settings.files_dir)
        self.snapshots_off: str | None = snapshots_off(settings)  # why they are off, None when on
        self.neighbours: Neighbours | None = None  # the other replicas' part in per-owner caps (set by the engine)

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._live is not None:
            return
        s = self.settings
        await anyio.to_thread.run_sync(self._containers.prepare)
        sets = package_sets(self.settings)
        if sets is not None:
            await anyio.to_thread.run_sync(_prepare_package_sets, sets)
        profile = await self._probe.choose()
        self.profile = profile
        self.isolation = profile.isolation
        memory = MemoryLimiter(int(s.memory_mb) * 1024 * 1024)
        pool = WorkerPool(s, profile, self._seccomp, await fonts.prepare(s), memory)
        service = Service()
        await service.start()
        try:
            hub: Inotify | None = Inotify()
        except OSError as exc:
            logger.warning("no inotify instance (%s): container folders are rescanned instead", exc)
            hub = None
        quota = QuotaGuard(s, pool, service)
        capacity = Capacity(s, self._containers, pool, profile, service, hub)
        capacity.neighbours = self.neighbours
        self._pool, self._capacity = pool, capacity
        keeper = None
        if self.snapshots_off is None:
            await anyio.to_thread.run_sync(self.snapshots.scan)
            keeper = Keeper(self.snapshots, int(s.snapshot_max_mb * 2**20), service.spawn)
            keeper.find = self._container_of
            pool.snapshot_max_bytes = keeper.max_bytes
            pool.started = keeper.listen
            pool.flush = keeper.flush
        self._live = _Started(pool, quota, Runner(s, pool, quota, keeper), capacity, service, hub, keeper)
        if hub is not None:
            poll_s = float(s.quota_check_interval_s or 2.0)
            service.spawn("inotify", lambda: serve(hub, poll_s=poll_s))
        capacity.refill()
        if logger.isEnabledFor(logging.INFO):  # describe() reads the mount table and probes paths
            logger.info("local backend ready: %s", self.describe())

    async def aclose(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            with anyio.CancelScope(shield=True):
                if live.keeper is not None:
                    await self._save(live.keeper)
                    live.keeper.close()
                await live.capacity.aclose()
                await live.service.aclose()
                await live.pool.stop_all(self._containers.live())
                for c in self._containers.live():
                    c.folder.close()
                if live.hub is not None:
                    live.hub.close()
                live.pool.memory.sweep()

    async def save_state(self) -> None:
        live = self._live
        if live is not None and live.keeper is not None:
            with anyio.CancelScope(shield=True):
                await self._save(live.keeper)

    async def _save(self, keeper: Keeper) -> None:
        """Every idle worker's due snapshot written, and those being written finished: a restart keeps the last
        run's variables. Before containers are retired, whose workers' snapshot children die with them."""
        async with anyio.create_task_group() as tg:
            for c in self._containers.live():
                if c.worker is not None and not c.lock.locked():
                    tg.start_soon(keeper.flush, c, 5.0)
        await keeper.drain(5.0)

    def _container_of(self, worker: object) -> Container | None:
        for c in self._containers.live():
            if c.worker is worker:
                return c
        return None

    def _require_started(self) -> _Started:
        if self._live is None:
            raise BackendError("The local backend is not started.", "Call start() first.")
        return self._live

    async def _watch(self, c: Container) -> None:
        """Track the container's folder and enforce its quota (once)."""
        live = self._require_started()
        async with c.lock:
            if c.folder.tracker is None and not c.destroyed:
                await c.folder.open(live.hub)
                live.quota.watch(c)

    # ------------------------------------------------------------------------------------------ containers

    async def create_container(
        self, session_id: str, expires_after_s: float, owner: str | None = None
    ) -> ContainerState:
        live = self._require_started()
        spare = await live.capacity.take()
        c = await self._containers.create(
            session_id, expires_after_s, live.pool.profile, spare.folder if spare else None, owner
        )
        try:
            if spare is not None:
                c.folder.attach(spare.tracker)
                live.quota.watch(c)
                c.worker, c.had_worker = spare.worker, True
            else:
                await self._watch(c)
            async with c.lock:
                await live.pool.ensure(c)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.destroy(c.state)
            raise
        finally:
            live.capacity.adopted(spare)  # the spare counts as this container's worker now
        return c.snapshot()

    async def _lookup(self, container: ContainerState) -> Container:
        c = self._containers.known(container)
        if c is None:
            c = await self._containers.adopt(container, self._require_started().pool.profile)
        if c.folder.tracker is None:
            await self._watch(c)
        return c

    async def refresh(self, container: ContainerState) -> ContainerState:
        c = self._containers.get(container.id)
        if c is None:
            try:
                c = await self._lookup(container)
            except ContainerExpired:
                return containers.gone(container)
        return c.current()

    async def destroy(self, container: ContainerState) -> None:
        c = self._containers.detach(container.id)
        if c is not None and self._pool is not None:
            with anyio.CancelScope(shield=True):
                await self._pool.stop(c)
        await self._containers.delete(container.id, c)

    # ------------------------------------------------------------------------------------------ runs and files

    async def execute(self, container: ContainerState, request: ExecRequest, progress: Progress) -> ExecOutcome:
        runner = self._require_started().runner
        return await runner.execute(await self._lookup(container), request, progress)

    async def list_files(self, container: ContainerState) -> list[RemoteFile]:
        return await (await self._lookup(container)).folder.list()

    async def fetch_file(self, container: ContainerState, file: RemoteFile, dest: Path, max_bytes: int) -> FetchResult:
        return await (await self._lookup(container)).folder.fetch(file.path, dest, max_bytes)

    async def fetch_files(
        self, container: ContainerState, files: list[RemoteFile], max_bytes: int, sink: CopySink
    ) -> list[FetchResult | CIError]:
        folder = (await self._lookup(container)).folder
        return await folder.fetch_many([f.path for f in files], max_bytes, sink)

    async def put_file(self, container: ContainerState, src: Path, dest_path: str) -> RemoteFile:
        folder = (await self._lookup(container)).folder
        return await folder.put(src, dest_path, self.settings.max_file_bytes, self.quota_bytes)

    async def repair_json(self, schema: dict[str, Any], raw: str, problems: list[str]) -> RepairOutcome | None:
        return None

    # ------------------------------------------------------------------------------------------ facts

    def live_owners(self) -> dict[str | None, int]:
        """How many live workers each owner has here (for the per-owner cap across replicas)."""
        counts: dict[str | None, int] = {}
        if self._live is not None:
            for c in self._live.capacity.live():
                counts[c.owner] = counts.get(c.owner, 0) + 1
        return counts

    async def stop_idle_of(self, owner_is: Callable[[str | None], bool], n: int, setting: str) -> int:
        """Stop up to `n` idle workers of an owner, for its cap on another replica (`Capacity.stop_idle_of`)."""
        return 0 if self._live is None else await self._live.capacity.stop_idle_of(owner_is, n, setting)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        mpl_cache = self._pool.mpl_cache if self._pool is not None else None
        return {
            "backend": self.name,
            "isolation": self.isolation,
            **sandbox.profile_facts(self.profile),
            "limits": {
                "memory_mb": s.memory_mb,
                "cpu_seconds": s.cpu_seconds,
                "max_file_bytes": s.max_file_bytes,
                "max_open_files": s.max_open_files,
                "max_processes": s.max_processes,
                "disk_quota_mb": s.box_size_mb,
                "disk_quota_margin": f"{HARD_MARGIN // 2**20} MiB plus one write call in flight per writing process "
                "(at most max_file_bytes); "
                + (
                    "fallocate refused (EOPNOTSUPP)"
                    if self.profile is not None and self.profile.seccomp
                    else "fallocate NOT bounded (no seccomp filter)"
                ),
                "output_cap_chars": s.output_cap_chars,
                "interrupt_grace_s": s.interrupt_grace_s,
            },
            "memory": self._pool.memory.describe() if self._pool is not None else None,
            "capacity": self._capacity.describe() if self._capacity is not None else None,
            "blas_threads": self._pool.threads if self._pool is not None else None,
            "data_folder_in_mount_table": sandbox.mount_table_path(s.containers_dir) + "/<container>/data",
            "change_tracking": "inotify" if self._live is not None and self._live.hub is not None else "rescans",
            "matplotlib_font_cache": str(mpl_cache) if mpl_cache else None,
            "snapshots": "on" if self.snapshots_off is None else f"off ({self.snapshots_off})",
            "containers": len(self._containers),
            "notes": list(self.profile.notes) if self.profile is not None else [],
            "probe_failures": list(self._probe.failures),
        }


def snapshots_off(settings: Settings) -> str | None:
    """Why namespace snapshots are off on this server, or None when they are on."""
    if settings.snapshots == "off":
        return "SNAPSHOTS=off"
    if importlib.util.find_spec("dill") is None:
        return "dill is not installed"
    return None


def _prepare_package_sets(sets: Path) -> None:
    """The folder workers bind must exist before the first one starts (a bind of a missing folder fails, and a
    later one would not appear in a live sandbox), and be traversable by a dedicated uid."""
    sets.mkdir(parents=True, exist_ok=True)
    if sets.stat().st_uid == os.geteuid():
        os.chmod(sets, 0o755)
