"""The session registry: session -> containers -> harvested files, with ownership and expiry bookkeeping.

Memory is the source of truth while the process runs; every change is written through to the database (SQLite
in the data folder, or PostgreSQL with `DATABASE_URL`; `storage.database`) in a worker thread, so sessions,
containers and the harvested files' records survive a restart. Ids are unguessable (128-bit random); a session
is only visible to its owner.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import BaseModel

from .backends.base import ContainerState
from .errors import SessionNotFound
from .records import ContainerRecord, FileRecord, RunRow, Session, new_id
from .storage.catalog import StoredCopies, measure_legacy_copies, stored_copies
from .storage.database import Database, PostgresDatabase, SqliteDatabase, Statement
from .storage.leases import LEASES_SCHEMA

if TYPE_CHECKING:
    from .config import Settings

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, owner TEXT, created_at REAL NOT NULL, last_used_at REAL NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0, current_container TEXT);
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY, session_id TEXT NOT NULL, backend TEXT NOT NULL, created_at REAL NOT NULL,
    last_active_at REAL NOT NULL, expires_after_s REAL NOT NULL, status TEXT NOT NULL, isolation TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0, extra TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS files (
    file_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, container_id TEXT NOT NULL, path TEXT NOT NULL,
    name TEXT NOT NULL, bytes INTEGER NOT NULL, mime_type TEXT NOT NULL, sha256 TEXT, source TEXT NOT NULL,
    created_at REAL NOT NULL, local_path TEXT, remote_id TEXT, version TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, session_id TEXT NOT NULL, status TEXT NOT NULL, started_at REAL NOT NULL,
    ended_at REAL, pid INTEGER NOT NULL, result TEXT);
CREATE INDEX IF NOT EXISTS files_by_session ON files(session_id, seq);
CREATE INDEX IF NOT EXISTS containers_by_session ON containers(session_id);
"""
    + LEASES_SCHEMA
)

# Columns added after the first release, each (table, column, definition): a database made before gets them.
# `files.blob` is the sha256 of the copy in the owner's blob store (NULL: the copy lies at `local_path` in the
# one-folder-per-file layout of earlier versions, read where it is), `disk_bytes` what that copy costs on disk,
# `dropped` a superseded version whose copy was let go (its record stays, so a download can name the current one).
ADDED_COLUMNS = [
    ("sessions", "packages", "TEXT NOT NULL DEFAULT '[]'"),
    ("sessions", "env", "TEXT NOT NULL DEFAULT '{}'"),
    ("files", "blob", "TEXT"),
    ("files", "disk_bytes", "INTEGER"),
    ("files", "dropped", "INTEGER NOT NULL DEFAULT 0"),
]

FILE_FIELDS = (
    "file_id, session_id, container_id, path, name, bytes, mime_type, sha256, source, created_at, local_path, "
    "remote_id, version, seq, blob, disk_bytes, dropped"
)


def open_database(settings: Settings) -> Database:
    """The registry's database for these settings: PostgreSQL at `database_url`, else SQLite in the data folder."""
    if settings.database_url:
        return PostgresDatabase(settings.database_url, SCHEMA, ADDED_COLUMNS, _migrate)
    return SqliteDatabase(settings.db_path, SCHEMA, ADDED_COLUMNS, _migrate)


def _migrate(db: Database, added: list[tuple[str, str]]) -> None:
    if any(table == "files" for table, _ in added):
        measure_legacy_copies(db)
    # No index on files(blob): only the start-up count reads by blob (a full scan either way, no slower without
    # it), while every harvest paid for it: 1,000 records into 8,000-16,000 took 14-15 ms with it, 9 without.
    db.transaction([("DROP INDEX IF EXISTS files_by_blob", ())])


