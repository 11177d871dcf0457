"""The host side of a container's data folder: listing, disk usage, and symlink-proof reads and writes.

Sandboxed code owns the data folder and can plant symlinks, fifos or hard links in it, and the server may run as
root, so nothing here ever follows a link: listing uses `os.scandir` without following symlinks, and reads/writes
walk the path one component at a time with `openat(O_NOFOLLOW)` relative to the folder's own fd, so a symlinked
directory or file anywhere on the path is refused (no check-then-use race).

All functions block; callers run them in a thread, except a listing of a small folder (see folder.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ....errors import CIError, DownloadFailed, FileNotFound, FileTooLarge, PathRefused
from ....storage.copying import copy_to_new, read_small
from ...base import CopySink, FetchResult, RemoteFile
from . import tree

CHUNK = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DATA_PREFIX = "/mnt/data/"


@dataclass
class Scan:
    files: list[RemoteFile]
    usage_bytes: int  # disk blocks of files and directories
    seconds: float


def version_of(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"


def scan(root: Path, user_versions: dict[str, str] | None = None, with_files: bool = True) -> Scan:
    """Every regular file under `root`; symlinks, fifos, sockets and devices are never followed nor read, only
    listed with `skipped` saying what they are.

    A file put there by `put_file` and unchanged since is reported with source "user". FileNotFoundError when
    `root` itself is gone."""
    started = time.perf_counter()
    files: list[RemoteFile] = []
    usage = 0
    user_versions = user_versions or {}
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    while stack:
        path, rel = stack.pop()
        try:
            it = os.scandir(path)
        except OSError:
            if not rel:
                raise
            continue
        with it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        usage += entry.stat(follow_symlinks=False).st_blocks * 512
                        stack.append((entry.path, rel + entry.name + "/"))
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if not entry.is_file(follow_symlinks=False):
                        name = rel + entry.name
                        if with_files and name.isprintable() and _utf8(name):
                            # Listed so the caller can say what was skipped; never followed nor fetched.
                            why = "a symbolic link" if entry.is_symlink() else "not a regular file"
                            files.append(RemoteFile(path=name, bytes=0, version="x" + version_of(st), skipped=why))
                        continue
                except OSError:
                    continue  # vanished while we looked
                usage += st.st_blocks * 512
                if not with_files:
                    continue
                name = rel + entry.name  # a non-UTF-8 name keeps its bytes as surrogates: the folder renames it
                version = version_of(st)
                files.append(
                    RemoteFile(
                        path=name,
                        bytes=st.st_size,
                        version=version,
                        source="user" if user_versions.get(name) == version else "generated",
                        created_at=st.st_mtime,
                    )
                )
    files.sort(key=lambda f: f.path)
    return Scan(files=files, usage_bytes=usage, seconds=time.perf_counter() - started)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_relative(path: str) -> list[str]:
    """Split a container path into safe components: relative to the data folder (a leading /mnt/data/ is
    accepted), no '..', no '.', no empty parts, no NUL."""
    if not isinstance(path, str) or not path:
        raise PathRefused(f"Invalid path {path!r}.")
    if path.startswith(DATA_PREFIX):
        path = path[len(DATA_PREFIX) :]
    # A backslash is an ordinary character of a POSIX name: code may make "a\\b.txt", and it is harvested as such.
    if path.startswith("/") or "\x00" in path:
        raise PathRefused(f"Path {path!r} must be relative to the container's data folder.")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise PathRefused(f"Path {path!r} leaves the container's data folder or names no file.")
    return parts


def _refuse_or_missing(exc: OSError, path: str) -> Exception:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return PathRefused(f"{path!r} goes through a symbolic link or a non-directory; it is not served.")
    if exc.errno == errno.ENOENT:
        return FileNotFound(f"No file {path!r} in the container.")
    return exc


def _open_parent(root: Path, parts: list[str], create: bool, uid: int | None, gid: int | None, path: str) -> int:
    """An fd of the directory holding the last component, reached without following any link."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if uid is not None:
                    os.fchown(nfd, uid, gid if gid is not None else uid)
            os.close(fd)
            fd = nfd
        return fd
    except OSError as exc:
        os.close(fd)
        raise _refuse_or_missing(exc, path) from None


