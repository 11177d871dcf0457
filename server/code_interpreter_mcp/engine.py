"""The core both faces (MCP and CLI) call: sessions + backend + harvested files + structured output.

The engine picks the session's container (replacing an expired one and re-uploading the session's inputs),
runs code, harvests every new or changed file to the host right after the run, validates JSON against the
caller's schema, and shapes results to the result budget. It knows no MCP types.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from .artifacts import (
    INLINE_IMAGE_TYPES,
    copy_with_hash,
    file_uri,
    guess_mime,
    normalize_container_path,
    parse_file_uri,
    record_to_info,
    remove_tree,
    safe_name,
    store_dir,
    write_bytes_with_hash,
)
from .backends import create_backend
from .backends.base import (
    Backend,
    ExecOutcome,
    ExecRequest,
    RemoteFile,
    StructuredRequest,
    Usage,
)
from .config import Settings
from .errors import (
    BackendError,
    BadInput,
    CIError,
    ContainerExpired,
    FileNotFound,
    FileTooLarge,
    NotFound,
    PathRefused,
)
from .models import (
    CloseResult,
    ContainerInfo,
    DownloadResult,
    ErrorInfo,
    FileInfo,
    FileList,
    JsonError,
    RunResult,
    StructuredInfo,
    TokenUsage,
    UploadResult,
    Violation,
)
from .sessions import ContainerRecord, FileRecord, Registry, Session, new_id

logger = logging.getLogger(__name__)

ProgressSink = Callable[[float, float | None, str], Awaitable[None]]
MAX_CODE_CHARS = 2_000_000
_SANDBOX_LINK = re.compile(r"sandbox:(/mnt/data/[^\s)\]\"'>]+)")


@dataclass
class InlineImage:
    data: bytes
    mime_type: str


@dataclass
class RunOutput:
    result: RunResult
    images: list[InlineImage] = field(default_factory=list)


@dataclass
class DownloadOutput:
    result: DownloadResult
    data: bytes | None  # present when inline


def _host_path(text: str) -> Path:
    return Path(os.path.expanduser(text))


def _utc(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None and math.isfinite(ts) else None


def _clip(text: str, limit: int) -> tuple[str, bool]:
    """Keep the head and the tail (the end of a traceback or a log matters most)."""
    if len(text) <= limit:
        return text, False
    head = limit * 2 // 5
    tail = limit - head - 60
    cut = len(text) - head - tail
    return f"{text[:head]}\n…[{cut} characters truncated]…\n{text[-tail:]}", True


class _ProgressRelay:
    """Turns backend messages and a 1 s ticker into strictly increasing progress values for the client."""

    def __init__(self, sink: ProgressSink | None, total: float) -> None:
        self.sink = sink
        self.total = total
        self.start = time.monotonic()
        self.last = 0.0
        self.message = "running"

    async def emit(self, message: str | None = None) -> None:
        if message:
            self.message = message
        if self.sink is None:
            return
        value = max(time.monotonic() - self.start, self.last + 0.001)
        self.last = value
        try:
            await self.sink(round(value, 3), self.total, f"{self.message} ({value:.0f} s)")
        except Exception:  # a client that went away must not fail the run
            logger.debug("progress notification failed", exc_info=True)

    async def backend_progress(self, done: float, total: float | None, message: str) -> None:
        await self.emit(message)

    def due(self) -> bool:
        """Runs shorter than a second send nothing; longer ones get a tick about every second."""
        elapsed = time.monotonic() - self.start
        return elapsed >= 1.0 and elapsed - self.last >= 0.9


class _Harvest:
    """One harvest of a container: fetches started as soon as a file is known (cited by the model, or new or
    changed in a listing), each at most once, then recorded against the listing, which is authoritative."""

    def __init__(self, engine: Engine, session: Session, rec: ContainerRecord, tg: anyio.abc.TaskGroup) -> None:
        self.engine, self.session, self.rec, self.tg = engine, session, rec, tg
        self.warnings: list[str] = []
        self.fetched: dict[str, FileRecord] = {}  # remote key -> record
        self.started: set[str] = set()
        self.expired = False
        self.listing: list[RemoteFile] | None = None

    @staticmethod
    def key(f: RemoteFile) -> str:
        return f.remote_id or f.path

    def start(self, remote: RemoteFile) -> None:
        k = self.key(remote)
        if k not in self.started:
            self.started.add(k)
            self.tg.start_soon(self._fetch, remote)

    async def list_and_fetch(self) -> None:
        try:
            listing = await self.engine.backend.list_files(self.rec.state)
        except ContainerExpired:
            self.warnings.append("The container expired before its files could be listed.")
            self.expired = True
            listing = list(self.rec.snapshot.values())
        self.take_listing(listing)

    def take_listing(self, listing: list[RemoteFile]) -> None:
        self.listing = listing
        snap = self.rec.snapshot
        for f in listing:
            prev = snap.get(f.path)
            if prev is None or prev.version != f.version:
                self.start(f)

    async def _fetch(self, remote: RemoteFile) -> None:
        engine, state = self.engine, self.rec.state
        file_id = new_id("f_", 12)
        name = safe_name(remote.path)
        dest = store_dir(engine.settings.files_dir, self.session.id, file_id) / name
        try:
            res = await engine.backend.fetch_file(state, remote, dest, engine.settings.max_file_bytes)
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

    async def finish(self) -> tuple[list[FileRecord], list[str]]:
        """After every fetch ended: records with the listing's paths; early fetches of unchanged files go."""
        rec = self.rec
        listing = self.listing if self.listing is not None else list(rec.snapshot.values())
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
        records.sort(key=lambda r: r.path)
        await self.engine.reg.add_files(self.session, records)
        if self.expired:
            await self.engine._retire(rec, status="expired")  # never offered again; the next run replaces it
        return records, self.warnings


