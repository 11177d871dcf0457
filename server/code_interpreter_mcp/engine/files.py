"""Files coming out of a session: listing a container's files, finding one by file id, URI or path, downloading
it (inline when small, else its host copy, or a copy saved where the caller says), serving resources, and deleting
a session's host copies (its blobs' references released at once). A version dropped past the history quota is
refused with `FileSuperseded`, naming the current one.

A live container is harvested before it is listed or searched, which catches changes made outside runs. Paging of
listings belongs here. This module knows the registry, the host store and the harvest; it knows nothing of runs or
MCP.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..artifacts import normalize_container_path, parse_file_uri, record_to_info, remove_tree
from ..errors import BadInput, FileNotFound, FileTooLarge, NotFound, PathRefused
from ..models import DownloadResult, FileInfo, FileList
from ..sessions import ContainerRecord, FileRecord, Session
from ..storage.blobs import owner_key
from ..storage.history import check_not_dropped
from .containers import Containers, utc
from .context import EngineContext
from .harvest import harvest_now
from .inputs import check_host_paths


@dataclass
class DownloadOutput:
    result: DownloadResult
    data: bytes | None  # present when inline


class Files:
    def __init__(self, ctx: EngineContext, containers: Containers) -> None:
        self.ctx = ctx
        self.containers = containers

    async def _container_for_files(
        self, session: Session, container_id: str | None
    ) -> tuple[ContainerRecord | None, bool]:
        """The named container (else the current one) and whether it is alive. A live one is harvested first.
        Another session's container id is NotFound."""
        rec = self.ctx.reg.container_of(session, container_id)
        if container_id is not None and rec is None:
            raise NotFound(
                f"No container {container_id!r} in this session.",
                "Omit container_id to use the session's current container.",
            )
        if rec is None or rec.state.id != session.current_container or not await self.ctx.backend_usable():
            return rec, False
        current, _ = await self.containers.current(session)
        if current is not rec:
            return rec, False
        await harvest_now(self.ctx, self.containers, session, rec)
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
                expires_at=utc(rec.state.expires_at) if rec and alive else None,
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
        check_not_dropped(session.files, rec)
        info = record_to_info(rec)
        local = Path(rec.local_path) if rec.local_path else None
        if local is None or not await anyio.Path(local).is_file():
            raise FileNotFound(
                f"The harvested copy of {rec.path!r} is missing on the host.",
                "It may have been deleted by close_session(delete_files=true).",
            )
        saved_to = None
        if save_to is not None:
            check_host_paths(self.ctx.settings, "save_to")
            saved_to = await anyio.to_thread.run_sync(_save_copy, local, save_to, rec.name, overwrite)
        if rec.bytes <= self.ctx.settings.inline_file_max_bytes and save_to is None:
            data = await anyio.Path(local).read_bytes()
            return DownloadOutput(DownloadResult(file=info, saved_to=None, inline=True), data)
        if saved_to is None:
            # Too large to inline: point at the harvested copy, which already lies on the host.
            saved_to = str(local)
        return DownloadOutput(DownloadResult(file=info, saved_to=saved_to, inline=False), None)

    async def read_resource(self, uri: str, owner: str | None = None) -> tuple[bytes, str, FileInfo]:
        parsed = parse_file_uri(uri)
        if parsed is None:
            raise NotFound(f"Unknown resource {uri!r}.")
        try:
            session = await self.ctx.reg.get_session(parsed[0], owner)
        except NotFound:
            raise NotFound(f"Unknown resource {uri!r}.") from None
        rec = session.find_file(parsed[1])
        if rec is not None:
            check_not_dropped(session.files, rec)
        if rec is None or not rec.local_path:
            raise NotFound(f"Unknown resource {uri!r}.")
        limit = self.ctx.settings.resource_max_bytes
        if rec.bytes > limit:
            raise FileTooLarge(
                f"{rec.name} is {rec.bytes} bytes, over the {limit}-byte limit of resources/read.",
                "Use download_file with save_to.",
            )
        try:
            data = await anyio.Path(rec.local_path).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"Unknown resource {uri!r}.") from None
        return data, rec.mime_type, record_to_info(rec)

    async def delete_all(self, session: Session) -> None:
        """close_session(delete_files=true): the records and every host copy of the session."""
        removed = await self.ctx.reg.forget_files(session)
        key = owner_key(session.owner)
        await anyio.to_thread.run_sync(self.ctx.blobs.release, [(key, r) for r in removed if not r.dropped])
        await anyio.to_thread.run_sync(remove_tree, self.ctx.settings.files_dir / session.id)  # inputs' copies


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
