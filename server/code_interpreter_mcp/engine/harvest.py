"""One harvest of a container: list it, fetch every file that is new or changed since the last listing (the
container record's snapshot) to the host, and record the copies in the registry.

A fetch starts as soon as a file is known (cited by the backend's answer, or found by the listing), each file at
most once, the small ones in one batch and the large ones in at most `COPY_THREADS` more; the listing is
authoritative for paths and versions. The copies land in the owner's blob store (`storage.blobs`: identical bytes
once, the server-wide quota), and the new records go into the registry in one transaction together with the
superseded versions the session's history quota drops (`storage.history`). Within a run the harvest can go on
alongside the backend (`fetching(alongside=True)`: the listing starts when the code finished, while a model still
writes), or after it; the common case, nothing changed, costs one listing and no task group.

It knows the backend protocol, the registry and the host store; it knows nothing of results, budgets or MCP.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from operator import attrgetter
from pathlib import Path

import anyio
import anyio.abc

from ..artifacts import guess_mime, safe_name
from ..backends.base import ExecOutcome, FetchResult, Listing, RemoteFile
from ..errors import ContainerExpired, StorageQuota
from ..records import new_ids
from ..sessions import ContainerRecord, FileRecord, Session
from ..storage.blobs import OwnerCopies, owner_key
from ..storage.history import superseded_to_drop
from .containers import Containers
from .context import COPY_THREADS, SMALL_FILE_BYTES, EngineContext
from .copies import to_store

_BY_PATH = attrgetter("path")
Harvested = tuple[list[FileRecord], list[str]]
"""The records of the files harvested, sorted by path, and warnings about files that could not be."""


@asynccontextmanager
async def task_group() -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group whose one failure is raised as itself, as callers of a run expect it (not wrapped)."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class Harvest:
    def __init__(self, ctx: EngineContext, containers: Containers, session: Session, rec: ContainerRecord) -> None:
        self.ctx, self.containers, self.session, self.rec = ctx, containers, session, rec
        self.warnings: list[str] = []
        self.fetched: dict[str, FileRecord] = {}  # remote key -> record
        self.expired = False
        self._started: set[str] = set()
        self._pending: list[RemoteFile] = []  # found while no task group runs: fetched when the scope ends
        self._tg: anyio.abc.TaskGroup | None = None
        self._listed = False
        self._listing: list[RemoteFile] | None = None  # None: the snapshot stands (unchanged, or not listed)
        self._changed: dict[str, RemoteFile] = {}  # key -> the listing's entry, for those it found changed
        self._delta: dict[str, RemoteFile | None] | None = None  # how the listing differs from the snapshot's
        self.owner_key = owner_key(session.owner)
        self._copies = OwnerCopies(ctx.blobs, self.owner_key)
        self.refused: set[str] = set()  # paths the server-wide quota refused: left out of the snapshot, retried

    @staticmethod
    def key(f: RemoteFile) -> str:
        return f.remote_id or f.path

    def fetching(self, alongside: bool) -> AbstractAsyncContextManager[object]:
        """The scope in which files are fetched. alongside=True spans the body with a task group, so the listing
        on `code_done` and each fetch start at once while the body runs; else what the body found is fetched
        when it ends, and nothing found means no task group at all (the harvest itself is that scope: a
        generator-based one would cost the common local run measurably)."""
        return self._alongside() if alongside else self

    @asynccontextmanager
    async def _alongside(self) -> AsyncIterator[None]:
        try:
            async with task_group() as tg:
                self._tg = tg
                yield
        finally:
            self._tg = None  # only once the group ended: a listing still running may start fetches

    async def __aenter__(self) -> Harvest:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None and self._pending:
            pending, self._pending = self._pending, []
            async with task_group() as tg:
                self._start_batches(tg, pending)

    def start(self, *remotes: RemoteFile) -> None:
        new = [r for r in remotes if self.key(r) not in self._started]
        self._started.update(self.key(r) for r in new)
        if not new:
            return
        if self._tg is not None:
            self._start_batches(self._tg, new)
        else:
            self._pending.extend(new)

    def _start_batches(self, tg: anyio.abc.TaskGroup, remotes: list[RemoteFile]) -> None:
        """The small files in one batch (see SMALL_FILE_BYTES), the large ones dealt round-robin to at most
        COPY_THREADS more."""
        small = [r for r in remotes if r.bytes <= SMALL_FILE_BYTES]
        large = [r for r in remotes if r.bytes > SMALL_FILE_BYTES]
        if small:
            tg.start_soon(self._fetch_batch, small)
        n = min(len(large), COPY_THREADS)
        for i in range(n):
            tg.start_soon(self._fetch_batch, large[i::n])

    def code_done(self) -> None:
        """For `ExecRequest.code_done`: list the container now, while the backend still writes its answer."""
        if self._tg is not None and not self._listed:
            self._listed = True
            self._tg.start_soon(self._list)

    async def run_ended(self, rec: ContainerRecord, outcome: ExecOutcome) -> None:
        """The run returned, in `rec` (a new container if the old one expired): its cited files are fetched and
        the container is listed, unless that happened already when its code finished."""
        if rec is not self.rec and not self._listed:
            self.rec = rec  # the run moved to a new container before any code ran
        if outcome.container is not None:
            rec.state = outcome.container
        self.start(*outcome.cited_files)
        await self.list_once()

    async def list_once(self) -> None:
        if not self._listed:
            self._listed = True
            await self._list()

    async def _list(self) -> None:
        try:
            listing = await self.ctx.backend.list_files(self.rec.state)
        except ContainerExpired:
            self.warnings.append("The container expired before its files could be listed.")
            self.expired = True
            return
        snap, before = self.rec.snapshot, self.rec.listed
        if listing is before and len(listing) == len(snap):
            return  # the very listing the snapshot was made from: nothing changed (no compare of N files)
        delta = None
        if isinstance(listing, Listing) and isinstance(before, Listing) and listing.base == before.generation:
            delta = listing.changes  # the snapshot is `before`'s: only these paths can differ from it
        elif len(listing) == len(snap) and all(
            (p := snap.get(f.path)) is not None and p.version == f.version for f in listing
        ):
            self.rec.listed = listing
            return
        self._listing, self._delta = listing, delta
        skipped: dict[str, list[str]] = {}
        changed = []
        for f in listing if delta is None else (f for f in delta.values() if f is not None):
            prev = snap.get(f.path)
            if prev is None or prev.version != f.version:
                if f.skipped:
                    skipped.setdefault(f.skipped, []).append(f.path)
                else:
                    changed.append(f)
        if delta is not None:
            changed.sort(key=_BY_PATH)  # as the listing is: a batch's files of one folder come together
        self._changed = {f.remote_id or f.path: f for f in changed}
        self.start(*changed)
        for why, paths in skipped.items():
            shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
            self.warnings.append(f"Skipped (not harvested, never followed): {shown}: {why}.")

    async def _fetch_batch(self, remotes: list[RemoteFile]) -> None:
        """Copy a batch into the owner's blob store: small files straight to their blobs, others into its
        folder of copies in flight (placed by `finish`)."""
        blobs, state = self.ctx.blobs, self.rec.state
        if blobs.full():  # nothing new fits: not even copied (and tried again by the next harvest)
            for remote in remotes:
                self._refuse(remote, blobs.quota_error(remote.path))
            return
        try:
            results = await self.ctx.backend.fetch_files(state, remotes, self.ctx.settings.max_file_bytes, self._copies)
        except ContainerExpired:
            results = [ContainerExpired("expired")] * len(remotes)
        fetched, key = self.fetched, self.key
        ids = iter(new_ids("f_", len(remotes), 12))
        for remote, res in zip(remotes, results, strict=True):
            if isinstance(res, FetchResult):
                fetched[key(remote)] = self._record(remote, res, next(ids))
            elif isinstance(res, ContainerExpired):
                self.warnings.append(f"{remote.path} was not harvested: the container expired first.")
                self.expired = True
            elif isinstance(res, StorageQuota):
                self._refuse(remote, res)
            else:  # too large, download failed...: the other files still come back
                self.warnings.append(f"{remote.path} was not harvested: {res.message}")

    def _record(self, remote: RemoteFile, res: FetchResult, file_id: str) -> FileRecord:
        name = safe_name(remote.path)
        record = FileRecord(
            file_id=file_id,
            session_id=self.session.id,
            container_id=self.rec.state.id,
            path=remote.path,
            name=name,
            bytes=res.bytes,
            mime_type=_mime(name),
            sha256=res.sha256,
            source="user" if remote.source == "user" else "generated",
            created_at=remote.created_at or time.time(),
            local_path=res.path,  # a copy in flight (placed by `finish`) unless the store keeps it already
            remote_id=remote.remote_id,
            version=remote.version,
        )
        if res.kept:  # the blob store holds these bytes for this record already
            record.blob = res.sha256
            record.disk_bytes = self.ctx.blobs.cost_of(self.owner_key, res.sha256)
        return record

    def _refuse(self, remote: RemoteFile, exc: StorageQuota) -> None:
        self.refused.add(remote.path)
        self.warnings.append(exc.user_text())

    async def finish(self) -> Harvested:
        """After every fetch ended: the copies go into the blob store, the records (with the listing's paths)
        and the superseded versions past the history quota into the registry in one transaction; early
        fetches of unchanged files go."""
        rec = self.rec
        if not self.fetched and self._listing is None and not self.expired:
            return [], self.warnings
        listing = self._listing if self._listing is not None else list(rec.snapshot.values())
        changed = self._changed  # what the listing found changed: no compare again, and no map of N files
        by_key: dict[str, RemoteFile] | None = None
        records: list[FileRecord] = []
        unchanged: list[FileRecord] = []
        for k, record in self.fetched.items():
            listed = changed.get(k)
            if listed is None:  # fetched before the listing (cited): looked up in all of it
                if by_key is None:
                    by_key = {f.remote_id or f.path: f for f in listing}
                listed = by_key.get(k)
                if listed is not None:
                    prev = rec.snapshot.get(listed.path)
                    if prev is not None and prev.version == listed.version:
                        unchanged.append(record)
                        continue
            if listed is not None:
                record.path, record.version = listed.path, listed.version
            records.append(record)
        if unchanged or any(r.blob is None for r in records):  # else every copy is in its blob already
            records = await anyio.to_thread.run_sync(self._place, records, unchanged)
        refused, delta = self.refused, self._delta
        if delta is not None:  # the snapshot was the delta's base: only the paths it names change
            snap = rec.snapshot
            for path, f in delta.items():
                if f is None or path in refused:
                    snap.pop(path, None)
                else:
                    snap[path] = f
        elif refused:
            rec.snapshot = {f.path: f for f in listing if f.path not in refused}
        else:
            rec.snapshot = {f.path: f for f in listing}
        rec.listed = self._listing if not refused else None  # refused paths: retried by a full compare
        records.sort(key=lambda r: r.path)
        if (waiting := await to_store(self.ctx, records)) is not None:
            self.warnings.append(waiting)
        await record_with_history(self.ctx, self.session, records)
        if self.expired:
            await self.containers.retire(rec, status="expired")  # never offered again; the next run replaces it
        return records, self.warnings

    def _place(self, records: list[FileRecord], unchanged: list[FileRecord]) -> list[FileRecord]:
        """In a worker thread: each copy becomes (or joins) its blob; the ones over the server's quota go."""
        for record in unchanged:
            if record.blob is not None:  # claimed, never written
                self.ctx.blobs.release([(self.owner_key, record)])
            else:
                Path(record.local_path or "").unlink(missing_ok=True)
        kept = []
        for record in records:
            if record.blob is not None:  # claimed while fetched: already its blob
                kept.append(record)
                continue
            try:
                placed = self.ctx.blobs.place(
                    self.owner_key, Path(record.local_path or ""), record.sha256 or "", record.path
                )
            except StorageQuota as exc:
                self.refused.add(record.path)
                self.warnings.append(exc.user_text())
                continue
            except OSError as exc:
                self.warnings.append(f"{record.path} was not harvested: {exc.strerror or exc}.")
                continue
            record.blob, record.local_path, record.disk_bytes = record.sha256, str(placed.path), placed.disk_bytes
            kept.append(record)
        return kept


@functools.lru_cache(maxsize=512)
def _mime_of_suffixes(suffixes: str) -> str:
    return guess_mime("f" + suffixes)


def _mime(name: str) -> str:
    """`guess_mime`, which looks only at the suffixes, once per distinct suffixes (it costs 7 us a file)."""
    dot = name.find(".", 1)  # a leading dot starts a name, not a suffix
    return _mime_of_suffixes(name[dot:] if dot > 0 else "")


async def record_with_history(ctx: EngineContext, session: Session, records: list[FileRecord]) -> None:
    """Record new versions; superseded ones past the session's history quota are dropped in the same registry
    transaction, and their copies released after it (a crash in between leaves a blob the sweep removes)."""
    key = owner_key(session.owner)
    drop: list[FileRecord] = []
    earlier = {r.path for r in session.files}
    if any(r.path in earlier for r in records):  # only a new version of a known path supersedes anything
        quota = int(ctx.settings.file_history_mb * 1024 * 1024)
        drop = superseded_to_drop([*session.files, *records], quota, lambda r: _cost(ctx, key, r))
    await ctx.reg.add_files(session, records, drop)
    if drop:
        await anyio.to_thread.run_sync(ctx.blobs.release, [(key, r) for r in drop])
        for r in drop:
            r.local_path = None


def _cost(ctx: EngineContext, key: str, rec: FileRecord) -> int:
    if rec.blob is not None:
        return ctx.blobs.cost_of(key, rec.blob)
    return rec.disk_bytes if rec.disk_bytes is not None else rec.bytes


async def harvest_now(ctx: EngineContext, containers: Containers, session: Session, rec: ContainerRecord) -> Harvested:
    """Harvest outside a run (before listing or downloading): catches changes made since the last run."""
    harvest = Harvest(ctx, containers, session, rec)
    async with harvest.fetching(alongside=False):
        await harvest.list_once()
    return await harvest.finish()
