"""Which files of one container's data folder changed, and what the folder really costs on disk, from inotify.

The host sees the data folder as a plain directory that sandboxed code (another uid) writes. A `ChangeTracker`
watches each of its directories (IN_CREATE, IN_CLOSE_WRITE, IN_MODIFY, which fallocate and [f]truncate raise too,
IN_ATTRIB, IN_DELETE, IN_MOVED_FROM/TO, IN_DELETE_SELF/IN_MOVE_SELF; IN_Q_OVERFLOW), keeps an index of every entry
(`tree.Entry`, from one lstat when an event names the path) and answers `drain()`: the paths created, changed or
removed since the last drain (`tree.Changes`). Unchanged files are never looked at again, and an idle folder
costs nothing: no thread, no timer; the fd is read on demand or when the event loop reports it readable (`serve`).

- New directories are watched as soon as their IN_CREATE is read, then listed at once: what was put in them before
  the watch existed (mkdir then write, the race) is found by the listing, what comes after by the watch. The watch
  is set through /proc/self/fd on the directory opened and checked by `tree.walk`, never on a path.
- A directory moved within the folder is the removal of every path under its old name and the creation of every
  path under its new one (the new subtree is walked; its watches follow inodes and are reused).
- Lost events: on IN_Q_OVERFLOW, or when a watch cannot be set (`max_watches` reached, ENOSPC at
  fs.inotify.max_user_watches, no inotify instance at all), `drain()` says `rescan_needed`; `rescan()` (or
  `await changes()`, which runs it in a thread) walks everything, diffs against the index and re-arms the watches.
  A degraded tracker (some directory unwatched) asks for that on every drain.

Disk use: `usage_bytes` (st_blocks*512 per distinct inode: sparse files count what they allocated) and
`hole_bytes` are updated from the lstat of the paths that events name, never by a walk.

Quota (`set_quota`, `watch_quota`): the callback runs on the thread that pumps (the event loop), in the batch that
read the event of the write that crossed the limit, also for processes left running after a run. What the folder
can exceed the limit by before the callback, the margin:
- what the writers allocate in the reaction time, measured (bench/bench_changes.py) at 0.1 to 0.4 ms from the
  return of the call that crossed the limit to the callback. write() fills the page cache at a few GB/s, so that
  is one call (1 MiB writes ended 1 MiB over), and one call grows a file at most to RLIMIT_FSIZE. fallocate
  allocates unwritten extents at around a TB/s (16 MiB calls ended 80 to 670 MiB over): no watcher bounds that,
  so the sandbox must refuse the fallocate syscall (seccomp EOPNOTSUPP) for the margin to hold; glibc's
  posix_fallocate then writes a byte per block, at write speed (ended 0.1 MiB over);
- holes: stores through a shared mmap into a sparse file's holes raise no event until the file is closed, so each
  such file can allocate up to its apparent size (again at most RLIMIT_FSIZE) unseen; `count_holes=True` charges
  holes against the limit (sparse files count their apparent size), which closes that gap;
- files deleted while open keep using disk under no name: writes to them are counted in `unlinked_writes`, not in
  bytes (the caller can stop the writer);
- inodes are not bytes (an empty file has no blocks): cap the entry count apart (`len(tracker.files)`).

Threads: a tracker lives on one thread (the event loop) except `rescan()`, which may run in a worker thread; the
events that arrive meanwhile are held and replayed after its diff. Owns: the index, the watches, the usage, the
quota check. Must not know: containers, sessions, harvesting, the sandbox.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from stat import S_ISDIR
from types import MappingProxyType

import anyio
import anyio.to_thread

from . import tree
from .inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_UNMOUNT,
    Event,
    Inotify,
    Reader,
    serve,
)
from .tree import Changes, Entry, Snapshot, diff, entry_of, scan

__all__ = ["ChangeTracker", "Changes", "Entry", "Inotify", "Snapshot", "diff", "scan", "serve"]

logger = logging.getLogger(__name__)

# No IN_EXCL_UNLINK: writes to a file deleted while open are exactly what `unlinked_writes` must see. No
# IN_DONT_FOLLOW: the watch goes through /proc/self/fd/N, a link that must be followed to reach the directory that
# was opened O_NOFOLLOW and checked (Inotify.add_watch adds it for a plain path). IN_ONLYDIR: a directory or nothing.
WATCH_MASK = (
    IN_CREATE
    | IN_CLOSE_WRITE
    | IN_MODIFY
    | IN_ATTRIB
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_RECENT_DELETES = 4096  # names remembered to tell a write to a deleted-but-open file


QuotaCallback = Callable[[int], object]


class ChangeTracker:
    """The changes and the disk use of one folder, kept from inotify events (see the module docstring).

    `hub`: an Inotify shared with other trackers (default: one of its own). `max_watches`: the most directories
    this folder may watch, so one container cannot exhaust the user-wide fs.inotify.max_user_watches; past it the
    tracker is degraded (full rescans). `read`: replaces os.read on the tracker's own inotify fd (tests)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        hub: Inotify | None = None,
        max_watches: int = 10_000,
        read: Reader | None = None,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.max_watches = max_watches
        self.degraded = False  # some directory has no watch: every drain asks for a rescan
        self.gone = False  # the folder itself was deleted, moved or replaced
        self.last_rescan = 0.0
        self._hub = hub
        self._own_hub = hub is None
        self._read = read
        self._lock = hub.lock if hub is not None else threading.RLock()
        self._dev = 0
        self._root_ino = 0
        self._entries: dict[str, Entry] = {}
        self._usage = tree.Usage()
        self._wds: dict[int, tuple[str, int]] = {}  # wd -> (directory, its inode)
        self._dirs: dict[str, int] = {}  # directory -> wd
        self._pending = Changes()
        self._dirty: dict[str, None] = {}  # paths to lstat at the end of the batch (an ordered set)
        self._deleted: dict[str, None] = {}
        self._orphans: set[int] = set()  # watches of directories moved away, dropped unless they came back
        self._overflowed = False
        self._rescanning = False
        self._rescan_lock = threading.Lock()  # one walk at a time; a second caller waits and walks after it
        self._held: list[Event] = []
        self._quota: tuple[int, QuotaCallback, bool] | None = None
        self._quota_mark = 0

    # ------------------------------------------------------------------------------------------ public face

    def start(self) -> None:
        """Watch the folder and index what it holds (that content is the baseline, not a change). Blocks for a
        walk of the folder: run it in a thread when the folder may be big."""
        st = tree.root_stat(self.root)
        self._dev, self._root_ino = st.st_dev, st.st_ino
        if self._hub is None:
            try:
                self._hub = Inotify(self._read)
            except OSError as exc:
                logger.warning("no inotify instance for %s (%s): changes come from full scans", self.root, exc)
            else:
                self._lock = self._hub.lock
        if self._hub is not None:
            self._hub.attach(self)
        self.rescan()
        with self._lock:
            self._pending = Changes()

    def close(self) -> None:
        with self._lock:
            hub, self._hub = self._hub, None
            if hub is not None:
                if self._own_hub:
                    hub.close()
                else:
                    hub.detach(self)
            self._wds.clear()
            self._dirs.clear()

    def __enter__(self) -> ChangeTracker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hub(self) -> Inotify | None:
        return self._hub

    @property
    def files(self) -> Mapping[str, Entry]:
        """The index: every entry below the folder (directories too), as of the last pump. Read-only view."""
        return MappingProxyType(self._entries)

    @property
    def usage_bytes(self) -> int:
        """Bytes the folder really occupies (st_blocks*512 per distinct inode, directories included)."""
        return self._usage.bytes

    @property
    def hole_bytes(self) -> int:
        """Apparent size of its files that is not allocated (what writes into holes could still take)."""
        return self._usage.holes

    @property
    def watches(self) -> int:
        return len(self._wds)

    def drain(self) -> Changes:
        """The changes since the last drain, from the events queued now. Never blocks: it reads what the kernel
        already queued (one lstat per path named). When `rescan_needed`, call `rescan()` (in a thread) and drain
        again, or use `changes()`, which does both."""
        if self._hub is not None:
            self._hub.pump()
        with self._lock:
            out, self._pending = self._pending, Changes()
            out.rescan_needed = self._overflowed or self.degraded or self.gone or self._rescanning
        self.check_quota()
        return out

    async def changes(self) -> Changes:
        """`drain()`, completed by a full rescan in a worker thread when events were lost. `rescan_needed` is then
        true only if events were lost again during that walk. FileNotFoundError when the folder is gone."""
        out = self.drain()
        if out.rescan_needed:
            await anyio.to_thread.run_sync(self.rescan)
            out.merge(self.drain())
            out.rescan_needed = self._overflowed
        return out

    def rescan(self) -> None:
        """Walk the whole folder: re-arm every watch, rebuild the index and the usage, and add what differs from
        the index to the pending changes. Blocks (safe in a worker thread). FileNotFoundError (or ESTALE) when the
        folder is gone or was replaced."""
        with self._rescan_lock:
            self._rescan()

    def _rescan(self) -> None:
        with self._lock:
            self._rescanning = True
            self._overflowed = False
            self._held = []
        wds: dict[int, tuple[str, int]] = {}
        dirs: dict[str, int] = {}
        missed = [self._hub is None]

        def on_dir(rel: str, fd: int, ino: int) -> None:
            if not self._watch(wds, dirs, rel, fd, ino):
                missed[0] = True

        found: dict[str, Entry] = {}
        try:
            tree.walk(self.root, "", self._root_ino, self._dev, on_dir, found)
        except OSError as exc:
            with self._lock:
                self._rescanning = False
                self._held = []
                self._overflowed = True
                if isinstance(exc, FileNotFoundError | NotADirectoryError) or exc.errno == errno.ESTALE:
                    self.gone = True
            raise
        with self._lock:
            stale = self._wds.keys() - wds.keys()
            self._wds, self._dirs = wds, dirs
            for wd in stale:
                if self._hub is not None:
                    self._hub.rm_watch(wd)
            for path in self._entries.keys() - found.keys():
                self._put(path, None)
            for path, entry in found.items():
                self._put(path, entry)
            self.degraded = missed[0]
            self.last_rescan = time.monotonic()
            self._rescanning = False
            held, self._held = self._held, []
            self.on_events(held)
            self._flush()

    def set_quota(self, limit: int | None, on_exceeded: QuotaCallback | None = None, count_holes: bool = False) -> None:
        """Call `on_exceeded(used_bytes)` when the folder grows past `limit` bytes, and again each time it grows
        further while over it (re-armed once back under). With `count_holes`, holes count as used. The callback
        runs on the pumping thread inside the pump: it must not block nor call back into the tracker; it should
        schedule the work (a task, an event). None: no quota."""
        with self._lock:
            self._quota = None if limit is None or on_exceeded is None else (limit, on_exceeded, count_holes)
            self._quota_mark = limit or 0

    def check_quota(self) -> None:
        quota = self._quota
        if quota is None or self._rescanning:
            return
        limit, callback, count_holes = quota
        used = self.usage_bytes + (self.hole_bytes if count_holes else 0)
        if used <= limit:
            self._quota_mark = limit
            return
        if used <= self._quota_mark:
            return
        self._quota_mark = used
        try:
            callback(used)
        except Exception:
            logger.exception("quota callback of %s failed", self.root)

    async def watch_quota(
        self, limit: int, on_exceeded: QuotaCallback, *, count_holes: bool = False, poll_s: float = 2.0
    ) -> None:
        """Enforce a quota until cancelled: `set_quota`, then `serve` the tracker's inotify instance (a shared
        one may be served by another task already: this then only waits). Without inotify, or while degraded,
        the folder is rescanned every `poll_s` seconds instead."""
        self.set_quota(limit, on_exceeded, count_holes)
        try:
            self.check_quota()
            if self._hub is not None:
                await serve(self._hub, poll_s=poll_s)
            else:
                while True:
                    await anyio.sleep(poll_s)
                    await self.rescan_in_thread()
        finally:
            self.set_quota(None)

    # ------------------------------------------------------------------------------------------ Listener

    def on_events(self, events: list[Event]) -> None:
        if self._rescanning:
            self._held.extend(events)
            return
        for event in events:
            self._event(event)

    def on_overflow(self) -> None:
        self._overflowed = True

    def on_batch_end(self) -> None:
        if self._rescanning:
            return
        self._flush()
        self.check_quota()

    def rescan_due(self, now: float, poll_s: float) -> float | None:
        """For `serve`: only a quota needs the usage kept right between drains, so only then is a rescan due:
        at once after lost events, every `poll_s` while degraded."""
        if self._quota is None or self.gone:
            return None
        if self._overflowed:
            return 0.0
        if self.degraded:
            return max(0.0, self.last_rescan + poll_s - now)
        return None

    async def rescan_in_thread(self) -> None:
        try:
            await anyio.to_thread.run_sync(self.rescan)
        except OSError as exc:
            logger.debug("rescan of %s failed: %s", self.root, exc)
        self.check_quota()

    # ------------------------------------------------------------------------------------------ internals

    def _event(self, event: Event) -> None:
        where = self._wds.get(event.wd)
        if where is None:
            return  # a directory already forgotten (deleted, moved away, or re-watched under a new number)
        rel_dir, dir_ino = where
        mask = event.mask
        if mask & IN_IGNORED:
            del self._wds[event.wd]
            if self._dirs.get(rel_dir) == event.wd:
                del self._dirs[rel_dir]
            return
        if not event.name:  # about the watched directory itself; its parent reports what matters
            if rel_dir == "" and mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
                self.gone = True
                self._overflowed = True
            return
        path = f"{rel_dir}/{event.name}" if rel_dir else event.name
        isdir = bool(mask & IN_ISDIR)
        if mask & (IN_DELETE | IN_MOVED_FROM):
            self._dirty.pop(path, None)
            if isdir:
                self._drop_tree(path, moved=bool(mask & IN_MOVED_FROM))
            else:
                self._put(path, None)
                if mask & IN_DELETE:
                    self._deleted[path] = None
                    if len(self._deleted) > _RECENT_DELETES:
                        del self._deleted[next(iter(self._deleted))]
            self._touch(rel_dir)
        elif mask & (IN_CREATE | IN_MOVED_TO):
            self._deleted.pop(path, None)
            if isdir:
                self._walk_new(rel_dir, dir_ino, path)
            else:
                self._dirty[path] = None
            self._touch(rel_dir)
        elif not isdir and mask & (IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB):
            if path in self._deleted:
                if mask & IN_MODIFY:
                    self._pending.unlinked_writes += 1
                return
            self._dirty[path] = None

    def _touch(self, rel_dir: str) -> None:
        if rel_dir:
            self._dirty[rel_dir] = None  # its own blocks grow with its entries

    def _flush(self) -> None:
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            for path in dirty:
                st = tree.lstat(self.root, path, self._dev)
                if st is None:
                    self._put(path, None)
                    continue
                entry = entry_of(st)
                if entry.kind == "dir" and path not in self._dirs:
                    # It was something else when its event came, or its parent's walk missed it.
                    parent = path.rpartition("/")[0]
                    wd = self._dirs.get(parent)
                    if wd is not None:
                        self._walk_new(parent, self._wds[wd][1], path)
                        continue
                self._put(path, entry)
        hub = self._hub
        for wd in self._orphans:
            if wd not in self._wds and hub is not None:
                hub.rm_watch(wd)  # moved out of the folder
        self._orphans.clear()

    def _put(self, path: str, new: Entry | None) -> None:
        """Set the index entry of `path`, keep the usage, and note the change."""
        old = self._entries.get(path)
        if new is None:
            if old is None:
                return
            del self._entries[path]
        else:
            self._entries[path] = new
        if old is not None:
            self._usage.remove(old)
        if new is not None:
            self._usage.add(new)
        if new is None or new.kind == "dir":
            if old is not None and old.kind != "dir":
                self._pending.note(path, None)
        elif old is None or not tree.same(old, new):
            self._pending.note(path, new.kind)

    def _drop_tree(self, path: str, moved: bool) -> None:
        """A directory left: deleted (it was empty, its content's events came first) or moved (all below it)."""
        below = [path]
        if moved:
            prefix = path + "/"
            below += [p for p in self._entries if p.startswith(prefix)]
        for p in below:
            self._put(p, None)
        dirs = [path] + ([d for d in self._dirs if d.startswith(path + "/")] if moved else [])
        for d in dirs:
            wd = self._dirs.pop(d, None)
            if wd is not None:
                self._wds.pop(wd, None)
                if moved:
                    self._orphans.add(wd)

    def _walk_new(self, parent: str, parent_ino: int, path: str) -> None:
        """A directory appeared: watch it, then list it (what it got before the watch existed is found here)."""
        name = path.rpartition("/")[2]
        try:
            pfd, _ = tree.open_dir(self.root, parent, parent_ino, self._dev)
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(pfd)
        except OSError:
            return  # gone already; its IN_DELETE follows
        if not S_ISDIR(st.st_mode):
            self._put(path, entry_of(st))
            return
        found: dict[str, Entry] = {}

        def on_dir(rel: str, fd: int, ino: int) -> None:
            if not self._watch(self._wds, self._dirs, rel, fd, ino):
                self.degraded = True

        try:
            tree.walk(self.root, path, st.st_ino, self._dev, on_dir, found)
        except OSError:
            return
        for p, entry in found.items():
            self._put(p, entry)

    def _watch(self, wds: dict[int, tuple[str, int]], dirs: dict[str, int], rel: str, fd: int, ino: int) -> bool:
        hub = self._hub
        if hub is None or (len(wds) >= self.max_watches and rel not in dirs):
            return False
        try:
            wd = hub.add_watch(self, fd, WATCH_MASK)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
                logger.debug("no watch on %r in %s: %s", rel, self.root, exc)
            return False
        with self._lock:  # a rescan's walk calls this from its worker thread
            before = wds.get(wd)
            if before is not None and before[0] != rel and dirs.get(before[0]) == wd:
                del dirs[before[0]]
            wds[wd] = (rel, ino)
            dirs[rel] = wd
            self._orphans.discard(wd)
        return True
