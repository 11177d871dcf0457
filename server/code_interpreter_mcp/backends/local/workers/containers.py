"""The local backend's containers: the record of each, its folder on the host, and the registry of them all.

A container is `containers_dir / <id>` holding `data/` (mounted at /mnt/data in the sandbox, the worker's cwd), the
sandbox's /etc/passwd and /etc/group, and the worker's start-up log. The registry creates containers, resumes one
from its folder after a server restart (its variables are gone, its files are not), and deletes them. Workers are
the pool's (pool.py): a record here only holds the current one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
import time
from pathlib import Path

import anyio

from ....errors import ContainerExpired
from ....removal import remove_tree
from ....storage.blobs import owner_key
from ...base import ContainerState
from ..sandbox.profile import Profile, passwd_text
from ..sandbox.uids import UidAllocator
from ..tracking.folder import DataFolder
from .process import WorkerProcess

logger = logging.getLogger(__name__)


def valid_container_id(cid: str) -> bool:
    return re.fullmatch(r"lc_[0-9a-f]{24}", cid) is not None


def make_folder(root: Path, uid: int | None, gid: int | None, sandboxed: bool) -> None:
    """A container's folder (blocking): the data folder owned by the sandbox's uid, and what the sandbox needs."""
    root.mkdir(mode=0o700)
    data = root / "data"
    data.mkdir(mode=0o700)
    if uid is not None:
        os.chown(data, uid, gid if gid is not None else uid)
    if not sandboxed:
        (root / "tmp").mkdir(mode=0o700)
    else:
        puid = uid if uid is not None else os.getuid()
        pgid = gid if gid is not None else os.getgid()
        passwd, group = passwd_text(puid, pgid)
        (root / "passwd").write_text(passwd)
        (root / "group").write_text(group)
        os.chmod(root / "passwd", 0o644)
        os.chmod(root / "group", 0o644)


class Container:
    """The backend's own record of one container."""

    def __init__(
        self, state: ContainerState, root: Path, uid: int | None, gid: int | None, owner: str | None = None
    ) -> None:
        self.state = state
        self.owner = owner
        self.root = root
        self.folder = DataFolder(state.id, root / "data", uid, gid)
        self.uid = uid
        self.gid = gid
        self.lock = anyio.Lock(fast_acquire=True)  # one run (or quota action) at a time; uncontended: no yield
        self.worker: WorkerProcess | None = None
        self.had_worker = False  # a worker lived here: a new one means lost state
        self.state_lost_pending = False  # the next run reports state_lost
        self.pending_warnings: list[str] = []  # the next run reports these
        self.destroyed = False
        self.starting = False  # a worker is being started for it (it counts as live)
        self.running = False  # a run is in progress (a quota breach is the run's, not a background writer's)
        self.quota_hit: int | None = None  # set by the quota guard when a run overfilled the folder
        self.quota_killed = False  # the guard killed the sandbox mid-run: the folder kept growing
        self.wake: anyio.CancelScope | None = None  # the run's wait, cancelled by the guard to react at once
        # Whose namespace snapshots it keeps (kept in state.extra, so a container resumed after a restart knows).
        session = state.extra.get("session")
        key = state.extra.get("owner_key")
        self.session_id: str | None = session if isinstance(session, str) else None
        self.owner_key: str | None = key if isinstance(key, str) else None

    @property
    def data(self) -> Path:
        return self.folder.path

    def snapshot(self) -> ContainerState:
        """A copy of the state for callers (they must not alter ours)."""
        return dataclasses.replace(self.state, extra=dict(self.state.extra))

    def current(self) -> ContainerState:
        """The state as `refresh` reports it."""
        state = self.snapshot()
        if self.destroyed:
            state.status = "deleted"
        elif not state.usable():
            state.status = "expired"
        return state


def gone(container: ContainerState) -> ContainerState:
    """`refresh` of a container this process has no folder for."""
    status = container.status
    if status == "running":
        status = "expired" if not container.usable() else "deleted"
    return dataclasses.replace(container, status=status)


@dataclasses.dataclass
class NewFolder:
    """A container folder made before its container: a warm spare's (pool.py)."""

    cid: str
    root: Path
    uid: int | None
    gid: int | None


