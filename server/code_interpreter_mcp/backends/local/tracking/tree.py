"""What a container's data folder holds, seen from the host: entries, their real disk cost, the difference between
two states, and the full walk that reads them, never following anything the sandboxed code planted.

- Entries are indexed by path: `str`, "/"-separated, relative to the folder, decoded with `os.fsdecode`
  (surrogateescape), so any byte name (non-UTF-8, backslash, newline) survives and `os.fsencode` gives its exact
  bytes back. A name that is not UTF-8 holds lone surrogates (`path.encode("utf-8")` raises): the caller decides
  whether it can show it. Symlinks, fifos, sockets and devices are entries of their own kind, never followed or
  opened.
- The walk is iterative (a 1,000-level tree is no recursion), holds one fd at a time, and never leaves the
  folder's device. Each directory is opened O_NOFOLLOW and checked against the inode its parent listed, so code
  that swaps a directory for a symlink mid-walk cannot make the host list anything outside the folder. Paths
  longer than PATH_MAX are opened one component at a time.
- Disk cost is st_blocks*512 per distinct inode (a hard-linked file once): a sparse file counts what it really
  allocated; `holes` keeps the apparent size it did not.
- `DirFds` keeps the last few deep directories open, so that a chain of new directories past PATH_MAX (one
  event each) is opened from its nearest kept ancestor: an open or two a level instead of one per component,
  which made a 1,000-level tree cost O(depth²) opens on the event loop.

Owns: Entry, Changes, Usage, DirFds, the walk and `scan`. Must not know: inotify, quotas, containers, harvesting.
All functions block (file system calls); none keeps state but what a `DirFds` passed in holds.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["file", "dir", "symlink", "other"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_LIMIT = 4000  # bytes; PATH_MAX is 4096


@dataclass(frozen=True, slots=True)
class Entry:
    kind: Kind
    size: int  # apparent size
    blocks: int  # bytes really allocated: st_blocks * 512
    mtime_ns: int
    ctime_ns: int  # part of the change test: code can set mtime back (cp -p, tar), not ctime
    ino: int

    @property
    def version(self) -> str:
        """The form of files.version_of (mtime_ns:size:ino), so versions recorded at upload still compare."""
        return f"{self.mtime_ns}:{self.size}:{self.ino}"

    @property
    def hole_bytes(self) -> int:
        return max(0, self.size - self.blocks) if self.kind == "file" else 0


def entry_of(st: os.stat_result) -> Entry:
    mode = st.st_mode
    kind: Kind = "other"
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
    return Entry(kind, st.st_size, st.st_blocks * 512, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def same(a: Entry, b: Entry) -> bool:
    """Unchanged as far as a reader of its content can tell (blocks may differ: writeback settles them)."""
    return (a.kind, a.ino, a.size, a.mtime_ns, a.ctime_ns) == (b.kind, b.ino, b.size, b.mtime_ns, b.ctime_ns)


@dataclass
class Changes:
    """What changed between two states of the folder. A path is in at most one set; directories never are."""

    changed: set[str] = field(default_factory=set)  # regular files created, written, touched or moved in
    removed: set[str] = field(default_factory=set)  # non-directories gone (may name one the caller never saw)
    symlinks: set[str] = field(default_factory=set)  # created or changed; never followed: skip and warn
    specials: set[str] = field(default_factory=set)  # fifos, sockets, devices created; never opened
    rescan_needed: bool = False  # events were lost or cannot all be had: these sets may be incomplete
    unlinked_writes: int = 0  # writes seen to files deleted while open (disk that no path accounts for)

    def note(self, path: str, kind: Kind | None) -> None:
        """Record the latest state of `path` (None: removed; a directory: removed as a file)."""
        for s in (self.changed, self.removed, self.symlinks, self.specials):
            s.discard(path)
        if kind is None or kind == "dir":
            self.removed.add(path)
        elif kind == "file":
            self.changed.add(path)
        elif kind == "symlink":
            self.symlinks.add(path)
        else:
            self.specials.add(path)

    def merge(self, later: Changes) -> Changes:
        """These changes followed by `later`, in place (rescan_needed is `later`'s: the current one)."""
        for path in later.removed:
            self.note(path, None)
        sets: tuple[tuple[Kind, set[str]], ...] = (
            ("file", later.changed),
            ("symlink", later.symlinks),
            ("other", later.specials),
        )
        for kind, paths in sets:
            for path in paths:
                self.note(path, kind)
        self.rescan_needed = later.rescan_needed
        self.unlinked_writes += later.unlinked_writes
        return self

    def __bool__(self) -> bool:
        return bool(self.changed or self.removed or self.symlinks or self.specials or self.unlinked_writes)


class Usage:
    """Disk use of a set of entries, by inode: a file with several names counts once, at its latest measure."""

    def __init__(self) -> None:
        self.bytes = 0
        self.holes = 0
        self._inodes: dict[int, list[int]] = {}  # ino -> [blocks, hole bytes, names]

    def add(self, entry: Entry) -> None:
        inode = self._inodes.get(entry.ino)
        if inode is None:
            self._inodes[entry.ino] = [entry.blocks, entry.hole_bytes, 1]
        else:
            self.bytes -= inode[0]
            self.holes -= inode[1]
            inode[0], inode[1] = entry.blocks, entry.hole_bytes
            inode[2] += 1
        self.bytes += entry.blocks
        self.holes += entry.hole_bytes

    def remove(self, entry: Entry) -> None:
        inode = self._inodes.get(entry.ino)
        if inode is None:
            return
        inode[2] -= 1
        if inode[2] <= 0:
            del self._inodes[entry.ino]
            self.bytes -= inode[0]
            self.holes -= inode[1]


@dataclass
class Snapshot:
    entries: dict[str, Entry]  # every entry below the root, directories included
    usage_bytes: int
    hole_bytes: int
    seconds: float


def _open_chain(fd: int, parts: list[str]) -> int:
    """The directory fd/parts..., each component opened O_NOFOLLOW relative to the last (no PATH_MAX limit).
    Takes `fd` over: it is closed, and so is every fd but the one returned."""
    for part in parts:
        try:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nfd
    return fd


def _short(path: str) -> bool:
    return len(path) < _PATH_LIMIT // 4 or len(os.fsencode(path)) < _PATH_LIMIT


class DirFds:
    """The directories of long paths opened last, kept open (at most `size`), so the next long path below one of
    them is opened from there. As safe as opening from the root: each kept fd is a directory of the folder, opened
    component by component O_NOFOLLOW; the sandbox cannot move it off the folder's mount (rename across mounts is
    EXDEV); and what is opened from it is checked against the inode expected, like any other open. A directory
    deleted or moved must be `forget`-ten, so that its old path is not opened through it. One thread only."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._fds: OrderedDict[str, int] = OrderedDict()  # relative path -> fd of that directory

    def open(self, root: str, rel: str) -> int:
        """A new fd (the caller's to close) of directory root/rel, opened from the nearest kept ancestor."""
        best = ""
        for kept in self._fds:
            if len(kept) > len(best) and rel.startswith(kept) and (len(rel) == len(kept) or rel[len(kept)] == "/"):
                best = kept
        if best:
            self._fds.move_to_end(best)
            rest = rel[len(best) + 1 :]
            fd = _open_chain(os.dup(self._fds[best]), rest.split("/") if rest else [])
        else:
            fd = _open_chain(os.open(root, _DIR_FLAGS), rel.split("/") if rel else [])
        if rel and rel not in self._fds:
            self._fds[rel] = os.dup(fd)
            while len(self._fds) > self.size:
                os.close(self._fds.popitem(last=False)[1])
        return fd

    def forget(self, rel: str) -> None:
        """Directory `rel` was deleted or moved: drop it and whatever is kept below it."""
        prefix = rel + "/"
        for kept in [k for k in self._fds if k == rel or k.startswith(prefix)]:
            os.close(self._fds.pop(kept))

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


def _open_long(root: str, rel: str, fds: DirFds | None) -> int:
    if fds is not None:
        return fds.open(root, rel)
    return _open_chain(os.open(root, _DIR_FLAGS), rel.split("/") if rel else [])


def open_dir(root: str, rel: str, ino: int | None, dev: int, fds: DirFds | None = None) -> tuple[int, os.stat_result]:
    """An fd of directory root/rel, provided it is inode `ino` (when given) on device `dev`; else OSError
    (ESTALE when something else now stands there). A long path goes through `fds` when given."""
    path = f"{root}/{rel}" if rel else root
    fd = os.open(path, _DIR_FLAGS) if _short(path) else _open_long(root, rel, fds)
    st = os.fstat(fd)
    if st.st_dev != dev or (ino is not None and st.st_ino != ino):
        os.close(fd)
        raise OSError(errno.ESTALE, f"{path!r} was replaced while being looked at")
    return fd, st


def lstat(root: str, rel: str, dev: int, fds: DirFds | None = None) -> os.stat_result | None:
    """The entry root/rel itself (never followed), or None when it is gone or not on the folder's device."""
    path = f"{root}/{rel}"
    try:
        if _short(path):
            st = os.lstat(path)
        else:
            parent, _, name = rel.rpartition("/")
            pfd = _open_long(root, parent, fds)
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(pfd)
    except OSError:
        return None
    return st if st.st_dev == dev else None


OnDir = Callable[[str, int, int], None]  # (relative path, open fd, inode), called before the directory is listed


def walk(
    root: str,
    start: str,
    start_ino: int,
    dev: int,
    on_dir: OnDir | None,
    out: dict[str, Entry],
    fds: DirFds | None = None,
    limit: int | None = None,
) -> bool:
    """Index everything under root/start into `out` (start itself too, unless it is the root). OSError when
    `start` itself cannot be opened; what vanishes below it meanwhile is skipped. Long paths go through `fds`.
    False when it stopped once `out` held `limit` entries (the directories left unlisted), else True."""
    stack: list[tuple[str, int]] = [(start, start_ino)]
    while stack:
        if limit is not None and len(out) >= limit:
            return False
        rel, ino = stack.pop()
        try:
            fd, st = open_dir(root, rel, ino, dev, fds)
        except OSError:
            if rel == start:
                raise
            continue  # gone or replaced since its parent was listed
        try:
            if on_dir is not None:
                on_dir(rel, fd, st.st_ino)
                st = os.fstat(fd)  # what changed in it before the watch existed is not in the listed stat
            if rel and (rel == start or on_dir is not None):
                out[rel] = entry_of(st)
            with os.scandir(fd) as it:
                for item in it:
                    path = f"{rel}/{item.name}" if rel else item.name
                    try:
                        est = item.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if est.st_dev != dev:
                        continue
                    entry = entry_of(est)
                    out[path] = entry
                    if entry.kind == "dir":
                        stack.append((path, est.st_ino))
        finally:
            os.close(fd)
    return True


def root_stat(root: str) -> os.stat_result:
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", root)
    return st


def scan(root: str | os.PathLike[str]) -> Snapshot:
    """The full walk: every entry under `root` and the real disk use (FileNotFoundError or NotADirectoryError
    when `root` is not a directory)."""
    started = time.perf_counter()
    path = os.path.abspath(os.fspath(root))
    st = root_stat(path)
    entries: dict[str, Entry] = {}
    walk(path, "", st.st_ino, st.st_dev, None, entries)
    usage = Usage()
    for entry in entries.values():
        usage.add(entry)
    return Snapshot(entries, usage.bytes, usage.holes, time.perf_counter() - started)


def diff(old: Mapping[str, Entry], new: Mapping[str, Entry]) -> Changes:
    """From one index to another (what a caller that scans without a tracker compares)."""
    out = Changes()
    for path in old.keys() - new.keys():
        if old[path].kind != "dir":
            out.note(path, None)
    for path, entry in new.items():
        before = old.get(path)
        if entry.kind != "dir":
            if before is None or not same(before, entry):
                out.note(path, entry.kind)
        elif before is not None and before.kind != "dir":
            out.note(path, None)
    return out
