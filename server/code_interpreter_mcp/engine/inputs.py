"""Files going into a session's container: `upload_file` (a host path or base64 content) and the `files` of a run
(host paths or earlier file ids). Each is stored on the host first, so it can be put back into a replacement
container, then copied in and recorded as the caller's input.

Whether host paths may be named at all is decided here (`check_host_paths`), for every tool that names one. This
module knows the host store and the container lifecycle; it knows nothing of runs, harvests or MCP.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import anyio

from ..artifacts import (
    copy_with_hash,
    normalize_container_path,
    record_to_info,
    safe_name,
    store_dir,
)
from ..config import Settings
from ..errors import BadInput, FileNotFound, FileTooLarge, PathRefused
from ..models import UploadResult
from ..sessions import ContainerRecord, FileRecord, Session, new_id
from ..storage.history import check_not_dropped
from .containers import Containers
from .context import EngineContext
from .copies import local_copy
from .envs import check_env, kept_env


def check_host_paths(settings: Settings, what: str) -> None:
    if not settings.host_paths_allowed:
        raise PathRefused(
            f"{what} names a path on the server's host, which this server does not allow over its transport.",
            "Use upload_file with content_base64, or ask the operator to set CODE_INTERPRETER_ALLOW_HOST_PATHS.",
        )


# Linux's limits on one name and on a whole path: beyond them the OS would refuse with an error the caller cannot read.
_NAME_MAX_BYTES = 255
_PATH_MAX_BYTES = 4000
# Decoded in slices, in a thread: the GIL is free between slices, so a 100 MB upload never holds the event loop.
_B64_SLICE = 4 * 256 * 1024


def check_base64_size(text: str, max_bytes: int) -> None:
    """Refuse an upload whose base64 text decodes to more than `max_bytes`, from its length alone."""
    if not isinstance(text, str):
        raise BadInput("content_base64 must be a string.")
    tail = text[-2:]  # padding is at most two characters; stripping the whole text would copy it
    decoded = len(text) // 4 * 3 - (len(tail) - len(tail.rstrip("=")))
    if decoded > max_bytes:
        raise FileTooLarge(
            f"The upload is about {decoded} bytes ({len(text)} characters of base64); the limit is {max_bytes}.",
            "Upload a smaller file, or split it into parts and join them in code.",
        )


def check_container_name(rel: str) -> str:
    """A container path every file system here can hold: valid UTF-8, each name and the whole within the limits."""
    try:
        encoded = rel.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(
            f"The path {rel!r} is not valid Unicode text (it holds a lone surrogate).",
            "Name the file with ordinary characters.",
        ) from None
    too_long = [part for part in encoded.split(b"/") if len(part) > _NAME_MAX_BYTES]
    if too_long or len(encoded) > _PATH_MAX_BYTES:
        raise BadInput(
            f"The path is too long: {len(encoded)} bytes"
            + (f", a name of {len(too_long[0])} bytes" if too_long else "")
            + f" (limits: {_NAME_MAX_BYTES} bytes a name, {_PATH_MAX_BYTES} in all).",
            "Use a shorter name and fewer folder levels.",
        )
    return rel


def write_base64_with_hash(text: str, dest: Path) -> tuple[int, str]:
    """Decode base64 into `dest` slice by slice, hashing as it goes (blocking); the size and the sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    try:
        with open(dest, "wb") as out:
            for start in range(0, len(text), _B64_SLICE):
                data = base64.b64decode(text[start : start + _B64_SLICE], validate=True)
                digest.update(data)
                out.write(data)
                size += len(data)
    except (ValueError, TypeError):
        dest.unlink(missing_ok=True)
        raise BadInput(
            "content_base64 is not valid base64.", "Send the standard alphabet with padding and no line breaks."
        ) from None
    return size, digest.hexdigest()


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
        env: dict[str, str] | None = None,
        persist_env: bool = False,
    ) -> UploadResult:
        if (path is None) == (content_base64 is None):
            raise BadInput("Pass either path (a host file) or content_base64 with name.")
        settings = self.ctx.settings
        keep = check_env(settings, env)
        if keep and not persist_env:
            raise BadInput(
                "upload_file runs no code, so env given to it applies only when kept for the session.",
                "Pass persist_env=true to keep it for the session's later runs, or give env to run_code.",
            )
        if keep and not self.ctx.capabilities.env:
            raise BadInput(f"The {self.ctx.backend.name} backend cannot set environment variables for runs.")
        await self.ctx.ready()
        async with session.lock:
            if path is not None:
                check_host_paths(settings, "path")
                src = _host_path(path)
                if not src.is_absolute():
                    raise BadInput(f"Host path {path!r} must be absolute.")
                fname = safe_name(name or src.name)
                rel = check_container_name(normalize_container_path(dest_path or fname))
                stored, size, digest, file_id = await self._ingest_host_file(session, src, safe_name(rel))
            else:
                if not name:
                    raise BadInput("name is required with content_base64.")
                text = content_base64 or ""
                check_base64_size(text, settings.max_file_bytes)  # before any decoding: a size costs nothing
                rel = check_container_name(normalize_container_path(dest_path or safe_name(name)))
                file_id = new_id("f_", 12)
                stored = store_dir(settings.files_dir, session.id, file_id) / safe_name(rel)
                size, digest = await anyio.to_thread.run_sync(write_base64_with_hash, text, stored)
            rec, _ = await self.containers.acquire(session)
            if keep:
                await self.ctx.reg.save_env(session, kept_env(settings, session.env, keep))
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
            if known is not None and (copy := await local_copy(self.ctx, known, session.owner)) is not None:
                src, name = copy, known.name
            elif item.startswith("f_") and "/" not in item:
                raise FileNotFound(f"No file {item!r} in this session.")
            else:
                check_host_paths(self.ctx.settings, "files")
                src = _host_path(item)
                if not src.is_absolute():
                    raise BadInput(
                        f"Host path {item!r} must be absolute (the server's working directory is not the client's)."
                    )
                name = check_container_name(safe_name(src.name))
            stored, size, digest, file_id = await self._ingest_host_file(session, src, name)
            added.append(
                await self.containers.put_input(session, rec, stored, name, file_id=file_id, size=size, sha256=digest)
            )
        return added

    async def _ingest_host_file(self, session: Session, src: Path, name: str) -> tuple[Path, int, str, str]:
        settings = self.ctx.settings
        file_id = new_id("f_", 12)
        dest = store_dir(settings.files_dir, session.id, file_id) / name
        try:
            size, digest = await anyio.to_thread.run_sync(copy_with_hash, src, dest, settings.max_file_bytes)
        except OSError as exc:  # a directory, /proc/self/mem, a name too long: the OS's reason, not internal_error
            raise PathRefused(
                f"Cannot read {str(src)[:300]!r}: {exc.strerror or exc}.", "Name a regular, readable file on the host."
            ) from None
        return dest, size, digest, file_id
