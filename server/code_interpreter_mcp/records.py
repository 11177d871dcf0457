"""The registry's records: a session, its containers, the files harvested from them and its runs.

Plain data kept in memory by `sessions.Registry` (which writes them through to SQLite); nothing here does I/O.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

import anyio

from .backends.base import ContainerState, RemoteFile


def new_id(prefix: str, nbytes: int = 16) -> str:
    return f"{prefix}{secrets.token_hex(nbytes)}"


def new_ids(prefix: str, count: int, nbytes: int = 16) -> list[str]:
    """`count` ids as `new_id` makes them, from one read of the system's random source (one a file of a
    harvest costs a system call each)."""
    pool, step = secrets.token_hex(nbytes * count), 2 * nbytes
    return [prefix + pool[i : i + step] for i in range(0, step * count, step)]


@dataclass
class FileRecord:
    file_id: str
    session_id: str
    container_id: str
    path: str
    name: str
    bytes: int
    mime_type: str
    sha256: str | None
    source: str
    created_at: float
    local_path: str | None
    remote_id: str | None
    version: str
    seq: int = 0
    blob: str | None = None  # sha256 of the copy in the owner's blob store; None: a copy of the legacy layout
    disk_bytes: int | None = None  # what the copy costs on the host (allocated blocks)
    dropped: bool = False  # a superseded version whose copy was let go past the history quota


@dataclass
class RunRow:
    """A run as persisted: 'running' until it ends; then its status and its result (the RunResult as JSON, or
    the error that ended it), so it can be reported after a restart."""

    id: str
    session_id: str
    status: str
    started_at: float
    ended_at: float | None
    pid: int
    result: str | None

    def orphaned(self) -> bool:
        """Still 'running' on disk, but no live process runs it: the registry in memory has no such run (a
        restart, even under the same pid) or the process that started it is gone."""
        if self.status != "running":
            return False
        if self.pid == os.getpid():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, under another uid
            return False
        return False


@dataclass
class ContainerRecord:
    state: ContainerState
    session_id: str
    runs: int = 0
    # Last listing of the live container (path -> RemoteFile): the "before" of the next run's diff.
    snapshot: dict[str, RemoteFile] = field(default_factory=dict)
    # True once this process has seen the container alive; rows loaded from disk must be re-checked.
    verified: bool = False
    # The backend's listing the snapshot was made from: a backend that hands back the same list object while
    # nothing changed (local: kept from inotify) lets an unchanged container be recognised without a compare.
    listed: list[RemoteFile] | None = None


@dataclass
class Session:
    id: str
    owner: str | None
    created_at: float
    last_used_at: float
    closed: bool = False
    current_container: str | None = None
    files: list[FileRecord] = field(default_factory=list)
    # fast_acquire: an uncontended lock costs no trip through the event loop (every run takes it)
    lock: anyio.Lock = field(default_factory=lambda: anyio.Lock(fast_acquire=True))
    packages: list[str] = field(default_factory=list)  # requirements installed for it, restored in a new container
    env: dict[str, str] = field(default_factory=dict)  # variables kept for every run (persist_env)

    def latest_files(self, container_id: str | None = None) -> list[FileRecord]:
        """Newest version of each path (per container when given, else across the session)."""
        latest: dict[tuple[str, str], FileRecord] = {}
        for rec in self.files:
            if container_id is not None and rec.container_id != container_id:
                continue
            key = (rec.container_id if container_id is not None else "", rec.path)
            latest[key] = rec
        return sorted(latest.values(), key=lambda r: r.seq)

    def find_file(self, file_id: str) -> FileRecord | None:
        for rec in self.files:
            if rec.file_id == file_id:
                return rec
        return None
