"""Files going into a session's container: `upload_file` (a host path or base64 content) and the `files` of a run
(host paths or earlier file ids). Each is stored on the host first, so it can be put back into a replacement
container, then copied in and recorded as the caller's input.

Whether host paths may be named at all is decided here (`check_host_paths`), for every tool that names one. This
module knows the host store and the container lifecycle; it knows nothing of runs, harvests or MCP.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import anyio

from ..artifacts import (
    copy_with_hash,
    normalize_container_path,
    record_to_info,
    safe_name,
    store_dir,
    write_bytes_with_hash,
)
from ..config import Settings
from ..errors import BadInput, FileNotFound, FileTooLarge, PathRefused
from ..models import UploadResult
from ..sessions import ContainerRecord, FileRecord, Session, new_id
from ..storage.history import check_not_dropped
from .containers import Containers
from .context import EngineContext


def check_host_paths(settings: Settings, what: str) -> None:
    if not settings.host_paths_allowed:
        raise PathRefused(
            f"{what} names a path on the server's host, which this server does not allow over its transport.",
            "Use upload_file with content_base64, or ask the operator to set CODE_INTERPRETER_ALLOW_HOST_PATHS.",
        )


def _host_path(text: str) -> Path:
    return Path(os.path.expanduser(text))


class Inputs:
    def __init__(self, ctx: EngineContext, containers: Containers) -> None:
        self.ctx = ctx
        self.containers = containers

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
        settings = self.ctx.settings
        await self.ctx.ready()
        async with session.lock:
            if path is not None:
                check_host_paths(settings, "path")
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
                if len(data) > settings.max_file_bytes:
                    raise FileTooLarge(f"The upload is {len(data)} bytes; the limit is {settings.max_file_bytes}.")
                rel = normalize_container_path(dest_path or safe_name(name))
                file_id = new_id("f_", 12)
                stored = store_dir(settings.files_dir, session.id, file_id) / safe_name(rel)
                digest = await anyio.to_thread.run_sync(write_bytes_with_hash, data, stored)
                size = len(data)
            rec, _ = await self.containers.acquire(session)
            record = await self.containers.put_input(
                session, rec, stored, rel, file_id=file_id, size=size, sha256=digest
            )
            return UploadResult(session_id=session.id, container_id=rec.state.id, file=record_to_info(record))

    async def add_run_inputs(self, session: Session, rec: ContainerRecord, files: list[str]) -> list[FileRecord]:
        """The `files` of run_code: host paths, or file ids of the session's earlier files (copied again)."""
        added = []
        for item in files:
            if not isinstance(item, str) or not item:
                raise BadInput(f"files entries must be host paths or file ids, got {item!r}.")
            known = session.find_file(item)
            if known is not None:
                check_not_dropped(session.files, known)
            if known is not None and known.local_path:
                src, name = Path(known.local_path), known.name
            elif item.startswith("f_") and "/" not in item:
                raise FileNotFound(f"No file {item!r} in this session.")
            else:
                check_host_paths(self.ctx.settings, "files")
                src = _host_path(item)
                if not src.is_absolute():
                    raise BadInput(
                        f"Host path {item!r} must be absolute (the server's working directory is not the client's)."
                    )
                name = safe_name(src.name)
            stored, size, digest, file_id = await self._ingest_host_file(session, src, name)
            added.append(
                await self.containers.put_input(session, rec, stored, name, file_id=file_id, size=size, sha256=digest)
            )
        return added

    async def _ingest_host_file(self, session: Session, src: Path, name: str) -> tuple[Path, int, str, str]:
        settings = self.ctx.settings
        file_id = new_id("f_", 12)
        dest = store_dir(settings.files_dir, session.id, file_id) / name
        size, digest = await anyio.to_thread.run_sync(copy_with_hash, src, dest, settings.max_file_bytes)
        return dest, size, digest, file_id