class _Parent:
    """The folder fd of the last file fetched, kept for the next one in the same folder (a batch is sorted by
    path): two opens and two closes fewer a file. Other folders are opened through a `tree.DirFds`, from the
    nearest one kept, so a tree 1,000 levels deep costs an open a level, not one per component. Reached the same
    link-proof way (each component O_NOFOLLOW), so no less safe."""

    def __init__(self) -> None:
        self.key: tuple[str, ...] | None = None
        self.fd = -1
        self._fds = tree.DirFds()

    def open(self, root: Path, parts: list[str], path: str) -> int:
        key = tuple(parts[:-1])
        if key == self.key:
            return self.fd
        self._drop()
        try:
            self.fd = self._fds.open(os.fspath(root), "/".join(key))
        except OSError as exc:
            raise _refuse_or_missing(exc, path) from None
        self.key = key
        return self.fd

    def _drop(self) -> None:
        if self.key is not None:
            os.close(self.fd)
            self.key, self.fd = None, -1

    def close(self) -> None:
        self._drop()
        self._fds.close()


def _open_regular(root: Path, path: str, max_bytes: int, parent: _Parent) -> tuple[int, os.stat_result]:
    """An fd of the regular file `path` of the data folder, reached without following any link, and its fstat."""
    parts = clean_relative(path)
    try:
        dir_fd = parent.open(root, parts, path)
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise _refuse_or_missing(exc, path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PathRefused(f"{path!r} is not a regular file.")
        if st.st_size > max_bytes:
            raise FileTooLarge(f"{path!r} is {st.st_size} bytes, over the {max_bytes}-byte limit.")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def fetch(root: Path, path: str, dest: Path, max_bytes: int) -> FetchResult:
    """Copy one regular file out of the data folder to a new file `dest`: in the kernel, hashed in the same
    pass, holes kept (`storage.copying`)."""
    parent = _Parent()
    try:
        fd, _st = _open_regular(root, path, max_bytes, parent)
    finally:
        parent.close()
    try:
        total, digest = copy_to_new(fd, dest, max_bytes, repr(path))
        return FetchResult(bytes=total, sha256=digest, path=str(dest))
    finally:
        os.close(fd)


def fetch_many(root: Path, items: list[tuple[str, str]], max_bytes: int, sink: CopySink) -> list[FetchResult | CIError]:
    """Each (path, name shown for it) in turn into `sink`, in the calling thread: a harvest's batch of small
    files pays one thread hop, not one each. A small dense file is read whole and hashed, and `sink.keep`
    stores it (or finds those bytes stored already); any other is copied in the kernel to a `sink.new_path()`.
    A file's error is its entry; the others still come."""
    out: list[FetchResult | CIError] = []
    parent = _Parent()
    try:
        for path, shown in items:
            try:
                fd, st = _open_regular(root, path, max_bytes, parent)
                try:
                    data = read_small(fd, st, max_bytes, repr(path))
                    if data is not None:
                        digest = hashlib.sha256(data).hexdigest()
                        where, written = sink.keep(data, digest, shown)
                        out.append(FetchResult(len(data), digest, written, where, True))
                        continue
                    dest = sink.new_path()
                    total, digest = copy_to_new(fd, Path(dest), max_bytes, repr(path))
                    out.append(FetchResult(total, digest, True, dest))
                finally:
                    os.close(fd)
            except CIError as exc:
                out.append(exc)
            except OSError as exc:
                out.append(DownloadFailed(f"{path!r} could not be copied: {exc.strerror or exc}."))
    finally:
        parent.close()
    return out


def put(
    root: Path,
    src: Path,
    path: str,
    uid: int | None,
    gid: int | None,
    max_bytes: int,
    room_bytes: int | None = None,
) -> RemoteFile:
    """Copy a host file into the data folder at `path`, owned by the sandbox's uid. Written to a temporary name and
    renamed into place, so an existing symlink (or hard link) at `path` is replaced, never written through."""
    parts = clean_relative(path)
    size = os.stat(src).st_size
    if size > max_bytes:
        raise FileTooLarge(f"{src.name} is {size} bytes, over the {max_bytes}-byte limit.")
    if room_bytes is not None and size > room_bytes:
        raise FileTooLarge(
            f"{src.name} ({size} bytes) does not fit in the container's disk quota ({room_bytes} bytes left).",
            "Delete files in /mnt/data from code, or raise the server's box_size_mb.",
        )
    parent = _open_parent(root, parts, True, uid, gid, path)
    tmp = f".upload-{os.urandom(6).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=parent)
        try:
            with open(src, "rb") as fin:
                while True:
                    chunk = fin.read(CHUNK)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            if uid is not None:
                os.fchown(fd, uid, gid if gid is not None else uid)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        try:
            existing = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise PathRefused(f"{path!r} is a directory in the container.")
        os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=parent)
        raise
    finally:
        os.close(parent)
    return RemoteFile(
        path="/".join(parts), bytes=st.st_size, version=version_of(st), source="user", created_at=st.st_mtime
    )
