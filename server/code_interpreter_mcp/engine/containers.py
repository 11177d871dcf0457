"""Container lifecycle: which container a session uses, a new one when it has none or its one expired (with the
session's input files put back), retiring containers (expiry, close, shutdown), the reaper, and the container part
of results.

A limit on live containers belongs in `Containers.acquire`, the one place a container is created for a session.
This module knows the backend protocol and the registry; it knows nothing of runs, harvests or MCP.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from ..artifacts import guess_mime, safe_name
from ..errors import CIError
from ..models import ContainerInfo, SkippedName, StateRestored
from ..sessions import ContainerRecord, FileRecord, Session, new_id
from .context import EngineContext
from .copies import local_copy, snapshot_from_store, to_store

logger = logging.getLogger(__name__)


def utc(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None and math.isfinite(ts) else None


def container_info(
    rec: ContainerRecord, state_lost: bool, state_restored: dict[str, Any] | None = None
) -> ContainerInfo:
    iso = rec.state.isolation if rec.state.isolation in ("bubblewrap", "none", "remote") else "bubblewrap"
    restored = None
    if state_restored is not None:
        saved = state_restored.get("saved_at")
        restored = StateRestored(
            from_run=state_restored.get("from_run") if isinstance(state_restored.get("from_run"), int) else None,
            saved_at=utc(saved) if isinstance(saved, int | float) else None,
            restored=list(state_restored.get("restored") or []),
            skipped=[SkippedName(**s) for s in state_restored.get("skipped") or []],
            seconds=float(state_restored.get("seconds") or 0.0),
        )
    return ContainerInfo(
        id=rec.state.id,
        expires_at=utc(rec.state.expires_at),
        state_lost=state_lost,
        state_restored=restored,
        isolation=iso,  # type: ignore[arg-type]
    )


class Containers:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.retired: list[Callable[[ContainerRecord], None]] = []  # told when a container is gone

    async def current(self, session: Session) -> tuple[ContainerRecord | None, bool]:
        """The session's container if it is still usable, else None; and whether an earlier one was lost."""
        reg = self.ctx.reg
        rec = reg.container_of(session, None)
        if rec is None:
            return None, False
        if not rec.verified:
            rec.state = await self.ctx.backend.refresh(rec.state)
            rec.verified = True
            await reg.save_container(rec)
        if rec.state.status == "running" and rec.state.usable():
            return rec, False
        if rec.state.status == "running":
            await self.retire(rec, status="expired")
        return None, True

    async def acquire(self, session: Session) -> tuple[ContainerRecord, bool]:
        """The session's usable container, else a new one; and whether an earlier one was lost."""
        rec, lost = await self.current(session)
        if rec is not None:
            return rec, False
        return await self._new(session), lost

    async def replace(self, session: Session, rec: ContainerRecord) -> ContainerRecord:
        """The backend found `rec` expired: it is never reused; a new one gets the session's inputs again."""
        logger.info("container %s expired; replacing it", rec.state.id)
        await self.retire(rec, status="expired")
        return await self._new(session)

    async def _new(self, session: Session) -> ContainerRecord:
        expires_after_s = self.ctx.settings.expiry_minutes * 60
        await snapshot_from_store(self.ctx, session)
        state = await self.ctx.backend.create_container(session.id, expires_after_s, owner=session.owner)
        rec = await self.ctx.reg.add_container(session, state)
        await self._restore_inputs(session, rec)
        return rec

    async def _restore_inputs(self, session: Session, rec: ContainerRecord) -> None:
        """Upload the session's input files into a new container (after an expiry)."""
        for old in [r for r in session.latest_files() if r.source == "user" and r.local_path]:
            local = await local_copy(self.ctx, old, session.owner)
            if local is None or not await anyio.Path(local).is_file():
                continue
            await self.put_input(
                session,
                rec,
                local,
                old.path,
                file_id=new_id("f_", 12),
                size=old.bytes,
                sha256=old.sha256,
                name=old.name,
                mime_type=old.mime_type,
            )

    async def put_input(
        self,
        session: Session,
        rec: ContainerRecord,
        stored: Path,
        dest_path: str,
        *,
        file_id: str,
        size: int,
        sha256: str | None,
        name: str | None = None,
        mime_type: str | None = None,
    ) -> FileRecord:
        """Copy a harvested or uploaded host copy into the container and record it as the caller's input."""
        remote = await self.ctx.backend.put_file(rec.state, stored, dest_path)
        rec.snapshot[remote.path] = remote  # an input is not a file the next run made
        record = FileRecord(
            file_id=file_id,
            session_id=session.id,
            container_id=rec.state.id,
            path=remote.path,
            name=name or safe_name(remote.path),
            bytes=size,
            mime_type=mime_type or guess_mime(remote.path),
            sha256=sha256,
            source="user",
            created_at=time.time(),
            local_path=str(stored),
            remote_id=remote.remote_id,
            version=remote.version,
        )
        await self.ctx.reg.add_files(session, [record])
        await to_store(self.ctx, [record])  # one that waits is uploaded by the store's own pass
        return record

    async def retire(self, rec: ContainerRecord, status: str) -> None:
        try:
            await self.ctx.backend.destroy(rec.state)
        except CIError as exc:
            logger.warning("could not delete container %s: %s", rec.state.id, exc.message)
        except Exception:
            logger.exception("could not delete container %s", rec.state.id)
        rec.state.status = status
        rec.snapshot, rec.listed = {}, None
        for gone in self.retired:
            gone(rec)
        await self.ctx.reg.save_container(rec)

    async def retire_session(self, session: Session) -> int:
        """Delete the session's live containers (close_session); how many there were."""
        stopped = 0
        for rec in [r for r in self.ctx.reg.containers.values() if r.session_id == session.id]:
            if rec.state.status == "running":
                await self.retire(rec, status="deleted")
                stopped += 1
        return stopped

    async def retire_all(self) -> None:
        """At shutdown: stop every container this process has seen alive (rows from disk were never checked)."""
        for rec in self.ctx.reg.live_containers():
            if rec.verified:
                await self.retire(rec, status="stopped")

    async def reap_expired(self) -> int:
        """Stop containers idle past their expiry (their files were harvested after each run)."""
        reg = self.ctx.reg
        now = time.time()
        count = 0
        for rec in list(reg.live_containers()):
            if rec.state.expires_at <= now and rec.verified:
                session = reg.sessions.get(rec.session_id)
                if session is not None and session.lock.locked():
                    continue  # a run is using it right now
                await self.retire(rec, status="expired")
                count += 1
        return count
