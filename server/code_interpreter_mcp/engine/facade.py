"""The `Engine`: the one object both faces (MCP and CLI) call. It wires the parts, starts and stops them (the
registry, the backend, the housekeeping loop) and hands each call to the part that owns it.

It owns lifecycle and wiring only: which container, how a run goes, how files come out and how results are shaped
live in the modules it wires. It knows no MCP types.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from ..backends import create_backend
from ..backends.base import Backend, Neighbours
from ..config import Settings
from ..errors import BackendError, CIError
from ..models import CloseResult
from ..sessions import Registry, Session, open_database
from ..storage.blobs import owner_key
from ..storage.leases import Leases
from .containers import Containers
from .context import EngineContext
from .files import Files
from .homes import Homes
from .inputs import Inputs
from .owner_caps import OwnerCaps
from .packages import Packages
from .progress import Relays
from .run import Runner
from .runs import Runs
from .session_choice import SessionChooser

logger = logging.getLogger(__name__)

MIRROR_PASS_S = 0.5
"""How often the shared store's queue is looked at (a snapshot reaches the store within about this long)."""
MIRROR_RETRY_S = 3.0
"""How often a store that did not answer is tried again."""


class Engine:
    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.ctx = EngineContext(settings, backend if backend is not None else create_backend(settings))
        self.containers = Containers(self.ctx)
        self.inputs = Inputs(self.ctx, self.containers)
        self.files = Files(self.ctx, self.containers)
        self.relays = Relays()
        self.packages = Packages(self.ctx)
        self.containers.retired.append(self.packages.container_gone)
        self.runner = Runner(self.ctx, self.containers, self.inputs, self.relays, self.packages)
        self.sessions = SessionChooser(self.ctx)
        self.runs = Runs(self.ctx, self.runner)
        self._started = False
        # The calls of the faces that one part answers alone are that part's own methods.
        self.ready = self.ctx.ready
        self.session_for = self.sessions.session_for
        self.run_code = self.runner.run_code
        self.upload = self.inputs.upload
        self.read_resource = self.files.read_resource
        self.reap_expired = self.containers.reap_expired
        # Runs in the background (the MCP face): run_code that returns 'running' after wait_s, and its handles.
        self.start_run = self.runs.start
        self.get_run = self.runs.get
        self.cancel_run = self.runs.cancel
        self.list_files = self.runs.beside(self.files.list_files)  # file tools answer during a run
        self.download = self.runs.beside(self.files.download)
        self.upload = self.runs.guard(self.inputs.upload, "take uploads")

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def backend(self) -> Backend:
        return self.ctx.backend

    @property
    def registry(self) -> Registry | None:
        return self.ctx.registry

    @property
    def reg(self) -> Registry:
        return self.ctx.reg

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def start(self, wait_for_backend: bool = True) -> None:
        """Open the registry and start the backend. With wait_for_backend=False the backend's start (the
        sandbox probe) is left to `running()`, so a server can answer tools/list before the probe ends."""
        if self._started:
            return
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        settings.files_dir.mkdir(parents=True, exist_ok=True)
        self.ctx.registry = await anyio.to_thread.run_sync(Registry, open_database(settings))
        self.ctx.blobs.load(*await anyio.to_thread.run_sync(self.ctx.registry.stored_copies_sync))
        if self.ctx.mirror is not None:
            self.ctx.mirror.needed = self.ctx.registry.holds_sync
        if settings.replica_url:
            leases = Leases(self.ctx.registry.database, settings.replica_url, settings.lease_s)
            self.ctx.homes = Homes(self.ctx, leases)
            if settings.max_live_containers_per_owner is not None and hasattr(self.backend, "neighbours"):
                caps = self.ctx.homes.caps = OwnerCaps(self.ctx, leases)
                self.backend.neighbours = Neighbours(caps.live_elsewhere, caps.evict_elsewhere)
            await self.ctx.homes.beat()
        self._started = True
        if wait_for_backend:
            await self._start_backend()

    async def _start_backend(self) -> None:
        backend = self.backend
        error: CIError | None = None
        try:
            await backend.start()
            logger.info(
                "engine ready: backend=%s isolation=%s data=%s", backend.name, backend.isolation, self.settings.data_dir
            )
        except CIError as exc:
            error = exc
            logger.error("backend %s is unusable: %s", backend.name, exc.user_text())
        except Exception as exc:
            logger.exception("backend %s failed to start", backend.name)
            error = BackendError(f"The {backend.name} backend failed to start: {exc}")
        finally:
            self.ctx.backend_started(error)

    async def aclose(self) -> None:
        if not self._started:
            return
        self._started = False
        reg = self.reg
        with anyio.CancelScope(shield=True):
            try:
                await self.runs.shutdown()
                if self.ctx.backend_ok:
                    await self.backend.save_state()  # before retiring: a worker's snapshot dies with it
                if self.ctx.backend_ok and (
                    self.settings.delete_containers_on_shutdown or self.backend.name == "local"
                ):
                    await self.containers.retire_all()
                await reg.flush()
                if self.ctx.homes is not None:
                    await self.ctx.homes.release()
                await self.backend.aclose()
            finally:
                await self.packages.aclose()
                reg.close()
                await self.ctx.guard.aclose()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        """Start the engine, its backend and its housekeeping; stop them (and the containers, as configured)."""
        await self.start(wait_for_backend=False)
        try:
            async with anyio.create_task_group() as tg:
                self.runs.task_group = tg  # runs belong to the engine, not to the request that started them
                tg.start_soon(self._start_backend)
                tg.start_soon(anyio.to_thread.run_sync, self.ctx.blobs.sweep)
                tg.start_soon(self.packages.start)
                tg.start_soon(self._housekeeping)
                if self.ctx.mirror is not None:
                    tg.start_soon(self._mirroring)
                if self.ctx.homes is not None:
                    tg.start_soon(self._beating)
                tg.start_soon(self.ctx.guard.warm)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await self.aclose()

    async def _housekeeping(self) -> None:
        """One loop for the periodic work: progress ticks of long runs, deferred registry writes, the reaper."""
        next_reap = time.monotonic() + self.settings.reaper_interval_s
        while True:
            await anyio.sleep(0.25)
            await self.relays.tick()
            await self.runs.tick()
            self.packages.settle()
            try:
                await self.reg.flush()
                if time.monotonic() >= next_reap and self.ctx.backend_ok:
                    next_reap = time.monotonic() + self.settings.reaper_interval_s
                    await self.reap_expired()
            except Exception:
                logger.exception("housekeeping pass failed")

    async def _beating(self) -> None:
        """This replica's beat (its own task: a database that does not answer must not hold up the rest)."""
        while self.ctx.homes is not None:
            await anyio.sleep(self.settings.lease_s / 3)
            homes = self.ctx.homes
            if homes is None:
                return
            try:
                await homes.beat()
            except Exception:
                logger.exception("replica beat failed")

    async def _mirroring(self) -> None:
        """The shared store's background pass: queued snapshots, uploads that waited for it, due deletions."""
        mirror = self.ctx.mirror
        assert mirror is not None
        while True:
            await anyio.sleep(MIRROR_PASS_S if mirror.last_error is None else MIRROR_RETRY_S)
            if mirror.backlog:
                try:
                    await anyio.to_thread.run_sync(mirror.drain)
                except Exception:
                    logger.exception("store pass failed")

    # ---- the calls of the faces that need more than one part ----------------------------------------------

    async def close_session(self, session: Session, delete_files: bool = False) -> CloseResult:
        await self.ctx.backend_settled()
        await self.runs.stop_session(session)
        async with session.lock:
            stopped = await self.containers.retire_session(session)
            if delete_files:
                await self.files.delete_all(session)
            await self.reg.close_session(session)
            if self.ctx.snapshots is not None:  # its workers are gone: no snapshot of it is being written any more
                await anyio.to_thread.run_sync(self.ctx.snapshots.delete, owner_key(session.owner), session.id)
            self.sessions.forget(session)
            return CloseResult(
                session_id=session.id, closed=True, containers_stopped=stopped, files_kept=not delete_files
            )

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend.describe(), "settings": self.settings.public_view()}