class ContainerRegistry:
    """Every container of this backend, by id."""

    def __init__(self, containers_dir: Path, uids: UidAllocator) -> None:
        self.dir = containers_dir
        self.uids = uids
        self._by_id: dict[str, Container] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def prepare(self) -> None:
        """The containers folder, private to the server (blocking)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def get(self, cid: str) -> Container | None:
        return self._by_id.get(cid)

    def live(self) -> list[Container]:
        """All records. From another thread this may raise RuntimeError (the registry changed meanwhile)."""
        return list(self._by_id.values())

    async def new_folder(self, profile: Profile) -> NewFolder:
        """A fresh container folder with its uid, not yet a container."""
        cid = "lc_" + secrets.token_hex(12)
        uid, gid = self.uids.allocate(profile.dedicated_uid)
        root = self.dir / cid
        try:
            await anyio.to_thread.run_sync(make_folder, root, uid, gid, profile.sandboxed)
        except BaseException:
            self.uids.release(uid)
            raise
        return NewFolder(cid, root, uid, gid)

    async def drop_folder(self, folder: NewFolder) -> None:
        """A folder no container adopted: its uid is free again, its files go."""
        self.uids.release(folder.uid)
        await anyio.to_thread.run_sync(remove_tree, folder.root)

    async def create(
        self,
        session_id: str,
        expires_after_s: float,
        profile: Profile,
        folder: NewFolder | None = None,
        owner: str | None = None,
    ) -> Container:
        """A container for the session, in `folder` when one was made ahead (a spare's), else a new one."""
        if folder is None:
            folder = await self.new_folder(profile)
        cid, uid, gid = folder.cid, folder.uid, folder.gid
        now = time.time()
        state = ContainerState(
            id=cid,
            backend="local",
            created_at=now,
            last_active_at=now,
            expires_after_s=float(expires_after_s),
            status="running",
            isolation=profile.isolation,
            extra={**({"uid": uid} if uid is not None else {}), "session": session_id, "owner_key": owner_key(owner)},
        )
        c = Container(state, folder.root, uid, gid, owner)
        self._by_id[cid] = c
        if not profile.sandboxed:
            logger.warning("UNSAFE: container %s for session %s runs code WITHOUT a sandbox", cid, session_id)
        return c

    def known(self, container: ContainerState) -> Container | None:
        """Our record of it; None when this process never had one. ContainerExpired once it was deleted."""
        c = self._by_id.get(container.id)
        if c is not None and c.destroyed:
            raise ContainerExpired(f"Container {container.id} was deleted.")
        return c

    async def adopt(self, container: ContainerState, profile: Profile) -> Container:
        """A container from before a server restart, if its folder survived (its variables are gone)."""
        if not valid_container_id(container.id) or not container.usable():
            raise ContainerExpired(f"Container {container.id} no longer exists.")
        root = self.dir / container.id
        try:
            st = await anyio.to_thread.run_sync(os.stat, root / "data")
        except OSError:
            raise ContainerExpired(f"Container {container.id} no longer exists.") from None
        uid = gid = None
        if profile.dedicated_uid:
            uid, gid = st.st_uid, st.st_gid
            if not self.uids.claim(uid):
                raise ContainerExpired(f"Container {container.id} cannot be resumed.")
        c = self._by_id.get(container.id)  # adopted concurrently meanwhile?
        if c is None:
            state = dataclasses.replace(container, status="running", isolation=profile.isolation)
            c = Container(state, root, uid, gid)
            c.state_lost_pending = True
            self._by_id[container.id] = c
            logger.info("resumed container %s from disk (its variables are gone)", container.id)
        return c

    def detach(self, cid: str) -> Container | None:
        """Take a container out of the registry for deletion; its worker is still to be stopped."""
        c = self._by_id.pop(cid, None)
        if c is not None:
            c.destroyed = True
        return c

    async def delete(self, cid: str, c: Container | None) -> None:
        """Free a detached container's uid and delete its folder (also one this process never had a record of)."""
        if c is not None:
            c.folder.close()
            self.uids.release(c.uid)
        if valid_container_id(cid):
            root = self.dir / cid
            await anyio.to_thread.run_sync(remove_tree, root)
