"""One container's data folder as the backend sees it: which files it holds, how much disk it really uses, and
uploads into it within the disk quota.

A `ChangeTracker` (changes.py) watches the folder with inotify: the listing is kept from the changes it drains
(a full walk only when the tracker is opened, after lost events, or where a watch could not be set), so a run that
touched one file among 10,000 costs one lstat, and files nobody changed are never looked at again. The tracker's
real-block usage is what the quota (quota.py) is enforced on. Nothing here knows workers or runs.
"""

from __future__ import annotations

import os
from operator import attrgetter
from pathlib import Path

import anyio

from ....errors import CIError, ContainerExpired
from ...base import CopySink, FetchResult, Listing, RemoteFile
from . import files
from .changes import ChangeTracker, Entry, Inotify

_BY_PATH = attrgetter("path")


def _shown(path: str) -> str:
    """The name a file is listed (and harvested) under: its own, or, when it is not UTF-8 and so cannot be shown
    in a tool result, its bytes escaped ("bad\\xff.txt"); fetches read the real file behind that name."""
    if path.isascii():
        return path
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


async def open_tracker(path: Path, hub: Inotify | None, max_watches: int = 10_000) -> ChangeTracker:
    """A started tracker of the folder `path` (its first walk in a thread). OSError when it is gone."""
    tracker = ChangeTracker(path, hub=hub, max_watches=max_watches)
    try:
        await anyio.to_thread.run_sync(tracker.start)
    except BaseException:
        tracker.close()
        raise
    return tracker


class DataFolder:
    """The data folder of container `cid`, owned by the sandbox's uid/gid (None: the server's own)."""

    def __init__(self, cid: str, path: Path, uid: int | None, gid: int | None) -> None:
        self.cid = cid
        self.path = path
        self.uid = uid
        self.gid = gid
        self.user_versions: dict[str, str] = {}  # path -> version of files put there by upload, unchanged since
        self.tracker: ChangeTracker | None = None
        self._files: dict[str, RemoteFile] = {}
        self._listing: Listing | None = None  # sorted, None when it must be rebuilt
        self._handed: Listing | None = None  # the last listing handed out: the next one's base
        self._touched: dict[str, None] = {}  # the paths whose entries were set since `_handed` was made
        self.real_names: dict[str, str] = {}  # listed name -> the real (non-UTF-8) name it stands for

    async def open(self, hub: Inotify | None) -> None:
        """Watch the folder and index what it holds (a walk: in a thread, a resumed folder may be big)."""
        try:
            tracker = await open_tracker(self.path, hub)
        except OSError:
            raise ContainerExpired(f"Container {self.cid} no longer exists.") from None
        self.attach(tracker)

    def attach(self, tracker: ChangeTracker) -> None:
        """Take over a tracker already started on this folder (a warm spare's)."""
        self.tracker = tracker
        self._files = {}
        for path, entry in tracker.files.items():
            self._set(path, entry)
        self._listing = self._handed = None
        self._touched = {}

    def close(self) -> None:
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            tracker.close()

    def _require(self) -> ChangeTracker:
        if self.tracker is None:
            raise ContainerExpired(f"Container {self.cid} no longer exists.")
        return self.tracker

    @property
    def usage(self) -> int:
        """Disk bytes the folder really occupies, as of the last events read (st_blocks, per inode)."""
        return self.tracker.usage_bytes if self.tracker is not None else 0

    def pump(self) -> None:
        """Read the events queued now (the quota callback runs from here when the folder crossed its limit)."""
        tracker = self.tracker
        if tracker is not None and tracker.hub is not None:
            tracker.hub.pump()
            tracker.check_quota()

    async def list(self) -> Listing:
        tracker = self._require()
        try:
            changes = await tracker.changes()
        except OSError:
            raise ContainerExpired(f"Container {self.cid} no longer exists.") from None
        if tracker.gone:
            raise ContainerExpired(f"Container {self.cid} no longer exists.")
        index = tracker.files
        for path in (*changes.changed, *changes.removed, *changes.symlinks, *changes.specials):
            self._set(path, index.get(path))
        if self._listing is None:
            handed, files = self._handed, self._files
            changes: dict[str, RemoteFile | None] = {}
            if handed is not None:
                for path in self._touched:
                    f = files.get(path)
                    changes[f.path if f is not None else _shown(path)] = f
            listing = Listing(files.values(), handed.generation if handed is not None else None, changes)
            listing.sort(key=_BY_PATH)
            self._listing = self._handed = listing
            self._touched = {}
        return self._listing  # the same list while nothing changes (the engine's O(1) unchanged test): read only

    def _set(self, path: str, entry: Entry | None) -> None:
        self._listing = None
        self._touched[path] = None
        if entry is None or entry.kind == "dir":
            self._files.pop(path, None)
            return
        shown = _shown(path)
        if shown != path:
            self.real_names[shown] = path
        version = entry.version
        if entry.kind != "file":
            # Listed so the caller can say what was skipped; never followed nor fetched.
            why = "a symbolic link" if entry.kind == "symlink" else "not a regular file"
            self._files[path] = RemoteFile(path=shown, bytes=0, version="x" + version, skipped=why)
            return
        self._files[path] = RemoteFile(
            path=shown,
            bytes=entry.size,
            version=version,
            source="user" if self.user_versions.get(path) == version else "generated",
            created_at=entry.mtime_ns / 1e9,
        )

    async def fetch(self, path: str, dest: Path, max_bytes: int) -> FetchResult:
        real = self.real_names.get(path, path)
        return await anyio.to_thread.run_sync(files.fetch, self.path, real, Path(dest), int(max_bytes))

    async def fetch_many(self, paths: list[str], max_bytes: int, sink: CopySink) -> list[FetchResult | CIError]:
        """A harvest's batch in one thread hop (`files.fetch_many`)."""
        real = self.real_names
        items = [(real.get(path, path), path) for path in paths] if real else [(path, path) for path in paths]
        return await anyio.to_thread.run_sync(files.fetch_many, self.path, items, int(max_bytes), sink)

    async def put(self, src: Path, dest_path: str, max_file_bytes: int, quota_bytes: int) -> RemoteFile:
        self.pump()
        used = self.usage

        def do_put() -> RemoteFile:
            return files.put(
                self.path,
                Path(src),
                dest_path,
                self.uid,
                self.gid,
                int(max_file_bytes),
                room_bytes=max(quota_bytes - used, 0),
            )

        remote = await anyio.to_thread.run_sync(do_put)
        self.user_versions[remote.path] = remote.version
        self._files[remote.path] = remote
        self._listing = None
        self._touched[remote.path] = None
        return remote
