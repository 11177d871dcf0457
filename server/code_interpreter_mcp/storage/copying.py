"""Copying one host file to another at disk speed: in the kernel (`copy_file_range`, page cache to page cache),
hashed from a page-cache read of the same chunk, holes kept (a sparse file costs its real blocks, not its
apparent size), with a read/write fallback where the kernel cannot copy between the two files.

Measured on this host (ext4, 2 cores, 50 MiB and 300 x 200 B, medians of 8 alternating rounds): kernel copy +
page-cache read 75 ms / 114 ms, one user-space read hashed then written 85 ms / 137 ms; the kernel copy stays.
The only module here a backend may use: it knows the error taxonomy and nothing else of the server.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import FileTooLarge

CHUNK = 1024 * 1024
_ZEROS = memoryview(bytes(CHUNK))
_buffers = (
    threading.local()
)  # one chunk buffer per copying thread: a fresh 1 MiB per small file costs more than its copy
# copy_file_range refuses these pairs (other filesystems on old kernels, special files, some FUSE/overlay mounts).
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}


def disk_bytes(st: os.stat_result) -> int:
    """What a file really costs on its filesystem: allocated blocks, not the apparent size."""
    return int(st.st_blocks) * 512


def tree_disk_bytes(folder: Path) -> int:
    """What every regular file under `folder` costs on disk (links not followed): the harvested store's real size."""
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                total += disk_bytes(os.lstat(os.path.join(root, name)))
    return total


def _segments(fd: int, size: int, sparse: bool) -> list[tuple[int, int]]:
    """The (offset, end) ranges holding data; one range for a dense file (no lseek calls for the common case)."""
    if not sparse or size == 0:
        return [(0, size)]
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here to the end
                break
            return [(0, size)]  # the filesystem cannot say: copy it whole
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


class _Copier:
    """One copy: the kernel path while it works, the read/write path once it does not."""

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
        self.kernel = True
        view = getattr(_buffers, "view", None)
        if view is None:
            view = _buffers.view = memoryview(bytearray(CHUNK))
        self.view: memoryview = view

    def chunk(self, offset: int, length: int) -> int:
        """Copy up to `length` bytes at `offset`; the bytes copied are in `self.view[:n]` for the hash."""
        if self.kernel:
            try:
                n = os.copy_file_range(self.src, self.dst, length, offset, offset)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                self.kernel = False
            else:
                if n == 0:
                    return 0
                return os.preadv(self.src, [self.view[:n]], offset)
        n = os.preadv(self.src, [self.view[:length]], offset)
        done = 0
        while done < n:
            done += os.pwrite(self.dst, self.view[done:n], offset + done)
        return n


def copy_fd(src: int, dst: int, max_bytes: int, what: str) -> tuple[int, str]:
    """Copy the regular file open at `src` into the empty file open at `dst` in one pass; (bytes, sha256).

    Reads on past the size seen at the start, so a file still growing is copied whole, up to `max_bytes`."""
    st = os.fstat(src)
    size = st.st_size
    if size > max_bytes:
        raise FileTooLarge(f"{what} is {size} bytes, over the {max_bytes}-byte limit.")
    digest = hashlib.sha256()
    copier = _Copier(src, dst)
    pos = 0
    for start, end in _segments(src, size, disk_bytes(st) < size):
        while pos < start:  # a hole: zeros in the hash, nothing on disk
            n = min(CHUNK, start - pos)
            digest.update(_ZEROS[:n])
            pos += n
        while pos < end:
            n = copier.chunk(pos, min(CHUNK, end - pos))
            if n == 0:
                break  # shrank while we copied
            digest.update(copier.view[:n])
            pos += n
    if pos < size:  # a trailing hole (or a file cut short meanwhile: hashed as what we have)
        tail = os.fstat(src).st_size
        while pos < min(size, tail):
            n = min(CHUNK, min(size, tail) - pos)
            digest.update(_ZEROS[:n])
            pos += n
        os.ftruncate(dst, pos)
    while n := copier.chunk(pos, CHUNK):  # grown since the fstat
        pos += n
        if pos > max_bytes:
            raise FileTooLarge(f"{what} grew past the {max_bytes}-byte limit while being copied.")
        digest.update(copier.view[:n])
    return pos, digest.hexdigest()


SMALL_BYTES = CHUNK
"""A dense file up to this size is read whole and hashed before its copy is made (`read_small`)."""


def read_small(src: int, st: os.stat_result, max_bytes: int, what: str) -> bytes | None:
    """The whole bytes of the small dense file open at `src` (`st` its fstat), read on past the size seen (a
    file still growing is read whole); None when it is not small or has holes (`copy_to_new` keeps those). The
    caller hashes them and writes them only where the host does not keep them already (a create costs far more
    than the read: 0.02 to 1 ms on this host's ext4)."""
    size = st.st_size
    if size > SMALL_BYTES or disk_bytes(st) < size:
        return None
    data = os.read(src, size + 1)  # one byte more than seen: a short read is the end, so one call a file
    if len(data) <= size:
        return data
    parts, total = [data], len(data)
    while True:  # grown since the fstat
        if total > max_bytes:
            raise FileTooLarge(f"{what} grew past the {max_bytes}-byte limit while being copied.")
        chunk = os.read(src, CHUNK)
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        parts.append(chunk)


@contextlib.contextmanager
def new_file(dest: str | Path) -> Iterator[int]:
    """A new file at `dest` (its folder made if missing), open for writing; removed again if the block fails.
    FileExistsError when something is there already."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        dst = os.open(dest, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        dst = os.open(dest, flags, 0o644)
    try:
        yield dst
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise
    finally:
        os.close(dst)


def copy_to_new(src: int, dest: Path, max_bytes: int, what: str) -> tuple[int, str]:
    """`copy_fd` into a new file at `dest` (its folder made if missing); nothing is left at `dest` on failure."""
    with new_file(dest) as dst:
        return copy_fd(src, dst, max_bytes, what)
