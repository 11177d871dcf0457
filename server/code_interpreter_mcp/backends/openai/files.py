"""Container files: list every page, stream downloads to disk (constant memory, sha256 on the way, retries),
and upload from disk.

Downloads go through a client copy with max_retries=0: the SDK cannot retry a body that breaks mid-stream, so
this module owns every retry of a download (429 honouring Retry-After, 5xx, timeouts, dropped connections),
with exponential backoff and jitter. Listing and uploads use the SDK's own retries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import anyio
import openai
from openai import AsyncOpenAI

from ... import errors
from ..base import ContainerState, FetchResult, RemoteFile
from .failures import MAX_RETRY_AFTER_S, Scrubber, is_transient, map_exception, retry_after_s
from .parsing import to_relative

log = logging.getLogger(__name__)

FLUSH_BYTES = 1024 * 1024  # bytes gathered before one write+hash in a worker thread
SMALL_UPLOAD_BYTES = 8 * 1024 * 1024  # read into memory in a thread; larger uploads stream from the file


def remote_file(obj: Any, source: str | None = None) -> RemoteFile:
    """A RemoteFile from a container file object (list/create/retrieve)."""
    file_id = str(getattr(obj, "id", ""))
    size = getattr(obj, "bytes", 0)
    size = size if isinstance(size, int) and not isinstance(size, bool) else 0
    created = getattr(obj, "created_at", 0)
    api_source = str(getattr(obj, "source", "") or "")
    return RemoteFile(
        path=to_relative(str(getattr(obj, "path", "") or "")),
        bytes=size,
        version=f"{file_id}:{size}",
        source=source or ("generated" if api_source == "assistant" else "user"),  # type: ignore[arg-type]
        created_at=float(created) if isinstance(created, int | float) else 0.0,
        remote_id=file_id,
    )


async def list_files(client: AsyncOpenAI, container: ContainerState, scrub: Scrubber) -> list[RemoteFile]:
    """Every file of the container, over all pages (the SDK's paginator follows has_more/after)."""
    found: list[RemoteFile] = []
    try:
        async for obj in client.containers.files.list(container.id, limit=100):
            found.append(remote_file(obj))
    except Exception as exc:
        raise map_exception(exc, "listing the container's files", scrub, container_op=True) from None
    return found


def _write(fh: IO[bytes], data: bytes, hasher: Any) -> None:
    hasher.update(data)
    fh.write(data)


def _open_and_write(part: Path, data: bytes, hasher: Any) -> IO[bytes]:
    part.parent.mkdir(parents=True, exist_ok=True)
    fh = open(part, "wb")  # closed by _finish, or by the caller on failure
    try:
        _write(fh, data, hasher)
    except BaseException:
        fh.close()
        raise
    return fh


def _finish(fh: IO[bytes] | None, part: Path, dest: Path, data: bytes, hasher: Any) -> None:
    """Write the rest, close, and move into place: one thread hop (a small file needs only this one)."""
    if fh is None:
        part.parent.mkdir(parents=True, exist_ok=True)
        fh = open(part, "wb")
    try:
        _write(fh, data, hasher)
    finally:
        fh.close()
    os.replace(part, dest)


class _Truncated(Exception):
    """The body ended before Content-Length bytes: a transient failure."""


@dataclass
class RetryPolicy:
    attempts: int  # total attempts, >= 1
    base_s: float = 0.5
    cap_s: float = 8.0

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter in [50%, 100%] of the step."""
        step = min(self.cap_s, self.base_s * (2**attempt))
        return step * (0.5 + random.random() / 2)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:  # absent, or its folder never existed: nothing to clean
        pass


async def _unlink(path: Path) -> None:
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(_remove, path)


async def _download_once(
    client: AsyncOpenAI, container: ContainerState, file: RemoteFile, part: Path, dest: Path, max_bytes: int
) -> FetchResult:
    """One attempt: stream into `part` (opened only once 1 MiB has arrived), then move it to `dest`."""
    assert file.remote_id is not None
    too_large = f"{file.path} is over the size cap of {max_bytes} bytes."
    api = client.containers.files.content.with_streaming_response
    async with api.retrieve(file.remote_id, container_id=container.id) as resp:
        length_header = resp.headers.get("content-length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if length is not None and length > max_bytes:
            raise errors.FileTooLarge(f"{too_large} It has {length} bytes.")
        hasher = hashlib.sha256()
        fh: IO[bytes] | None = None
        total = 0
        pending: list[bytes] = []
        pending_bytes = 0
        try:
            async for chunk in resp.iter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise errors.FileTooLarge(too_large)
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes >= FLUSH_BYTES:
                    data, pending, pending_bytes = b"".join(pending), [], 0
                    if fh is None:
                        fh = await anyio.to_thread.run_sync(_open_and_write, part, data, hasher)
                    else:
                        await anyio.to_thread.run_sync(_write, fh, data, hasher)
            if length is not None and total != length and "content-encoding" not in resp.headers:
                raise _Truncated(f"got {total} of {length} bytes")
            last, fh = fh, None
            await anyio.to_thread.run_sync(_finish, last, part, dest, b"".join(pending), hasher)
        finally:
            if fh is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(fh.close)
    return FetchResult(bytes=total, sha256=hasher.hexdigest())


async def fetch_file(
    client: AsyncOpenAI,
    container: ContainerState,
    file: RemoteFile,
    dest: Path,
    max_bytes: int,
    scrub: Scrubber,
    policy: RetryPolicy,
    limiter: anyio.CapacityLimiter,
) -> FetchResult:
    """Stream one file to `dest` (written as dest.part, renamed at the end), retrying transient failures.

    `client` must not retry by itself (max_retries=0). Each attempt holds one token of `limiter`, released
    while backing off.
    """
    if not file.remote_id:
        raise errors.FileNotFound(f"{file.path} has no remote id to download it by.")
    if file.bytes > max_bytes:
        raise errors.FileTooLarge(f"{file.path} has {file.bytes} bytes, over the size cap of {max_bytes}.")
    part = dest.with_name(dest.name + ".part")
    what = f"downloading {file.path}"
    attempt = 0
    while True:
        try:
            async with limiter:
                return await _download_once(client, container, file, part, dest, max_bytes)
        except errors.CIError:
            await _unlink(part)
            raise
        except OSError as exc:  # the host side: no space, no permission (httpx2 errors are not OSErrors)
            await _unlink(part)
            raise errors.DownloadFailed(
                f"Could not write {file.path} on the host: {exc.strerror or type(exc).__name__}."
            ) from None
        except Exception as exc:
            await _unlink(part)
            if isinstance(exc, _Truncated):
                last = "the body was cut short"
            elif is_transient(exc):
                last = map_exception(exc, what, scrub, container_op=True).message
            else:
                raise map_exception(exc, what, scrub, container_op=True) from None
            delay = None
            if isinstance(exc, openai.APIStatusError):
                delay = retry_after_s(exc.response.headers)
                if delay is not None and delay > MAX_RETRY_AFTER_S:
                    raise errors.RateLimited(
                        f"Downloading {file.path}: the API asks to wait {delay:.0f} s.",
                        hint=f"Try again in {delay:.0f} s.",
                    ) from None
            attempt += 1
            if attempt >= policy.attempts:
                raise errors.DownloadFailed(
                    f"Downloading {file.path} failed after {attempt} attempt(s): {last}"
                ) from None
            wait = delay if delay is not None else policy.backoff(attempt - 1)
            log.info("download of %s failed (%s); retry %d in %.2f s", file.path, scrub(last), attempt, wait)
            await anyio.sleep(wait)


async def put_file(
    client: AsyncOpenAI, container: ContainerState, src: Path, dest_path: str, max_bytes: int, scrub: Scrubber
) -> RemoteFile:
    """Upload a host file; the API chooses where it lands (e.g. /mnt/data/<name>), and that path is returned."""

    def inspect() -> int:
        st = src.stat()
        if not src.is_file():
            raise errors.BadInput(f"{src.name} is not a regular file.")
        return st.st_size

    try:
        size = await anyio.to_thread.run_sync(inspect)
    except FileNotFoundError:
        raise errors.FileNotFound(f"{src} does not exist on the host.") from None
    if size > max_bytes:
        raise errors.FileTooLarge(f"{src.name} has {size} bytes, over the size cap of {max_bytes}.")
    name = PurePosixPath(dest_path).name or src.name
    what = f"uploading {name}"
    try:
        if size <= SMALL_UPLOAD_BYTES:
            content = await anyio.to_thread.run_sync(src.read_bytes)
            obj = await client.containers.files.create(container.id, file=(name, content))
        else:
            # httpx2 reads a file object in 64 KiB chunks as it sends: bounded memory for big uploads, and the
            # SDK can replay it (seekable) when it retries.
            fh = await anyio.to_thread.run_sync(open, src, "rb")
            try:
                obj = await client.containers.files.create(container.id, file=(name, fh))
            finally:
                await anyio.to_thread.run_sync(fh.close)
    except Exception as exc:
        raise map_exception(exc, what, scrub, container_op=True) from None
    return remote_file(obj, source="user")
