"""One harvest of a container: list it, fetch every file that is new or changed since the last listing (the
container record's snapshot) to the host, and record the copies in the registry.

A fetch starts as soon as a file is known (cited by the backend's answer, or found by the listing), each file at
most once; the listing is authoritative for paths and versions. Within a run the harvest can go on alongside the
backend (`fetching(alongside=True)`: the listing starts when the code finished, while a model still writes), or
after it; the common case, nothing changed, costs one listing and no task group.

It knows the backend protocol, the registry and the host store; it knows nothing of results, budgets or MCP.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc

from ..artifacts import guess_mime, remove_tree, safe_name, store_dir
from ..backends.base import ExecOutcome, RemoteFile
from ..errors import CIError, ContainerExpired
from ..sessions import ContainerRecord, FileRecord, Session, new_id
from .containers import Containers
from .context import EngineContext

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
            async with task_group() as tg:
                for remote in self._pending:
                    tg.start_soon(self._fetch, remote)
            self._pending.clear()

    def start(self, remote: RemoteFile) -> None:
        k = self.key(remote)
        if k in self._started:
            return
        self._started.add(k)
        if self._tg is not None:
            self._tg.start_soon(self._fetch, remote)
        else:
            self._pending.append(remote)

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
        for f in outcome.cited_files:
            self.start(f)
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
        snap = self.rec.snapshot
        if listing is self.rec.listed and len(listing) == len(snap):
            return  # the very listing the snapshot was made from: nothing changed (no compare of N files)
        if len(listing) == len(snap) and all(
            (p := snap.get(f.path)) is not None and p.version == f.version for f in listing
        ):
            self.rec.listed = listing
            return
        self._listing = listing
        skipped: dict[str, list[str]] = {}
        for f in listing:
            prev = snap.get(f.path)
            if prev is None or prev.version != f.version:
                if f.skipped:
                    skipped.setdefault(f.skipped, []).append(f.path)
                else:
                    self.start(f)
        for why, paths in skipped.items():
            shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
            self.warnings.append(f"Skipped (not harvested, never followed): {shown}: {why}.")

    async def _fetch(self, remote: RemoteFile) -> None:
        settings, state = self.ctx.settings, self.rec.state
        file_id = new_id("f_", 12)
        name = safe_name(remote.path)
        dest = store_dir(settings.files_dir, self.session.id, file_id) / name
        try:
            res = await self.ctx.backend.fetch_file(state, remote, dest, settings.max_file_bytes)
        except ContainerExpired:
            self.warnings.append(f"{remote.path} was not harvested: the container expired first.")
            self.expired = True
            return
        except CIError as exc:  # too large, download failed...: the other files still come back
            self.warnings.append(f"{remote.path} was not harvested: {exc.message}")
            return
        self.fetched[self.key(remote)] = FileRecord(
            file_id=file_id,
            session_id=self.session.id,
            container_id=state.id,
            path=remote.path,
            name=name,
            bytes=res.bytes,
            mime_type=guess_mime(name),
            sha256=res.sha256,
            source="user" if remote.source == "user" else "generated",
            created_at=remote.created_at or time.time(),
            local_path=str(dest),
            remote_id=remote.remote_id,
            version=remote.version,
        )

    async def finish(self) -> Harvested:
        """After every fetch ended: records with the listing's paths; early fetches of unchanged files go."""
        rec = self.rec
        if not self.fetched and self._listing is None and not self.expired:
            return [], self.warnings
        listing = self._listing if self._listing is not None else list(rec.snapshot.values())
        by_key = {self.key(f): f for f in listing}
        records = []
        for k, record in self.fetched.items():
            listed = by_key.get(k)
            if listed is not None:
                prev = rec.snapshot.get(listed.path)
                if prev is not None and prev.version == listed.version:
                    await anyio.to_thread.run_sync(remove_tree, Path(record.local_path or "").parent)
                    continue
                record.path, record.version = listed.path, listed.version
            records.append(record)
        rec.snapshot = {f.path: f for f in listing}
        rec.listed = self._listing
        records.sort(key=lambda r: r.path)
        await self.ctx.reg.add_files(self.session, records)
        if self.expired:
            await self.containers.retire(rec, status="expired")  # never offered again; the next run replaces it
        return records, self.warnings


async def harvest_now(ctx: EngineContext, containers: Containers, session: Session, rec: ContainerRecord) -> Harvested:
    """Harvest outside a run (before listing or downloading): catches changes made since the last run."""
    harvest = Harvest(ctx, containers, session, rec)
    async with harvest.fetching(alongside=False):
        await harvest.list_once()
    return await harvest.finish()
