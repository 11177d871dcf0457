"""Files coming out of a session: listing a container's files (filtered by a glob, paged by an opaque cursor,
each page within the result budget), finding one by file id, URI or path, downloading it (text from any byte
offset as far as the budget allows, with the offset of the next part; images inline under the image cap, else a
downscaled preview; other binaries inline only under a small cap, else the harvested copy's host path on stdio; or
a copy saved where the caller says), serving resources, and deleting a session's host copies (their blobs'
references released at once). A version dropped past the history quota is refused with `FileSuperseded`, naming
the current one.

A live container is harvested before it is listed or searched, which catches changes made outside runs. This
module knows the registry, the host store and the harvest; it knows nothing of runs or MCP.
"""

from __future__ import annotations

import codecs
import fnmatch
import shutil
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..artifacts import (
    INLINE_IMAGE_TYPES,
    is_text_mime,
    normalize_container_path,
    parse_file_uri,
    record_to_info,
    remove_tree,
)
from ..errors import BadInput, FileNotFound, FileTooLarge, NotFound, PathRefused
from ..models import DownloadResult, FileInfo, FileList, dump
from ..sessions import ContainerRecord, FileRecord, Session
from ..storage.blobs import owner_key
from ..storage.history import check_not_dropped
from .budget import budget_chars, json_chars, structured_room, summary_room
from .containers import Containers, utc
from .context import EngineContext
from .copies import local_copy
from .harvest import harvest_now
from .inputs import check_host_paths
from .shaping import list_files_within, load_image

MAX_LIST_LIMIT = 1000


@dataclass
class DownloadOutput:
    result: DownloadResult
    data: bytes | None  # present when inline: the file's bytes from offset, or an image's preview
    text: str | None = None  # the same bytes decoded, for text files
    mime_type: str | None = None  # of `data` (a preview may be another type than the file)


def matches(r: FileRecord, pattern: str | None) -> bool:
    """A glob on the path; a pattern without `/` also matches the base name (`*.csv` finds `out/a.csv`)."""
    if not pattern:
        return True
    return fnmatch.fnmatchcase(r.path, pattern) or ("/" not in pattern and fnmatch.fnmatchcase(r.name, pattern))


def parse_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    if not (cursor.startswith("o") and cursor[1:].isdigit()):
        raise BadInput(f"Invalid cursor {cursor!r}.", "Pass the next_cursor of the previous page, or omit it.")
    return int(cursor[1:])