class Engine:
    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend: Backend = backend if backend is not None else create_backend(settings)
        self.registry: Registry | None = None
        self._default_sessions: dict[str | None, str] = {}
        self._started = False
        self._ready = anyio.Event()
        self._backend_error: CIError | None = None
        self._relays: set[_ProgressRelay] = set()

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def start(self, wait_for_backend: bool = True) -> None:
        """Open the registry and start the backend. With wait_for_backend=False the backend's start (the
        sandbox probe) is left to `running()`, so a server can answer tools/list before the probe ends."""
        if self._started:
            return
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.settings.files_dir.mkdir(parents=True, exist_ok=True)
        self.registry = await anyio.to_thread.run_sync(Registry, self.settings.db_path)
        self._started = True
        if wait_for_backend:
            await self._start_backend()

    async def _start_backend(self) -> None:
        try:
            await self.backend.start()
            logger.info(
                "engine ready: backend=%s isolation=%s data=%s",
                self.backend.name,
                self.backend.isolation,
                self.settings.data_dir,
            )
        except CIError as exc:
            self._backend_error = exc
            logger.error("backend %s is unusable: %s", self.backend.name, exc.user_text())
        except Exception as exc:
            logger.exception("backend %s failed to start", self.backend.name)
            self._backend_error = BackendError(f"The {self.backend.name} backend failed to start: {exc}")
        finally:
            self._ready.set()

    async def _backend_usable(self) -> bool:
        await self._ready.wait()
        return self._backend_error is None

    async def ready(self) -> None:
        """Wait for the backend's start; raise its error (with its hint) if it could not start."""
        await self._ready.wait()
        if self._backend_error is not None:
            raise self._backend_error

    async def aclose(self) -> None:
        if not self._started:
            return
        self._started = False
        reg = self.reg
        with anyio.CancelScope(shield=True):
            try:
                if (
                    self._ready.is_set()
                    and self._backend_error is None
                    and (self.settings.delete_containers_on_shutdown or self.backend.name == "local")
                ):
                    for rec in reg.live_containers():
                        if rec.verified:
                            await self._retire(rec, status="stopped")
                await self.reg.flush()
                await self.backend.aclose()
            finally:
                reg.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        """Start the engine, its backend and its housekeeping; stop them (and the containers, as configured)."""
        await self.start(wait_for_backend=False)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._start_backend)
                tg.start_soon(self._housekeeping)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await self.aclose()

    @property
    def reg(self) -> Registry:
        if self.registry is None:
            raise RuntimeError("engine not started")
        return self.registry

    async def _housekeeping(self) -> None:
        """One loop for the periodic work: progress ticks of long runs, deferred registry writes, the reaper."""
        next_reap = time.monotonic() + self.settings.reaper_interval_s
        while True:
            await anyio.sleep(0.25)
            for relay in list(self._relays):
                if relay.due():
                    await relay.emit()
            try:
                await self.reg.flush()
                if time.monotonic() >= next_reap and self._ready.is_set() and self._backend_error is None:
                    next_reap = time.monotonic() + self.settings.reaper_interval_s
                    await self.reap_expired()
            except Exception:
                logger.exception("housekeeping pass failed")

    async def reap_expired(self) -> int:
        """Stop containers idle past their expiry (their files were harvested after each run)."""
        now = time.time()
        count = 0
        for rec in list(self.reg.live_containers()):
            if rec.state.expires_at <= now and rec.verified:
                session = self.reg.sessions.get(rec.session_id)
                if session is not None and session.lock.locked():
                    continue  # a run is using it right now
                await self._retire(rec, status="expired")
                count += 1
        return count

    async def _retire(self, rec: ContainerRecord, status: str) -> None:
        try:
            await self.backend.destroy(rec.state)
        except CIError as exc:
            logger.warning("could not delete container %s: %s", rec.state.id, exc.message)
        except Exception:
            logger.exception("could not delete container %s", rec.state.id)
        rec.state.status = status
        rec.snapshot = {}
        await self.reg.save_container(rec)

    # ---- sessions ----------------------------------------------------------------------------------------

    async def session_for(
        self,
        session_id: str | None,
        owner: str | None = None,
        connection_state: dict[str, Any] | None = None,
        use_default: bool = False,
    ) -> Session:
        """Which session a call uses: the explicit id; else the connection's own; else the process default
        (stdio: one client per process); else a new one."""
        reg = self.reg
        if session_id is not None:
            if not isinstance(session_id, str) or not session_id:
                raise BadInput("session_id must be a non-empty string.")
            return await reg.get_session(session_id, owner)
        if connection_state is not None:
            sid = connection_state.get("ci.session_id")
            if sid is not None:
                try:
                    return await reg.get_session(sid, owner)
                except NotFound:
                    pass
            session = await reg.create_session(owner)
            connection_state["ci.session_id"] = session.id
            return session
        if use_default:
            sid = self._default_sessions.get(owner)
            if sid is not None:
                try:
                    return await reg.get_session(sid, owner)
                except NotFound:
                    pass
            session = await reg.create_session(owner)
            self._default_sessions[owner] = session.id
            return session
        return await reg.create_session(owner)

    # ---- containers --------------------------------------------------------------------------------------

    async def _current_container(self, session: Session) -> tuple[ContainerRecord | None, bool]:
        """The session's container if it is still usable, else None; and whether an earlier one was lost."""
        rec = self.reg.container_of(session, None)
        if rec is None:
            return None, False
        if not rec.verified:
            rec.state = await self.backend.refresh(rec.state)
            rec.verified = True
            await self.reg.save_container(rec)
        if rec.state.status == "running" and rec.state.usable():
            return rec, False
        if rec.state.status == "running":
            await self._retire(rec, status="expired")
        return None, True

    async def _acquire_container(self, session: Session) -> tuple[ContainerRecord, bool]:
        rec, lost = await self._current_container(session)
        if rec is not None:
            return rec, False
        state = await self.backend.create_container(session.id, self.settings.expiry_minutes * 60)
        rec = await self.reg.add_container(session, state)
        await self._restore_inputs(session, rec)
        return rec, lost

    async def _restore_inputs(self, session: Session, rec: ContainerRecord) -> None:
        """Upload the session's input files into a new container (after an expiry)."""
        inputs = [r for r in session.latest_files() if r.source == "user" and r.local_path]
        new_records = []
        for old in inputs:
            local = Path(old.local_path or "")
            if not await anyio.Path(local).is_file():
                continue
            remote = await self.backend.put_file(rec.state, local, old.path)
            rec.snapshot[remote.path] = remote
            new_records.append(
                FileRecord(
                    file_id=new_id("f_", 12),
                    session_id=session.id,
                    container_id=rec.state.id,
                    path=remote.path,
                    name=old.name,
                    bytes=old.bytes,
                    mime_type=old.mime_type,
                    sha256=old.sha256,
                    source="user",
                    created_at=time.time(),
                    local_path=old.local_path,
                    remote_id=remote.remote_id,
                    version=remote.version,
                )
            )
        await self.reg.add_files(session, new_records)

    def _container_info(self, rec: ContainerRecord, state_lost: bool) -> ContainerInfo:
        iso = rec.state.isolation if rec.state.isolation in ("bubblewrap", "none", "remote") else "bubblewrap"
        return ContainerInfo(
            id=rec.state.id, expires_at=_utc(rec.state.expires_at), state_lost=state_lost, isolation=iso
        )  # type: ignore[arg-type]

    # ---- files in --------------------------------------------------------------------------------------

    def _check_host_paths(self, what: str) -> None:
        if not self.settings.host_paths_allowed:
            raise PathRefused(
                f"{what} names a path on the server's host, which this server does not allow over its transport.",
                "Use upload_file with content_base64, or ask the operator to set CODE_INTERPRETER_ALLOW_HOST_PATHS.",
            )

    async def _ingest_host_file(self, session: Session, src: Path, name: str) -> tuple[Path, int, str, str]:
        file_id = new_id("f_", 12)
        dest = store_dir(self.settings.files_dir, session.id, file_id) / name
        size, digest = await anyio.to_thread.run_sync(copy_with_hash, src, dest, self.settings.max_file_bytes)
        return dest, size, digest, file_id

    async def _put_input(
        self, session: Session, rec: ContainerRecord, stored: Path, size: int, digest: str, file_id: str, dest_path: str
    ) -> FileRecord:
        remote = await self.backend.put_file(rec.state, stored, dest_path)
        rec.snapshot[remote.path] = remote
        record = FileRecord(
            file_id=file_id,
            session_id=session.id,
            container_id=rec.state.id,
            path=remote.path,
            name=safe_name(remote.path),
            bytes=size,
            mime_type=guess_mime(remote.path),
            sha256=digest,
            source="user",
            created_at=time.time(),
            local_path=str(stored),
            remote_id=remote.remote_id,
            version=remote.version,
        )
        await self.reg.add_files(session, [record])
        return record

    async def _add_input_files(self, session: Session, rec: ContainerRecord, files: list[str]) -> list[FileRecord]:
        added = []
        for item in files:
            if not isinstance(item, str) or not item:
                raise BadInput(f"files entries must be host paths or file ids, got {item!r}.")
            known = session.find_file(item)
            if known is not None and known.local_path:
                src = Path(known.local_path)
                name = known.name
                stored, size, digest, file_id = await self._ingest_host_file(session, src, name)
            elif item.startswith("f_") and "/" not in item:
                raise FileNotFound(f"No file {item!r} in this session.")
            else:
                self._check_host_paths("files")
                src = _host_path(item)
                if not src.is_absolute():
                    raise BadInput(
                        f"Host path {item!r} must be absolute (the server's working directory is not the client's)."
                    )
                name = safe_name(src.name)
                stored, size, digest, file_id = await self._ingest_host_file(session, src, name)
            added.append(await self._put_input(session, rec, stored, size, digest, file_id, name))
        return added

    # ---- harvesting --------------------------------------------------------------------------------------

    async def _harvest(
        self,
        session: Session,
        rec: ContainerRecord,
        early: list[RemoteFile] | None = None,
        list_again: bool = True,
    ) -> tuple[list[FileRecord], list[str]]:
        """List the container, fetch every new or changed file (cited ones started first), record them.
        With list_again=False only the `early` files are fetched, against the last listing."""
        if not early and list_again:
            # The common case (nothing new) costs one listing and no task group.
            try:
                listing = await self.backend.list_files(rec.state)
            except ContainerExpired:
                await self._retire(rec, status="expired")
                return [], ["The container expired before its files could be listed."]
            snap = rec.snapshot
            if len(listing) == len(snap) and all(
                (p := snap.get(f.path)) is not None and p.version == f.version for f in listing
            ):
                return [], []
        else:
            listing = None
        async with anyio.create_task_group() as tg:
            harvest = _Harvest(self, session, rec, tg)
            for f in early or []:
                harvest.start(f)
            if listing is not None:
                harvest.take_listing(listing)
            elif list_again:
                await harvest.list_and_fetch()
            else:
                harvest.take_listing(list(rec.snapshot.values()))
        return await harvest.finish()

    # ---- run_code ----------------------------------------------------------------------------------------

    async def run_code(
        self,
        session: Session,
        code: str,
        *,
        files: list[str] | None = None,
        output_schema: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        instructions: str | None = None,
        json_strategy: str | None = None,
        progress: ProgressSink | None = None,
    ) -> RunOutput:
        started = time.monotonic()
        if not isinstance(code, str):
            raise BadInput("code must be a string of Python source.")
        if len(code) > MAX_CODE_CHARS:
            raise BadInput(
                f"code is {len(code)} characters; the limit is {MAX_CODE_CHARS}.",
                "Upload large data with upload_file and read it from /mnt/data instead.",
            )
        timeout = self.settings.default_timeout_s if timeout_s is None else timeout_s
        if not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
            raise BadInput(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
        if timeout > self.settings.max_timeout_s:
            raise BadInput(f"timeout_s {timeout} exceeds the server's maximum of {self.settings.max_timeout_s} s.")
        strategy = json_strategy or self.settings.structured_strategy
        if strategy not in ("two_pass_sentinel", "single_pass"):
            raise BadInput(f"json_strategy must be 'two_pass_sentinel' or 'single_pass', got {strategy!r}.")
        sreq = None
        if output_schema is not None:
            from . import structured  # jsonschema is imported only when a schema is used: faster start-up

            structured.check_schema(output_schema)
            sreq = StructuredRequest(schema=output_schema, nonce=structured.new_nonce(), strategy=strategy)  # type: ignore[arg-type]
        if instructions is not None and not isinstance(instructions, str):
            raise BadInput("instructions must be a string.")

        await self.ready()
        relay = _ProgressRelay(progress, timeout)
        async with session.lock:
            await self.reg.touch_session(session)
            rec, state_lost = await self._acquire_container(session)
            warnings: list[str] = []
            if files:
                await self._add_input_files(session, rec, files)
            if progress is not None:
                self._relays.add(relay)
            has_model = bool(getattr(self.backend, "has_model", False))
            try:
                if has_model:
                    outcome, rec, lost_again, harvested = await self._execute_and_harvest(
                        session, rec, code, timeout, instructions, sreq, relay
                    )
                else:
                    outcome, rec, lost_again = await self._execute(
                        session, rec, code, timeout, instructions, sreq, relay
                    )
            finally:
                self._relays.discard(relay)
            state_lost = state_lost or lost_again or outcome.state_lost
            if instructions and not has_model:
                warnings.append("instructions were ignored: they guide the model of the openai backend only.")
            rec.runs += 1
            if has_model:
                records, harvest_warnings = harvested
            else:
                if outcome.container is not None:
                    rec.state = outcome.container
                records, harvest_warnings = await self._harvest(session, rec, outcome.cited_files)
            warnings.extend(outcome.warnings)
            warnings.extend(harvest_warnings)
            self.reg.save_container_later(rec)  # activity times: written by housekeeping, not on the hot path

            json_value, json_error, sinfo, usage, calls = await self._resolve_json(outcome, sreq, code)
        result = self._shape_result(
            session, rec, outcome, records, state_lost, warnings, json_value, json_error, sinfo, usage, calls, started
        )
        images = await self._inline_images(records)
        return RunOutput(result=result, images=images)

    async def _execute_and_harvest(
        self,
        session: Session,
        rec: ContainerRecord,
        code: str,
        limit_s: float,
        instructions: str | None,
        sreq: StructuredRequest | None,
        relay: _ProgressRelay,
    ) -> tuple[ExecOutcome, ContainerRecord, bool, tuple[list[FileRecord], list[str]]]:
        """Run, and harvest as early as possible: the container is listed as soon as the backend says the code
        finished (a model then takes seconds more to write its answer), and each file the answer cites starts
        downloading at once, in parallel with that listing."""
        code_done = anyio.Event()
        target: list[ContainerRecord] = [rec]
        try:
            async with anyio.create_task_group() as tg:

                async def list_when_code_done() -> None:
                    await code_done.wait()
                    await harvest.list_and_fetch()

                harvest = _Harvest(self, session, rec, tg)
                tg.start_soon(list_when_code_done)
                try:
                    outcome, new_rec, lost = await self._execute(
                        session, rec, code, limit_s, instructions, sreq, relay, code_done.set
                    )
                except BaseException:
                    tg.cancel_scope.cancel()
                    raise
                if new_rec is not rec and not code_done.is_set():
                    harvest.rec = new_rec  # the run moved to a new container before any code ran
                target[0] = new_rec
                if outcome.container is not None:
                    new_rec.state = outcome.container
                for f in outcome.cited_files:
                    harvest.start(f)
                code_done.set()  # no signal from the backend (or it came already): list now, once
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:  # the run's own error, as callers expect it (not wrapped)
                raise group.exceptions[0] from None
            raise
        return outcome, target[0], lost, await harvest.finish()

    async def _execute(
        self,
        session: Session,
        rec: ContainerRecord,
        code: str,
        limit_s: float,
        instructions: str | None,
        sreq: StructuredRequest | None,
        relay: _ProgressRelay,
        code_done: Callable[[], None] | None = None,
    ) -> tuple[ExecOutcome, ContainerRecord, bool]:
        request = ExecRequest(
            code=code,
            timeout_s=limit_s,
            instructions=instructions,
            structured=sreq,
            run_number=rec.runs + 1,
            code_done=code_done,
        )
        try:
            return await self.backend.execute(rec.state, request, relay.backend_progress), rec, False
        except ContainerExpired:
            # Never reuse an expired container: a new one, the inputs again, and one more try.
            logger.info("container %s expired; replacing it", rec.state.id)
            await self._retire(rec, status="expired")
            state = await self.backend.create_container(session.id, self.settings.expiry_minutes * 60)
            rec = await self.reg.add_container(session, state)
            await self._restore_inputs(session, rec)
            request.run_number = 1
            request.code_done = None  # the early harvest watched the old container
            return await self.backend.execute(rec.state, request, relay.backend_progress), rec, True

    async def _resolve_json(
        self, outcome: ExecOutcome, sreq: StructuredRequest | None, code: str
    ) -> tuple[Any, JsonError | None, StructuredInfo | None, Usage, int]:
        """The run's JSON: extracted, validated locally, and repaired by one model call only when needed."""
        usage = Usage()
        usage.add(outcome.usage)
        calls = outcome.model_calls
        if sreq is None:
            return None, None, None, usage, calls
        from . import structured

        has_model = bool(getattr(self.backend, "has_model", False))
        strategy: Any = sreq.strategy if has_model else "local"
        if not has_model and outcome.last_value_json is not None and outcome.last_value_json != "null":
            path, extracted = "last_expression", structured.parse_json_text(outcome.last_value_json)
        elif has_model and sreq.strategy == "single_pass":
            path, extracted = "single_pass", structured.parse_json_text(outcome.single_pass_json or "")
        else:
            path = "sentinel"
            extracted = structured.extract_from_sources(outcome.sentinel_sources, sreq.nonce if has_model else None)
            if has_model and not extracted.found and structured.code_prints_block(code):
                # The code prints its own plain block, so the model was not asked for one. Only then is a plain
                # block in the output taken: elsewhere it could be data that merely contains the markers.
                printed = structured.extract_last_block(outcome.stdout, None)
                if printed.found or (printed.problem and not extracted.problem):
                    extracted = printed

        def check(found: structured.Extracted, missing: str) -> tuple[list[Violation], list[str]]:
            if not found.found:
                return [], [found.problem or missing]
            violations = structured.validate(found.value, sreq.schema)
            return violations, [f"{v.path}: {v.message}" for v in violations]

        violations, problems = check(extracted, "No JSON result was found.")
        value = extracted.value if not problems else None
        # A run that raised gets a repair only for a broken block it did print: with nothing to repair, a model
        # forced into the schema would invent the values.
        if (
            problems
            and has_model
            and sreq.strategy == "two_pass_sentinel"
            and outcome.status != "timeout"
            and (outcome.status == "ok" or extracted.raw is not None)
        ):
            repair = await self.backend.repair_json(
                sreq.schema, extracted.raw or outcome.text or outcome.stdout, problems
            )
            if repair is not None:
                calls += 1
                usage.add(repair.usage)
                path = "repair"
                repaired = structured.parse_json_text(repair.text)
                violations, problems = check(repaired, "The repair call returned no JSON.")
                value = repaired.value if not problems else None
        info = StructuredInfo(strategy=strategy, path=path, model_calls=calls, usage=self._usage(usage, has_model))
        if not problems:
            return value, None, info, usage, calls
        if violations:
            return None, structured.json_error_from(violations), info, usage, calls
        hint = (
            "End the code with an expression holding the result, or print it between ===BEGIN_JSON=== and "
            "===END_JSON===."
            if not has_model
            else "The model did not return the JSON block; print it between ===BEGIN_JSON=== and ===END_JSON===."
        )
        return None, structured.json_error_from(f"{problems[0]} {hint}"), info, usage, calls

    @staticmethod
    def _usage(usage: Usage, has_model: bool) -> TokenUsage | None:
        if not has_model:
            return None
        return TokenUsage(
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, total_tokens=usage.total_tokens
        )

    def _rewrite_links(self, text: str, session: Session, records: list[FileRecord]) -> str:
        by_path = {r.path: r for r in session.latest_files()}
        by_path.update({r.path: r for r in records})

        def sub(m: re.Match[str]) -> str:
            try:
                rel = normalize_container_path(m.group(1))
            except CIError:
                return m.group(0)
            rec = by_path.get(rel)
            return file_uri(session.id, rec.file_id, rec.name) if rec else m.group(0)

        return _SANDBOX_LINK.sub(sub, text)

    def _shape_result(
        self,
        session: Session,
        rec: ContainerRecord,
        outcome: ExecOutcome,
        records: list[FileRecord],
        state_lost: bool,
        warnings: list[str],
        json_value: Any,
        json_error: JsonError | None,
        sinfo: StructuredInfo | None,
        usage: Usage,
        calls: int,
        started: float,
    ) -> RunResult:
        budget = self.settings.result_budget_tokens * 4  # characters, roughly 4 per token
        fixed = len(json.dumps(json_value, default=str)) if json_value is not None else 0
        fixed += sum(300 + len(r.path) for r in records) + 2000
        if outcome.error is not None:
            fixed += len(outcome.error.message) + len(outcome.error.traceback or "")
        room = max(4000, min(budget - fixed, self.settings.output_cap_chars * 2))
        text = self._rewrite_links(outcome.text, session, records) if outcome.text else None
        parts = {"stdout": outcome.stdout, "stderr": outcome.stderr, "text": text or ""}
        sizes = {k: len(v) for k, v in parts.items()}
        truncated = outcome.truncated
        if sum(sizes.values()) > room:
            # Share the room: small parts keep everything, large ones split the rest.
            share = dict.fromkeys(parts, 0)
            remaining, pending = room, sorted(parts, key=lambda k: sizes[k])
            while pending:
                k = pending.pop(0)
                share[k] = min(sizes[k], remaining // (len(pending) + 1))
                remaining -= share[k]
            for k in parts:
                parts[k], cut = _clip(parts[k], max(share[k], 200))
                truncated = truncated or cut
        err = None
        if outcome.error is not None:
            tb = outcome.error.traceback
            if tb is not None:
                tb, cut = _clip(tb, 8000)
                truncated = truncated or cut
            err = ErrorInfo(type=outcome.error.type, message=_clip(outcome.error.message, 4000)[0], traceback=tb)
        if state_lost:
            warnings = [
                "The previous container was lost (expired or restarted): variables and imports are gone; "
                "input files were uploaded again and earlier files stay downloadable.",
                *warnings,
            ]
        result_repr = outcome.result_repr
        if result_repr is not None:
            result_repr, cut = _clip(result_repr, 4000)
            truncated = truncated or cut
        return RunResult(
            session_id=session.id,
            container_id=rec.state.id,
            backend=self.backend.name,
            status=outcome.status,
            stdout=parts["stdout"],
            stderr=parts["stderr"],
            result=result_repr,
            error=err,
            json=json_value,
            json_error=json_error,
            files=[record_to_info(r) for r in records],
            container=self._container_info(rec, state_lost),
            truncated=truncated,
            warnings=warnings,
            text=parts["text"] if text is not None else None,
            structured=sinfo,
            usage=self._usage(usage, bool(getattr(self.backend, "has_model", False))),
            model_calls=calls,
            duration_ms=round((time.monotonic() - started) * 1000, 2),
        )

    async def _inline_images(self, records: list[FileRecord]) -> list[InlineImage]:
        images: list[InlineImage] = []
        for r in records:
            if len(images) >= self.settings.max_inline_images:
                break
            if r.mime_type in INLINE_IMAGE_TYPES and r.local_path and r.bytes <= self.settings.inline_image_max_bytes:
                data = await anyio.Path(r.local_path).read_bytes()
                images.append(InlineImage(data=data, mime_type=r.mime_type))
        return images

    # ---- list / download / upload / close ----------------------------------------------------------------

    async def _container_for_files(
        self, session: Session, container_id: str | None
    ) -> tuple[ContainerRecord | None, bool]:
        """The named container (else the current one) and whether it is alive. A live one is harvested first,
        which catches changes made outside runs. Another session's container id is NotFound."""
        rec = self.reg.container_of(session, container_id)
        if container_id is not None and rec is None:
            raise NotFound(
                f"No container {container_id!r} in this session.",
                "Omit container_id to use the session's current container.",
            )
        if rec is None or rec.state.id != session.current_container or not await self._backend_usable():
            return rec, False
        current, _ = await self._current_container(session)
        if current is not rec:
            return rec, False
        await self._harvest(session, rec)
        return rec, rec.state.status == "running"

    async def list_files(
        self, session: Session, container_id: str | None = None, all_containers: bool = False
    ) -> FileList:
        async with session.lock:
            rec, alive = await self._container_for_files(session, container_id)
            if all_containers:
                records = session.latest_files()
            elif rec is not None:
                records = session.latest_files(rec.state.id)
                if alive:
                    live_paths = set(rec.snapshot)
                    records = [r for r in records if r.path in live_paths]
            else:
                records = []
            return FileList(
                session_id=session.id,
                container_id=rec.state.id if rec else None,
                expires_at=_utc(rec.state.expires_at) if rec and alive else None,
                container_alive=alive,
                files=[record_to_info(r) for r in records],
            )

    async def _find_record(self, session: Session, file: str, container_id: str | None) -> FileRecord:
        if not isinstance(file, str) or not file:
            raise BadInput("file must be a file_id, a resource URI or a path inside the container.")
        parsed = parse_file_uri(file)
        if parsed is not None:
            if parsed[0] != session.id:
                raise FileNotFound(f"No file {file!r} in this session.")
            file = parsed[1]
        rec = session.find_file(file)
        if rec is not None:
            return rec
        if file.startswith("f_") and "/" not in file and "." not in file:
            raise FileNotFound(f"No file {file!r} in this session.")
        rel = normalize_container_path(file)
        crec, _alive = await self._container_for_files(session, container_id)
        candidates = [r for r in session.files if r.path == rel and (crec is None or r.container_id == crec.state.id)]
        if not candidates:
            candidates = [r for r in session.files if r.path == rel]
        if not candidates:
            raise FileNotFound(f"No file {rel!r} in this session's container.")
        return candidates[-1]

    async def download(
        self,
        session: Session,
        file: str,
        container_id: str | None = None,
        save_to: str | None = None,
        overwrite: bool = False,
    ) -> DownloadOutput:
        async with session.lock:
            rec = await self._find_record(session, file, container_id)
        info = record_to_info(rec)
        local = Path(rec.local_path) if rec.local_path else None
        if local is None or not await anyio.Path(local).is_file():
            raise FileNotFound(
                f"The harvested copy of {rec.path!r} is missing on the host.",
                "It may have been deleted by close_session(delete_files=true).",
            )
        saved_to = None
        if save_to is not None:
            self._check_host_paths("save_to")
            saved_to = await anyio.to_thread.run_sync(self._save_copy, local, save_to, rec.name, overwrite)
        if rec.bytes <= self.settings.inline_file_max_bytes and save_to is None:
            data = await anyio.Path(local).read_bytes()
            return DownloadOutput(DownloadResult(file=info, saved_to=None, inline=True), data)
        if saved_to is None:
            # Too large to inline: point at the harvested copy, which already lies on the host.
            saved_to = str(local)
        return DownloadOutput(DownloadResult(file=info, saved_to=saved_to, inline=False), None)

    @staticmethod
    def _save_copy(src: Path, save_to: str, name: str, overwrite: bool) -> str:
        target = Path(save_to).expanduser()
        if not target.is_absolute():
            raise BadInput(f"save_to {save_to!r} must be an absolute host path.")
        if target.is_dir():
            target = target / name
        elif save_to.endswith(("/", "\\")):
            target.mkdir(parents=True, exist_ok=True)
            target = target / name
        if target.is_symlink():
            raise PathRefused(f"{str(target)!r} is a symlink; refusing to write through it.")
        if target.exists() and not overwrite:
            raise BadInput(f"{str(target)!r} already exists.", "Pass overwrite=true or another save_to.")
        if not target.parent.is_dir():
            raise NotFound(f"The folder {str(target.parent)!r} does not exist on the host.")
        tmp = target.with_name(f".{target.name}.part")
        shutil.copyfile(src, tmp)
        tmp.replace(target)
        return str(target)

    async def upload(
        self,
        session: Session,
        *,
        path: str | None = None,
        name: str | None = None,
        content_base64: str | None = None,
        dest_path: str | None = None,
    ) -> UploadResult:
        if (path is None) == (content_base64 is None):
            raise BadInput("Pass either path (a host file) or content_base64 with name.")
        await self.ready()
        async with session.lock:
            if path is not None:
                self._check_host_paths("path")
                src = _host_path(path)
                if not src.is_absolute():
                    raise BadInput(f"Host path {path!r} must be absolute.")
                fname = safe_name(name or src.name)
                rel = normalize_container_path(dest_path or fname)
                stored, size, digest, file_id = await self._ingest_host_file(session, src, safe_name(rel))
            else:
                if not name:
                    raise BadInput("name is required with content_base64.")
                try:
                    data = base64.b64decode(content_base64 or "", validate=True)
                except (ValueError, TypeError):
                    raise BadInput("content_base64 is not valid base64.") from None
                if len(data) > self.settings.max_file_bytes:
                    raise FileTooLarge(f"The upload is {len(data)} bytes; the limit is {self.settings.max_file_bytes}.")
                rel = normalize_container_path(dest_path or safe_name(name))
                file_id = new_id("f_", 12)
                stored = store_dir(self.settings.files_dir, session.id, file_id) / safe_name(rel)
                digest = await anyio.to_thread.run_sync(write_bytes_with_hash, data, stored)
                size = len(data)
            rec, _ = await self._acquire_container(session)
            record = await self._put_input(session, rec, stored, size, digest, file_id, rel)
            return UploadResult(session_id=session.id, container_id=rec.state.id, file=record_to_info(record))

    async def close_session(self, session: Session, delete_files: bool = False) -> CloseResult:
        await self._ready.wait()
        async with session.lock:
            stopped = 0
            for rec in [r for r in self.reg.containers.values() if r.session_id == session.id]:
                if rec.state.status == "running":
                    await self._retire(rec, status="deleted")
                    stopped += 1
            if delete_files:
                await self.reg.forget_files(session)
                await anyio.to_thread.run_sync(remove_tree, self.settings.files_dir / session.id)
            await self.reg.close_session(session)
            for owner, sid in list(self._default_sessions.items()):
                if sid == session.id:
                    del self._default_sessions[owner]
            return CloseResult(
                session_id=session.id, closed=True, containers_stopped=stopped, files_kept=not delete_files
            )

    async def read_resource(self, uri: str, owner: str | None = None) -> tuple[bytes, str, FileInfo]:
        parsed = parse_file_uri(uri)
        if parsed is None:
            raise NotFound(f"Unknown resource {uri!r}.")
        try:
            session = await self.reg.get_session(parsed[0], owner)
        except NotFound:
            raise NotFound(f"Unknown resource {uri!r}.") from None
        rec = session.find_file(parsed[1])
        if rec is None or not rec.local_path:
            raise NotFound(f"Unknown resource {uri!r}.")
        if rec.bytes > self.settings.resource_max_bytes:
            raise FileTooLarge(
                f"{rec.name} is {rec.bytes} bytes, over the {self.settings.resource_max_bytes}-byte "
                "limit of resources/read.",
                "Use download_file with save_to.",
            )
        try:
            data = await anyio.Path(rec.local_path).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"Unknown resource {uri!r}.") from None
        return data, rec.mime_type, record_to_info(rec)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend.describe(), "settings": self.settings.public_view()}