class Registry:
    """Sessions, containers and file records, persisted in a `Database` (a path: SQLite there)."""

    def __init__(self, db: Database | Path) -> None:
        self._db: Database = SqliteDatabase(db, SCHEMA, ADDED_COLUMNS, _migrate) if isinstance(db, Path) else db
        self.sessions: dict[str, Session] = {}
        self.containers: dict[str, ContainerRecord] = {}
        self._dirty: dict[str, ContainerRecord] = {}
        # With replicas: the (replica, epoch) this process holds a session at, None when it does not hold it.
        # A container's row is then written only while that is still the session's home in the registry, so a
        # former home (paused, or cut off from the database) never writes back over its successor's rows.
        self.held_at: Callable[[str], tuple[str, int] | None] | None = None
        self._run_rows: list[tuple[str, tuple[Any, ...]]] = []  # run starts and ends, in order, for `flush`
        self._flush_lock = anyio.Lock()
        self._seq = int((self._db.row("SELECT COALESCE(MAX(seq), 0) FROM files") or (0,))[0])

    # ---- persistence helpers -------------------------------------------------------------------------------

    @property
    def database(self) -> Database:
        return self._db

    def _write_sync(self, statements: list[Statement]) -> None:
        self._db.transaction(statements)

    async def _write(self, *statements: Statement) -> None:
        await anyio.to_thread.run_sync(self._write_sync, list(statements))

    def close(self) -> None:
        self._db.close()

    # ---- sessions ------------------------------------------------------------------------------------------

    async def create_session(self, owner: str | None) -> Session:
        now = time.time()
        session = Session(id=new_id("s_"), owner=owner, created_at=now, last_used_at=now)
        self.sessions[session.id] = session
        await self._write(
            (
                "INSERT INTO sessions (id, owner, created_at, last_used_at) VALUES (?, ?, ?, ?)",
                (session.id, owner, now, now),
            )
        )
        return session

    def _load_session_sync(self, session_id: str) -> Session | None:
        db = self._db
        row = db.row(
            "SELECT id, owner, created_at, last_used_at, closed, current_container, packages, env "
            "FROM sessions WHERE id = ?",
            (session_id,),
        )
        if row is None:
            return None
        session = Session(
            id=row[0],
            owner=row[1],
            created_at=row[2],
            last_used_at=row[3],
            closed=bool(row[4]),
            current_container=row[5],
        )
        session.packages = json.loads(row[6])
        session.env = json.loads(row[7])
        for c in db.rows(
            "SELECT id, backend, created_at, last_active_at, expires_after_s, status, isolation, runs, extra "
            "FROM containers WHERE session_id = ?",
            (session_id,),
        ):
            state = ContainerState(
                id=c[0],
                backend=c[1],
                created_at=c[2],
                last_active_at=c[3],
                expires_after_s=c[4],
                status=c[5],
                isolation=c[6],
                extra=json.loads(c[8]),
            )
            self.containers.setdefault(c[0], ContainerRecord(state=state, session_id=session_id, runs=c[7]))
        session.files = [
            FileRecord(*r[:-1], dropped=bool(r[-1]))
            for r in db.rows(f"SELECT {FILE_FIELDS} FROM files WHERE session_id = ? ORDER BY seq", (session_id,))
        ]
        return session

    async def get_session(self, session_id: str, owner: str | None) -> Session:
        """The session, if it exists, is open and belongs to `owner`; else SessionNotFound (never 'forbidden')."""
        session = self.sessions.get(session_id)
        if session is None and isinstance(session_id, str) and session_id.startswith("s_") and len(session_id) < 80:
            session = await anyio.to_thread.run_sync(self._load_session_sync, session_id)
            if session is not None:
                session = self.sessions.setdefault(session_id, session)
        if session is None or session.closed or session.owner != owner:
            raise SessionNotFound(f"No session {session_id!r} is open for this client.")
        return session

    async def touch_session(self, session: Session) -> None:
        session.last_used_at = time.time()

    async def close_session(self, session: Session) -> None:
        session.closed = True
        session.current_container = None
        await self._write(("UPDATE sessions SET closed = 1, current_container = NULL WHERE id = ?", (session.id,)))

    async def save_packages(self, session: Session, requirements: list[str]) -> None:
        session.packages = list(requirements)
        await self._write(("UPDATE sessions SET packages = ? WHERE id = ?", (json.dumps(session.packages), session.id)))

    async def save_env(self, session: Session, env: dict[str, str]) -> None:
        session.env = dict(env)
        await self._write(("UPDATE sessions SET env = ? WHERE id = ?", (json.dumps(session.env), session.id)))

    async def forget_files(self, session: Session) -> list[FileRecord]:
        removed, session.files = session.files, []
        await self._write(("DELETE FROM files WHERE session_id = ?", (session.id,)))
        return removed

    # ---- containers ----------------------------------------------------------------------------------------

    async def add_container(self, session: Session, state: ContainerState) -> ContainerRecord:
        rec = ContainerRecord(state=state, session_id=session.id, verified=True)
        self.containers[state.id] = rec
        session.current_container = state.id
        await self._write(
            (
                "INSERT INTO containers (id, session_id, backend, created_at, last_active_at, "
                "expires_after_s, status, isolation, runs, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET session_id = excluded.session_id, backend = excluded.backend, "
                "created_at = excluded.created_at, last_active_at = excluded.last_active_at, "
                "expires_after_s = excluded.expires_after_s, status = excluded.status, "
                "isolation = excluded.isolation, runs = excluded.runs, extra = excluded.extra",
                (
                    state.id,
                    session.id,
                    state.backend,
                    state.created_at,
                    state.last_active_at,
                    state.expires_after_s,
                    state.status,
                    state.isolation,
                    0,
                    json.dumps(state.extra),
                ),
            ),
            (
                "UPDATE sessions SET current_container = ?, last_used_at = ? WHERE id = ?",
                (state.id, time.time(), session.id),
            ),
        )
        return rec

    def _container_update(self, rec: ContainerRecord) -> tuple[str, tuple[Any, ...]] | None:
        s = rec.state
        sql = (
            "UPDATE containers SET last_active_at = ?, expires_after_s = ?, status = ?, runs = ?, extra = ? "
            "WHERE id = ?"
        )
        params: tuple[Any, ...] = (s.last_active_at, s.expires_after_s, s.status, rec.runs, json.dumps(s.extra), s.id)
        if self.held_at is None:
            return sql, params
        held = self.held_at(rec.session_id)
        if held is None:
            return None  # another replica's session now: not ours to write
        guard = " AND EXISTS (SELECT 1 FROM homes WHERE session_id = ? AND replica = ? AND epoch = ?)"
        return sql + guard, (*params, rec.session_id, *held)

    async def save_container(self, rec: ContainerRecord) -> None:
        self._dirty.pop(rec.state.id, None)
        update = self._container_update(rec)
        if update is not None:
            await self._write(update)

    def forget_pending(self, container_id: str) -> None:
        """The container's row is another replica's now: its waiting update is not written."""
        self._dirty.pop(container_id, None)

    def save_container_later(self, rec: ContainerRecord) -> None:
        """Activity times change on every run; they are written by `flush` (housekeeping, shutdown)."""
        self._dirty[rec.state.id] = rec

    async def flush(self) -> None:
        """Write what waits. One flush at a time: a second one waits for the first, so when it returns its rows
        are written (or it failed), and a run's end is never written before its start."""
        async with self._flush_lock:
            if not (self._dirty or self._run_rows):
                return
            dirty, self._dirty = self._dirty, {}
            runs, self._run_rows = self._run_rows, []
            updates = [u for u in map(self._container_update, dirty.values()) if u is not None]
            try:
                await anyio.to_thread.run_sync(lambda: self._write_sync([*updates, *self._encoded(runs)]))
            except BaseException:  # the database is away: the rows wait for the next flush, none is lost
                self._dirty = {**dirty, **self._dirty}
                self._run_rows = [*runs, *self._run_rows]
                raise

    def container_of(self, session: Session, container_id: str | None) -> ContainerRecord | None:
        """The named container if the session owns it, else the session's current one (None if it has none)."""
        cid = container_id if container_id is not None else session.current_container
        if cid is None:
            return None
        rec = self.containers.get(cid)
        if rec is None or rec.session_id != session.id:
            return None
        return rec

    def live_containers(self) -> list[ContainerRecord]:
        return [r for r in self.containers.values() if r.state.status == "running"]

    # ---- files ---------------------------------------------------------------------------------------------

    async def add_files(
        self, session: Session, records: list[FileRecord], dropped: list[FileRecord] | None = None
    ) -> None:
        """Record a harvest's new versions and the superseded ones it drops: one transaction."""
        if not records and not dropped:
            return
        rows: list[Statement] = [self._drop_row(rec) for rec in dropped or ()]
        values = []
        for rec in records:
            self._seq += 1
            rec.seq = self._seq
            values.append(
                (
                    rec.file_id,
                    rec.session_id,
                    rec.container_id,
                    rec.path,
                    rec.name,
                    rec.bytes,
                    rec.mime_type,
                    rec.sha256,
                    rec.source,
                    rec.created_at,
                    rec.local_path,
                    rec.remote_id,
                    rec.version,
                    rec.seq,
                    rec.blob,
                    rec.disk_bytes,
                    int(rec.dropped),
                )
            )
        session.files.extend(records)
        if values:
            rows.append((f"INSERT INTO files ({FILE_FIELDS}) VALUES ({', '.join('?' * 17)})", values))
        await self._write(*rows)
        for rec in dropped or ():
            rec.dropped = True  # its copy is released by the caller, which then clears local_path

    @staticmethod
    def _drop_row(rec: FileRecord) -> tuple[str, tuple[Any, ...]]:
        return ("UPDATE files SET dropped = 1, local_path = NULL WHERE file_id = ?", (rec.file_id,))

    def holds_sync(self, store_key: str) -> bool:
        """Whether a record not dropped still holds a blob's store key (`<owner>/blobs/ab/cdef...`), whichever
        replica made it; any other key is held by nothing once let go. Blocks: call it from a thread."""
        parts = store_key.split("/")
        if len(parts) != 4 or parts[1] != "blobs":
            return False
        row = self._db.row("SELECT 1 FROM files WHERE blob = ? AND dropped = 0 LIMIT 1", (parts[2] + parts[3],))
        return row is not None

    def stored_copies_sync(self) -> StoredCopies:
        """For the blob store at start (`storage.catalog.stored_copies`). Blocks: call it from a thread."""
        return stored_copies(self._db)

    # ---- runs ----------------------------------------------------------------------------------------------

    def add_run_later(self, run_id: str, session: Session, started_at: float) -> None:
        """A run started; written by `flush` (housekeeping, a few times a second), off the run's hot path."""
        sql = "INSERT INTO runs (id, session_id, status, started_at, pid) VALUES (?, ?, 'running', ?, ?)"
        self._run_rows.append((sql, (run_id, session.id, started_at, os.getpid())))

    def end_run_later(self, run_id: str, status: str, result: dict[str, Any] | BaseModel) -> None:
        """A run ended with `result` (its RunResult, or the error that ended it), JSON-encoded when flushed, in the
        flush's thread: a model is encoded there, not on the run's path."""
        # A run its session's new home marked lost stays lost: this process lost the session meanwhile.
        sql = "UPDATE runs SET status = ?, ended_at = ?, result = ? WHERE id = ? AND status <> 'lost'"
        self._run_rows.append((sql, (status, time.time(), result, run_id)))

    @staticmethod
    def _encoded(rows: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, tuple[Any, ...]]]:
        return [(sql, tuple(_encode(p) for p in params)) for sql, params in rows]

    def _load_run_sync(self, run_id: str) -> RunRow | None:
        row = self._db.row(
            "SELECT id, session_id, status, started_at, ended_at, pid, result FROM runs WHERE id = ?", (run_id,)
        )
        return RunRow(*row) if row is not None else None

    async def load_run(self, run_id: str) -> RunRow | None:
        if not (isinstance(run_id, str) and run_id.startswith("r_") and len(run_id) < 80):
            return None
        return await anyio.to_thread.run_sync(self._load_run_sync, run_id)


def _encode(param: Any) -> Any:
    if isinstance(param, BaseModel):
        try:
            return param.model_dump_json(by_alias=True)
        except (ValueError, RecursionError):  # a JSON value too deep to encode: the row keeps the rest of the run
            return param.model_dump_json(by_alias=True, exclude={"json_"})
    return json.dumps(param) if isinstance(param, dict) else param
