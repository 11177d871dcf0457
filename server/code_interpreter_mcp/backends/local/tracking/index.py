"""A change tracker's index of one folder, and what each inotify event does to it (changes.py has the tracker).

`FolderIndex` holds every entry below the folder (`tree.Entry`, from one lstat when an event names the path),
their real disk use, the watches (wd -> directory and its inode), and the changes not yet drained. An event marks
its path dirty; the batch's end (`flush`) lstats each dirty path once, so a file written in many calls costs one
lstat a batch.

- New directories are watched as soon as their IN_CREATE is read, then listed at once: what was put in them before
  the watch existed (mkdir then write, the race) is found by the listing, what comes after by the watch. The watch
  is set through /proc/self/fd on the directory opened and checked by `tree.walk`, never on a path.
- A directory moved within the folder is the removal of every path under its old name and the creation of every
  path under its new one (the new subtree is walked; its watches follow inodes and are reused).
- The walk of a new directory runs on the event loop, so it stops after `WALK_LIMIT` entries (a big tree moved
  in, a walk racing code that makes directories faster than they are listed) and asks for a rescan, which a
  worker thread does.
- Paths past PATH_MAX are opened through a `tree.DirFds`, so a chain of new directories as deep as code makes it
  costs an open or two a level, not one per component (O(depth²) on the event loop for a 1,000-level tree).
- Files deleted while still open: their later writes are counted in `unlinked_writes` (no path accounts for
  that disk), from the names of the last `_RECENT_DELETES` deletions.

Flags the tracker reads: `degraded` (some directory has no watch), `gone` (the folder itself left),
`overflowed` (events were lost). Threads: the event loop's, except that a rescan's walk (in a worker thread) sets
watches through `watch` under `lock` and hands its result to `replace`. Must not know: quotas, rescans' timing,
containers, harvesting.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from stat import S_ISDIR

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
    Listener,
)
from .tree import Changes, Entry, entry_of

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
WALK_LIMIT = 2000  # entries a new directory's walk may list on the event loop (~10 ms); a rescan does the rest

Watches = dict[int, tuple[str, int]]  # wd -> (directory, its inode)


class FolderIndex:
    """The entries, usage, watches and pending changes of the folder `root` (see the module docstring).
    `owner` is the listener the watches route to (the tracker), whose `hub` is the inotify instance in use."""

    def __init__(self, root: str, owner: Listener, max_watches: int) -> None:
        self.root = root
        self.owner = owner
        self.max_watches = max_watches
        self.lock: threading.RLock = threading.RLock()
        self.hub: Inotify | None = None
        self.dev = 0
        self.root_ino = 0
        self.entries: dict[str, Entry] = {}
        self.usage = tree.Usage()
        self.wds: Watches = {}
        self.dirs: dict[str, int] = {}  # directory -> wd
        self.pending = Changes()
        self.degraded = False
        self.gone = False
        self.overflowed = False
        self._dirty: dict[str, None] = {}  # paths to lstat at the end of the batch (an ordered set)
        self._deleted: dict[str, None] = {}
        self._orphans: set[int] = set()  # watches of directories moved away, dropped unless they came back
        self._fds = tree.DirFds()

    def close(self) -> None:
        self.wds.clear()
        self.dirs.clear()
        self._fds.close()

    # ------------------------------------------------------------------------------------------ events

    def event(self, event: Event) -> None:
        where = self.wds.get(event.wd)
        if where is None:
            return  # a directory already forgotten (deleted, moved away, or re-watched under a new number)
        rel_dir, dir_ino = where
        mask = event.mask
        if mask & IN_IGNORED:
            del self.wds[event.wd]
            if self.dirs.get(rel_dir) == event.wd:
                del self.dirs[rel_dir]
            return
        if not event.name:  # about the watched directory itself; its parent reports what matters
            if rel_dir == "" and mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
                self.gone = True
                self.overflowed = True
            return
        path = f"{rel_dir}/{event.name}" if rel_dir else event.name
        isdir = bool(mask & IN_ISDIR)
        if mask & (IN_DELETE | IN_MOVED_FROM):
            self._dirty.pop(path, None)
            if isdir:
                self._drop_tree(path, moved=bool(mask & IN_MOVED_FROM))
            else:
                self.put(path, None)
                if mask & IN_DELETE:
                    self._deleted[path] = None
                    if len(self._deleted) > _RECENT_DELETES:
                        del self._deleted[next(iter(self._deleted))]
            self._touch(rel_dir)
        elif mask & (IN_CREATE | IN_MOVED_TO):
            self._deleted.pop(path, None)
            if isdir and not (mask & IN_CREATE and path in self.dirs):
                # A directory made under a name watched already was found by its parent's walk (mkdir cannot
                # replace a name, and the old one's IN_DELETE/IN_MOVED_FROM came first): not walked twice.
                self._walk_new(rel_dir, dir_ino, path)
            else:
                self._dirty[path] = None
            self._touch(rel_dir)
        elif not isdir and mask & (IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB):
            if path in self._deleted:
                if mask & IN_MODIFY:
                    self.pending.unlinked_writes += 1
                return
            self._dirty[path] = None

    def _touch(self, rel_dir: str) -> None:
        if rel_dir:
            self._dirty[rel_dir] = None  # its own blocks grow with its entries

    def flush(self) -> None:
        """The batch ended: lstat each dirty path once and note what changed."""
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            for path in dirty:
                st = tree.lstat(self.root, path, self.dev, self._fds)
                if st is None:
                    self.put(path, None)
                    continue
                entry = entry_of(st)
                if entry.kind == "dir" and path not in self.dirs:
                    # It was something else when its event came, or its parent's walk missed it.
                    parent = path.rpartition("/")[0]
                    wd = self.dirs.get(parent)
                    if wd is not None:
                        self._walk_new(parent, self.wds[wd][1], path)
                        continue
                self.put(path, entry)
        hub = self.hub
        for wd in self._orphans:
            if wd not in self.wds and hub is not None:
                hub.rm_watch(wd)  # moved out of the folder
        self._orphans.clear()

    def put(self, path: str, new: Entry | None) -> None:
        """Set the index entry of `path`, keep the usage, and note the change."""
        old = self.entries.get(path)
        if new is None:
            if old is None:
                return
            del self.entries[path]
        else:
            self.entries[path] = new
        if old is not None:
            self.usage.remove(old)
        if new is not None:
            self.usage.add(new)
        if new is None or new.kind == "dir":
            if old is not None and old.kind != "dir":
                self.pending.note(path, None)
        elif old is None or not tree.same(old, new):
            self.pending.note(path, new.kind)

    def _drop_tree(self, path: str, moved: bool) -> None:
        """A directory left: deleted (it was empty, its content's events came first) or moved (all below it)."""
        self._fds.forget(path)
        below = [path]
        if moved:
            prefix = path + "/"
            below += [p for p in self.entries if p.startswith(prefix)]
        for p in below:
            self.put(p, None)
        dirs = [path] + ([d for d in self.dirs if d.startswith(path + "/")] if moved else [])
        for d in dirs:
            wd = self.dirs.pop(d, None)
            if wd is not None:
                self.wds.pop(wd, None)
                if moved:
                    self._orphans.add(wd)

    def _walk_new(self, parent: str, parent_ino: int, path: str) -> None:
        """A directory appeared: watch it, then list it (what it got before the watch existed is found here)."""
        name = path.rpartition("/")[2]
        try:
            pfd, _ = tree.open_dir(self.root, parent, parent_ino, self.dev, self._fds)
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(pfd)
        except OSError:
            return  # gone already; its IN_DELETE follows
        if not S_ISDIR(st.st_mode):
            self.put(path, entry_of(st))
            return
        found: dict[str, Entry] = {}

        def on_dir(rel: str, fd: int, ino: int) -> None:
            if not self.watch(self.wds, self.dirs, rel, fd, ino):
                self.degraded = True

        try:
            whole = tree.walk(self.root, path, st.st_ino, self.dev, on_dir, found, self._fds, WALK_LIMIT)
        except OSError:
            return
        for p, entry in found.items():
            self.put(p, entry)
        if not whole:
            self.overflowed = True  # the rest is walked by a rescan, in a worker thread

    # ------------------------------------------------------------------------------------------ watches

    def watch(self, wds: Watches, dirs: dict[str, int], rel: str, fd: int, ino: int) -> bool:
        """Watch directory `rel` (open as `fd`) into `wds`/`dirs`: False when it cannot be (no inotify, the
        folder's `max_watches`, the user's fs.inotify.max_user_watches)."""
        hub = self.hub
        if hub is None or (len(wds) >= self.max_watches and rel not in dirs):
            return False
        try:
            wd = hub.add_watch(self.owner, fd, WATCH_MASK)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
                logger.debug("no watch on %r in %s: %s", rel, self.root, exc)
            return False
        with self.lock:  # a rescan's walk calls this from its worker thread
            before = wds.get(wd)
            if before is not None and before[0] != rel and dirs.get(before[0]) == wd:
                del dirs[before[0]]
            wds[wd] = (rel, ino)
            dirs[rel] = wd
            self._orphans.discard(wd)
        return True

    def replace(self, found: dict[str, Entry], wds: Watches, dirs: dict[str, int], missed: bool) -> None:
        """A full walk's result becomes the index (under `lock`): stale watches go, and what differs from the
        old index is noted as changed. Kept deep directories are let go: after lost events, one may stand
        elsewhere now."""
        self._fds.close()
        stale = self.wds.keys() - wds.keys()
        self.wds, self.dirs = wds, dirs
        for wd in stale:
            if self.hub is not None:
                self.hub.rm_watch(wd)
        for path in self.entries.keys() - found.keys():
            self.put(path, None)
        for path, entry in found.items():
            self.put(path, entry)
        self.degraded = missed