def decode_part(chunk: bytes, final: bool) -> tuple[str, int] | None:
    """The UTF-8 text of a chunk and how many of its bytes it uses (a character cut at the end waits for the next
    part); None when the bytes are not UTF-8 from this offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(chunk, final=final)
    except UnicodeDecodeError:
        return None
    used = len(chunk) - len(decoder.getstate()[0])
    return (text, used) if used or final else None


def _lock_unless(session: Session, during_run: bool) -> AbstractAsyncContextManager[object]:
    return nullcontext() if during_run else session.lock


class Files:
    def __init__(self, ctx: EngineContext, containers: Containers) -> None:
        self.ctx = ctx
        self.containers = containers

    async def _container_for_files(
        self, session: Session, container_id: str | None, harvest: bool = True
    ) -> tuple[ContainerRecord | None, bool]:
        """The named container (else the current one) and whether it is alive. A live one is harvested first,
        unless a run holds it (`harvest` False): then the last harvest answers. Another session's container id is
        NotFound."""
        rec = self.ctx.reg.container_of(session, container_id)
        if container_id is not None and rec is None:
            raise NotFound(
                f"No container {container_id!r} in this session.",
                "Omit container_id to use the session's current container.",
            )
        if rec is None or rec.state.id != session.current_container or not await self.ctx.backend_usable():
            return rec, False
        if not harvest:
            return rec, rec.state.status == "running"
        current, _ = await self.containers.current(session)
        if current is not rec:
            return rec, False
        await harvest_now(self.ctx, self.containers, session, rec)
        return rec, rec.state.status == "running"

    async def list_files(
        self,
        session: Session,
        container_id: str | None = None,
        all_containers: bool = False,
        pattern: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        *,
        during_run: bool = False,
    ) -> FileList:
        """A page of the session's files. `during_run`: a run holds the container, so the answer comes at once from
        the last harvest, without the session's lock (the run keeps it until it ends)."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise BadInput(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit!r}.")
        start = parse_cursor(cursor)
        async with _lock_unless(session, during_run):
            rec, alive = await self._container_for_files(session, container_id, harvest=not during_run)
            if all_containers:
                records = session.latest_files()
            elif rec is not None:
                records = session.latest_files(rec.state.id)
                if alive:
                    live_paths = set(rec.snapshot)
                    records = [r for r in records if r.path in live_paths]
            else:
                records = []
            records = sorted((r for r in records if matches(r, pattern)), key=lambda r: r.path)
            page = FileList(
                session_id=session.id,
                container_id=rec.state.id if rec else None,
                expires_at=utc(rec.state.expires_at) if rec and alive else None,
                container_alive=alive,
                files=[],
                total=len(records),
            )
            room = structured_room(self.ctx.settings) - json_chars(dump(page)) - 100
            page.files = list_files_within([record_to_info(r) for r in records[start : start + limit]], limit, room)
            end = start + len(page.files)
            page.next_cursor = f"o{end}" if end < len(records) else None
            return page

    async def _find_record(
        self, session: Session, file: str, container_id: str | None, harvest: bool = True
    ) -> FileRecord:
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
        crec, _alive = await self._container_for_files(session, container_id, harvest)
        candidates = [r for r in session.files if r.path == rel and (crec is None or r.container_id == crec.state.id)]
        if not candidates:
            candidates = [r for r in session.files if r.path == rel]
        if not candidates:
            listed = crec.snapshot.get(rel) if crec is not None else None
            if listed is not None and listed.skipped:
                raise PathRefused(
                    f"{rel!r} is {listed.skipped} in the container; symlinks and special files are refused, "
                    "never followed.",
                    "Copy the data into a regular file inside /mnt/data and download that.",
                )
            raise FileNotFound(f"No file {rel!r} in this session's container.")
        return candidates[-1]

    async def download(
        self,
        session: Session,
        file: str,
        container_id: str | None = None,
        save_to: str | None = None,
        overwrite: bool = False,
        offset: int = 0,
        max_bytes: int | None = None,
        *,
        during_run: bool = False,
    ) -> DownloadOutput:
        if not isinstance(offset, int) or offset < 0:
            raise BadInput(f"offset must be a byte offset of 0 or more, got {offset!r}.")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
            raise BadInput(f"max_bytes must be a positive number of bytes, got {max_bytes!r}.")
        async with _lock_unless(session, during_run):
            rec = await self._find_record(session, file, container_id, harvest=not during_run)
        check_not_dropped(session.files, rec)
        info = record_to_info(rec)
        local = await local_copy(self.ctx, rec, session.owner)
        if local is None or not await anyio.Path(local).is_file():
            raise FileNotFound(
                f"The harvested copy of {rec.path!r} is missing on the host.",
                "It may have been deleted by close_session(delete_files=true).",
            )
        saved_to = None
        if save_to is not None:
            check_host_paths(self.ctx.settings, "save_to")
            try:
                saved_to = await anyio.to_thread.run_sync(_save_copy, local, save_to, rec.name, overwrite)
            except OSError as exc:  # the OS's reason (a name too long, a read-only place), not internal_error
                raise BadInput(
                    f"Cannot save to {save_to[:300]!r}: {exc.strerror or exc}.",
                    "Pass save_to as an existing, writable host folder or a file path in one.",
                ) from None
        if offset > rec.bytes:
            raise BadInput(f"offset {offset} is past the end of {rec.path!r} ({rec.bytes} bytes).")
        result = DownloadResult(file=info, saved_to=saved_to, inline=False, offset=offset)
        ranged = offset > 0 or max_bytes is not None
        if save_to is not None and not ranged:
            return DownloadOutput(result, None)
        settings = self.ctx.settings
        # The body is content: it shares the budget with this result's own JSON and the summary.
        room = budget_chars(settings) - summary_room(settings) - json_chars(dump(result)) - 300
        if is_text_mime(rec.mime_type):
            out = await self._text_part(
                result, local, offset, min(room, settings.inline_file_max_bytes, max_bytes or room)
            )
            if out is not None:
                return out
        elif rec.mime_type in INLINE_IMAGE_TYPES and not ranged:
            image = await load_image(rec, settings.inline_image_max_bytes)
            if image is not None:
                result.inline, result.preview = True, image.preview
                if image.preview:
                    result.hint = f"A downscaled preview: the full image ({rec.bytes} bytes) is at the resource URI" + (
                        " and the host path in saved_to." if settings.transport == "stdio" else "."
                    )
                    result.saved_to = result.saved_to or self._host_path(local)
                return DownloadOutput(result, image.data, mime_type=image.mime_type)
        cap = min(settings.inline_binary_max_bytes, room * 3 // 4)  # base64 takes 4 characters per 3 bytes
        if ranged or rec.bytes <= cap:
            return await self._binary_part(result, local, offset, min(cap, max_bytes or cap))
        result.saved_to = result.saved_to or self._host_path(local)
        result.hint = (
            f"{rec.bytes} bytes of {rec.mime_type} are not inlined (over the {cap}-byte cap): read it through its "
            "resource URI, copy it with save_to, or fetch parts with offset and max_bytes."
        )
        return DownloadOutput(result, None)

    def _host_path(self, local: Path) -> str | None:
        # Only a client on this machine (stdio) can use a host path.
        return str(local) if self.ctx.settings.transport == "stdio" else None

    async def _text_part(self, result: DownloadResult, local: Path, offset: int, n: int) -> DownloadOutput | None:
        size = result.file.bytes
        chunk = await anyio.to_thread.run_sync(_read_range, local, offset, max(n, 4))
        decoded = decode_part(chunk, final=offset + len(chunk) >= size)
        if decoded is None:
            return None  # not UTF-8 from here: the caller sends the bytes as a blob
        text, used = decoded
        end = offset + used
        result.inline = True
        result.next_offset = end if end < size else None
        result.truncated = offset > 0 or result.next_offset is not None
        if result.next_offset is not None:
            result.hint = f"Bytes {offset}-{end} of {size}: call download_file again with offset={end} for more."
        return DownloadOutput(result, chunk[:used], text=text, mime_type=result.file.mime_type)

    async def _binary_part(self, result: DownloadResult, local: Path, offset: int, n: int) -> DownloadOutput:
        size = result.file.bytes
        chunk = await anyio.to_thread.run_sync(_read_range, local, offset, max(n, 1))
        end = offset + len(chunk)
        result.inline = True
        result.next_offset = end if end < size else None
        result.truncated = offset > 0 or result.next_offset is not None
        if result.next_offset is not None:
            result.hint = f"Bytes {offset}-{end} of {size} (base64): call again with offset={end} for more."
        return DownloadOutput(result, chunk, mime_type="application/octet-stream" if result.truncated else None)

    async def read_resource(self, uri: str, owner: str | None = None) -> tuple[bytes, str, FileInfo]:
        parsed = parse_file_uri(uri)
        if parsed is None:
            raise NotFound(f"Unknown resource {uri!r}.")
        homes, reg = self.ctx.homes, self.ctx.reg
        if homes is not None and parsed[0] not in homes.held:  # another replica's session: its records as of now
            reg.sessions.pop(parsed[0], None)
        try:
            session = await reg.get_session(parsed[0], owner)
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
        local = await local_copy(self.ctx, rec, session.owner)
        try:
            data = await anyio.Path(local or rec.local_path).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"Unknown resource {uri!r}.") from None
        return data, rec.mime_type, record_to_info(rec)

    async def delete_all(self, session: Session) -> None:
        """close_session(delete_files=true): the records and every host copy of the session."""
        removed = await self.ctx.reg.forget_files(session)
        key = owner_key(session.owner)
        await anyio.to_thread.run_sync(self.ctx.blobs.release, [(key, r) for r in removed if not r.dropped])
        await anyio.to_thread.run_sync(remove_tree, self.ctx.settings.files_dir / session.id)  # inputs' copies
        if self.ctx.mirror is not None:
            await anyio.to_thread.run_sync(self.ctx.mirror.forget_prefix, f"{session.id}/")


def _read_range(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(n)


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
