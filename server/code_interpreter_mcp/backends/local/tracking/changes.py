"""Which files of one container's data folder changed, and what the folder really costs on disk, from inotify.

The host sees the data folder as a plain directory that sandboxed code (another uid) writes. A `ChangeTracker`
watches each of its directories (IN_CREATE, IN_CLOSE_WRITE, IN_MODIFY, which fallocate and [f]truncate raise too,
IN_ATTRIB, IN_DELETE, IN_MOVED_FROM/TO, IN_DELETE_SELF/IN_MOVE_SELF; IN_Q_OVERFLOW), keeps an index of every entry
(index.py: what each event does to it) and answers `drain()`: the paths created, changed or removed since the
last drain (`tree.Changes`). Unchanged files are never looked at again, and an idle folder costs nothing: no
thread, no timer; the fd is read on demand or when the event loop reports it readable (`serve`).

Lost events: on IN_Q_OVERFLOW, or when a watch cannot be set (`max_watches` reached, ENOSPC at
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
events that arrive meanwhile are held and replayed after its diff. Owns: the public face, rescans, the quota
check. Must not know: containers, sessions, harvesting, the sandbox.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType

import anyio
import anyio.to_thread

from . import tree
from .index import FolderIndex
from .inotify import Event, Inotify, Reader, serve
from .tree import Changes, Entry, Snapshot, diff, scan

__all__ = ["ChangeTracker", "Changes", "Entry", "Inotify", "Snapshot", "diff", "scan", "serve"]

logger = logging.getLogger(__name__)

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
        self.last_rescan = 0.0
        self._index = FolderIndex(self.root, self, max_watches)
        self._index.hub = hub
        self._own_hub = hub is None
        self._read = read
        if hub is not None:
            self._index.lock = hub.lock
        self._rescanning = False
        self._rescan_lock = threading.Lock()  # one walk at a time; a second caller waits and walks after it
        self._held: list[Event] = []
        self._quota: tuple[int, QuotaCallback, bool] | None = None
        self._quota_mark = 0

    # ------------------------------------------------------------------------------------------ public face

    def start(self) -> None:
        """Watch the folder and index what it holds (that content is the baseline, not a change). Blocks for a
        walk of the folder: run it in a thread when the folder may be big."""
        index = self._index
        st = tree.root_stat(self.root)
        index.dev, index.root_ino = st.st_dev, st.st_ino
        if index.hub is None:
            try:
                index.hub = Inotify(self._read)
            except OSError as exc:
                logger.warning("no inotify instance for %s (%s): changes come from full scans", self.root, exc)
            else:
                index.lock = index.hub.lock
        if index.hub is not None:
            index.hub.attach(self)
        self.rescan()
        with index.lock:
            index.pending = Changes()

    def close(self) -> None:
        index = self._index
        with index.lock:
            hub, index.hub = index.hub, None
            if hub is not None:
                if self._own_hub:
                    hub.close()
                else:
                    hub.detach(self)
            index.close()

    def __enter__(self) -> ChangeTracker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hub(self) -> Inotify | None:
        return self._index.hub

    @property
    def degraded(self) -> bool:
        """Some directory has no watch: every drain asks for a rescan."""
        return self._index.degraded

    @property
    def gone(self) -> bool:
        """The folder itself was deleted, moved or replaced."""
        return self._index.gone

    @property
    def files(self) -> Mapping[str, Entry]:
        """The index: every entry below the folder (directories too), as of the last pump. Read-only view."""
        return MappingProxyType(self._index.entries)

    @property
    def usage_bytes(self) -> int:
        """Bytes the folder really occupies (st_blocks*512 per distinct inode, directories included)."""
        return self._index.usage.bytes

    @property
    def hole_bytes(self) -> int:
        """Apparent size of its files that is not allocated (what writes into holes could still take)."""
        return self._index.usage.holes

    @property
    def watches(self) -> int:
        return len(self._index.wds)

    def drain(self) -> Changes:
        """The changes since the last drain, from the events queued now. Never blocks: it reads what the kernel
        already queued (one lstat per path named). When `rescan_needed`, call `rescan()` (in a thread) and drain
        again, or use `changes()`, which does both."""
        index = self._index
        if index.hub is not None:
            index.hub.pump()
        with index.lock:
            out, index.pending = index.pending, Changes()
            out.rescan_needed = index.overflowed or index.degraded or index.gone or self._rescanning
        self.check_quota()
        return out

    async def changes(self) -> Changes:
        """`drain()`, completed by a full rescan in a worker thread when events were lost. `rescan_needed` is then
        true only if events were lost again during that walk. FileNotFoundError when the folder is gone."""
        out = self.drain()
        if out.rescan_needed:
            await anyio.to_thread.run_sync(self.rescan)
            out.merge(self.drain())
            out.rescan_needed = self._index.overflowed
        return out

    def rescan(self) -> None:
        """Walk the whole folder: re-arm every watch, rebuild the index and the usage, and add what differs from
        the index to the pending changes. Blocks (safe in a worker thread). FileNotFoundError (or ESTALE) when the
        folder is gone or was replaced."""
        with self._rescan_lock:
            self._rescan()

    def _rescan(self) -> None:
        index = self._index
        with index.lock:
            self._rescanning = True
            index.overflowed = False
            self._held = []
        wds: dict[int, tuple[str, int]] = {}
        dirs: dict[str, int] = {}
        missed = [index.hub is None]

        def on_dir(rel: str, fd: int, ino: int) -> None:
            if not index.watch(wds, dirs, rel, fd, ino):
                missed[0] = True

        found: dict[str, Entry] = {}
        fds = tree.DirFds()  # its own: the event loop's is not for this thread
        try:
            tree.walk(self.root, "", index.root_ino, index.dev, on_dir, found, fds)
        except OSError as exc:
            with index.lock:
                self._rescanning = False
                self._held = []
                index.overflowed = True
                if isinstance(exc, FileNotFoundError | NotADirectoryError) or exc.errno == errno.ESTALE:
                    index.gone = True
            raise
        finally:
            fds.close()
        with index.lock:
            index.replace(found, wds, dirs, missed[0])
            self.last_rescan = time.monotonic()
            self._rescanning = False
            held, self._held = self._held, []
            self.on_events(held)
            index.flush()

    def set_quota(self, limit: int | None, on_exceeded: QuotaCallback | None = None, count_holes: bool = False) -> None:
        """Call `on_exceeded(used_bytes)` when the folder grows past `limit` bytes, and again each time it grows
        further while over it (re-armed once back under). With `count_holes`, holes count as used. The callback
        runs on the pumping thread inside the pump: it must not block nor call back into the tracker; it should
        schedule the work (a task, an event). None: no quota."""
        with self._index.lock:
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
            hub = self._index.hub
            if hub is not None:
                await serve(hub, poll_s=poll_s)
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
            self._index.event(event)

    def on_overflow(self) -> None:
        self._index.overflowed = True

    def on_batch_end(self) -> None:
        if self._rescanning:
            return
        self._index.flush()
        self.check_quota()

    def rescan_due(self, now: float, poll_s: float) -> float | None:
        """For `serve`: only a quota needs the usage kept right between drains, so only then is a rescan due:
        at once after lost events, every `poll_s` while degraded."""
        if self._quota is None or self.gone:
            return None
        if self._index.overflowed:
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
