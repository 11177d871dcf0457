"""What every part of the engine shares: the settings, the backend and its capabilities, the registry once it is
open, whether the backend started, and the guard that checks caller schemas and JSON off the event loop.

It owns that state and the waiting on it, nothing else: no lifecycle policy (the facade starts and stops things),
no MCP types.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from ..backends.base import Backend, Capabilities
from ..config import Settings
from ..errors import CIError
from ..sessions import Registry
from ..storage.blobs import BlobStore
from ..storage.mirror import Mirror
from ..storage.objects import open_store
from ..storage.snapshots import SnapshotStore
from ..structured.guard import Guard

if TYPE_CHECKING:
    from .homes import Homes

COPY_THREADS = 2
"""A harvest's large files are copied in at most this many batches at once (worker threads), so one large file
does not hold up the others."""

SMALL_FILE_BYTES = 1024 * 1024
"""Files up to this size go in one batch of their own: a copy that costs a few syscalls is bound by the GIL, and
two threads making short syscalls hand the GIL to each other at every one (1,000 files of 200 B: 46 ms in one
thread, 570 ms dealt to two)."""


class EngineContext:
    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.capabilities: Capabilities = backend.capabilities
        self.registry: Registry | None = None
        self.blobs = BlobStore(settings.files_dir, int(settings.max_stored_mb * 1024 * 1024))
        # The backend's snapshots of namespaces (local backend) count against the same store of files.
        snapshots = getattr(backend, "snapshots", None)
        self.snapshots: SnapshotStore | None = snapshots if isinstance(snapshots, SnapshotStore) else None
        if self.snapshots is not None:
            store, blobs = self.snapshots, self.blobs
            blobs.extra_bytes = lambda: store.used_bytes
            store.room = lambda extra: blobs.used_bytes + extra <= blobs.max_bytes
        shared = open_store(settings.store_url)
        self.mirror: Mirror | None = None  # the shared store (STORE_URL) behind the data folder, when set
        if shared is not None:
            mirror = self.mirror = Mirror(shared, settings.files_dir, settings.data_dir / "store-pending.json")
            self.blobs.released = mirror.forget
            if self.snapshots is not None:
                self.snapshots.committed = mirror.snapshot_written
                self.snapshots.deleted = lambda key, session: mirror.forget_prefix(f"{key}/snapshots/{session}/")
        self.homes: Homes | None = None  # this replica's sessions (REPLICA_URL), set once the registry is open
        # A signed call to another replica's `/cluster/<name>` (set by the HTTP face): its JSON answer.
        self.replica_call: Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]] | None = None
        self.backend_error: CIError | None = None
        self._started = anyio.Event()
        self.guard = Guard(settings.schema_time_limit_s)  # schema checks and JSON validation, off the event loop

    @property
    def reg(self) -> Registry:
        if self.registry is None:
            raise RuntimeError("engine not started")
        return self.registry

    def backend_started(self, error: CIError | None) -> None:
        """The backend's start ended, with `error` when it is unusable."""
        self.backend_error = error
        self._started.set()

    @property
    def backend_ok(self) -> bool:
        """Started and usable, without waiting: a backend still starting is not ok yet."""
        return self._started.is_set() and self.backend_error is None

    async def backend_settled(self) -> None:
        """Wait until the backend's start ended, either way."""
        await self._started.wait()

    async def backend_usable(self) -> bool:
        await self._started.wait()
        return self.backend_error is None

    async def ready(self) -> None:
        """Wait for the backend's start; raise its error (with its hint) if it could not start."""
        if not self._started.is_set():  # waiting on a set Event still costs a trip through the loop
            await self._started.wait()
        if self.backend_error is not None:
            raise self.backend_error
