"""The blob store: harvested bytes stored once per owner, keyed by their sha256.

Layout: `<files_dir>/<owner_key>/blobs/<sha[:2]>/<sha[2:]>`, copies in flight in `<files_dir>/<owner_key>/tmp/`.
An owner's sessions share its blobs; another owner never sees them (its key is another folder). A blob is never
changed once placed, so every record of the same bytes points at the same file. Small files whose bytes are read
whole (`keep`) are written straight to their blob (no copy in flight, no rename); a larger copy is made in
`tmp/` and renamed into place (`place`). A file at a blob's path that no reference holds is never trusted (a
crash may have cut it short): it is replaced.

Reference counts live in memory, rebuilt at start from the registry's file records (mark: every record that is
not dropped holds its blob), so nothing but the records themselves is persisted; a blob no record holds (a crash
between placing and recording) is swept after start. Placing, releasing and sweeping take one lock, so a blob
being placed is never the one a release deletes. Storage is counted in allocated blocks (a sparse file costs what
it occupies), against the server-wide quota. Every method blocks: callers run it in a worker thread.

It knows the registry's `FileRecord` and the error taxonomy; nothing of runs, backends or MCP.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import StorageQuota
from ..sessions import FileRecord
from .copying import disk_bytes, new_file

BlobKey = tuple[str, str]  # (owner_key, sha256)


def owner_key(owner: str | None) -> str:
    """The folder of an owner's blobs: a digest, so no subject (a token's) can name a path or another's folder."""
    if owner is None:
        return "o_none"
    return "o_" + hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass
class Placed:
    """Where a harvested copy went: its blob, what the blob costs, and whether these bytes were new."""

    path: Path
    disk_bytes: int
    new: bool


class BlobStore:
    def __init__(self, files_dir: Path, max_bytes: int) -> None:
        self.files_dir = files_dir
        self.max_bytes = max_bytes
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._refs: dict[BlobKey, int] = {}
        self._disk: dict[BlobKey, int] = {}
        self._blob_bytes = 0
        self.direct_bytes = 0  # records of the earlier one-folder-per-file layout, read where they lie
        self._root = os.fspath(files_dir)
        self._writing: set[BlobKey] = set()  # blobs `keep` is writing: not swept, not written twice at once
        self.extra_bytes: Callable[[], int] = lambda: 0  # other bytes under the same quota (namespace snapshots)
        self.released: Callable[[list[str]], None] = lambda keys: None  # blobs deleted here (for the shared store)

    # ---- loading ----------------------------------------------------------------------------------------

    def load(self, blob_refs: list[tuple[str | None, str, int, int]], direct_bytes: int) -> None:
        """From the registry: (owner, sha256, records holding it, its disk bytes) and the legacy copies' bytes."""
        with self._lock:
            for owner, sha, refs, disk in blob_refs:
                key = (owner_key(owner), sha)
                self._refs[key] = self._refs.get(key, 0) + refs
                self._blob_bytes += disk - self._disk.get(key, 0)
                self._disk[key] = disk
            self.direct_bytes = direct_bytes

    @property
    def used_bytes(self) -> int:
        return self._blob_bytes + self.direct_bytes + self.extra_bytes()

    def full(self) -> bool:
        return self.used_bytes >= self.max_bytes

    def quota_error(self, what: str, cost: int | None = None) -> StorageQuota:
        mb = self.max_bytes // (1024 * 1024)
        detail = f" ({cost} bytes on disk)" if cost is not None else ""
        return StorageQuota(f"{what}{detail} was not kept: the server's store of harvested files is full ({mb} MB).")

    # ---- paths ------------------------------------------------------------------------------------------

    def blob_path(self, key: str, sha: str) -> Path:
        return Path(self.blob_file(key, sha))

    def blob_file(self, key: str, sha: str) -> str:
        """`blob_path` as a string: a harvest asks once a file, and four path joins cost 6 us, this 0.3."""
        return f"{self._root}/{key}/blobs/{sha[:2]}/{sha[2:]}"

    def tmp_file(self, key: str) -> str:
        """A fresh name for a copy in flight, on the blobs' filesystem (so placing it is a rename). The folder
        is made by whoever writes there first (backends make a destination's folder), never on the loop."""
        return f"{self._root}/{key}/tmp/{secrets.token_hex(12)}"

    # ---- placing and releasing --------------------------------------------------------------------------

    def place(self, key: str, tmp: Path, sha: str, what: str) -> Placed:
        """Turn a finished copy into the blob of its bytes (or drop it when the blob exists) and hold one
        reference to it. StorageQuota, with the copy removed, when new bytes do not fit."""
        bkey = (key, sha)
        dest = self.blob_path(key, sha)
        with self._lock:
            if self._refs.get(bkey, 0) > 0:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                self._refs[bkey] += 1
                return Placed(dest, self._disk.get(bkey, 0), new=False)
            cost = disk_bytes(os.stat(tmp))
            if self.used_bytes + cost > self.max_bytes:
                os.unlink(tmp)
                raise self.quota_error(what, cost)
            try:
                os.rename(tmp, dest)  # over a file no reference holds: it may be a crash's, cut short
            except FileNotFoundError:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, dest)
            self._refs[bkey] = 1
            self._blob_bytes += cost - self._disk.get(bkey, 0)
            self._disk[bkey] = cost
            return Placed(dest, cost, new=True)

    def keep(self, key: str, data: bytes | bytearray, sha: str, what: str) -> tuple[str, bool]:
        """Hold one reference to the blob of `data` (whose sha256 is `sha`), writing it first when no record
        holds it yet: straight to its blob path, so a small file costs one create and no rename. (its path,
        whether it was written). StorageQuota when new bytes do not fit (nothing left behind)."""
        bkey = (key, sha)
        with self._lock:
            if self._refs.get(bkey, 0) > 0:
                self._refs[bkey] += 1
                return self.blob_file(key, sha), False
            direct = bkey not in self._writing
            if self.used_bytes + len(data) > self.max_bytes:
                raise self.quota_error(what, len(data))
            if direct:
                self._writing.add(bkey)
        if not direct:  # the same bytes being written by another harvest right now: a copy of our own, placed
            tmp = self.tmp_file(key)
            cost = _write_new(tmp, data)
            return str(self.place(key, Path(tmp), sha, what).path), True
        dest = self.blob_file(key, sha)
        try:
            try:
                cost = _write_new(dest, data)
            except FileExistsError:  # a file no reference holds (a crash's, maybe cut short): replaced whole
                tmp = self.tmp_file(key)
                cost = _write_new(tmp, data)
                os.rename(tmp, dest)
        except BaseException:
            with self._lock:
                self._writing.discard(bkey)
            raise
        with self._lock:
            self._writing.discard(bkey)
            refs = self._refs.get(bkey, 0)
            if refs <= 0 and self.used_bytes + cost > self.max_bytes:  # blocks beyond the bytes: over after all
                with contextlib.suppress(OSError):
                    os.unlink(dest)
                raise self.quota_error(what, cost)
            self._refs[bkey] = refs + 1
            if refs <= 0:
                self._blob_bytes += cost - self._disk.get(bkey, 0)
                self._disk[bkey] = cost
        return dest, True

    def hold(self, key: str, sha: str) -> None:
        """One more record points at an existing blob (a record copied from another)."""
        with self._lock:
            self._refs[(key, sha)] = self._refs.get((key, sha), 0) + 1

    def release(self, records: list[tuple[str, FileRecord]]) -> int:
        """Records (with their owner keys) no longer hold their copies: a blob no record holds any more is
        deleted, a legacy copy's folder too. The bytes freed."""
        freed = 0
        gone: list[str] = []
        with self._lock:
            for key, rec in records:
                if rec.blob is None:
                    if rec.local_path:
                        freed += self._remove_direct(rec)
                    continue
                bkey = (key, rec.blob)
                left = self._refs.get(bkey, 0) - 1
                if left > 0:
                    self._refs[bkey] = left
                    continue
                self._refs.pop(bkey, None)
                cost = self._disk.pop(bkey, 0)
                self._blob_bytes -= cost
                freed += cost
                gone.append(f"{key}/blobs/{rec.blob[:2]}/{rec.blob[2:]}")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.blob_path(key, rec.blob))
        if gone:
            self.released(gone)
        return freed

    def _remove_direct(self, rec: FileRecord) -> int:
        path = Path(rec.local_path or "")
        with contextlib.suppress(OSError):
            os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(path.parent)  # the file's own folder of the earlier layout
        cost = (rec.disk_bytes or 0) if rec.source == "generated" else 0  # inputs are not harvested data
        self.direct_bytes = max(self.direct_bytes - cost, 0)
        return cost

    def cost_of(self, key: str, sha: str) -> int:
        return self._disk.get((key, sha), 0)

    # ---- sweeping ---------------------------------------------------------------------------------------

    def sweep(self) -> int:
        """Delete copies left in flight by an earlier process and blobs no record holds; the files removed."""
        removed = 0
        try:
            owners = [e for e in os.scandir(self.files_dir) if e.name.startswith("o_") and e.is_dir()]
        except FileNotFoundError:
            return 0
        for owner in owners:
            for entry in _entries(Path(owner.path) / "tmp"):
                try:
                    stale = entry.stat(follow_symlinks=False).st_mtime < self.started_at
                except FileNotFoundError:
                    continue  # a copy in flight that became its blob (or was dropped) since the listing
                if stale:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed += 1
            for fan in _entries(Path(owner.path) / "blobs"):
                for entry in _entries(Path(fan.path)):
                    bkey = (owner.name, fan.name + entry.name)
                    with self._lock:
                        if bkey in self._refs or bkey in self._writing:
                            continue
                        self._blob_bytes -= self._disk.pop(bkey, 0)
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                            removed += 1
        return removed


class OwnerCopies:
    """One owner's part of the store as a backend's `CopySink`: where a harvest's copies go."""

    def __init__(self, store: BlobStore, key: str) -> None:
        self.store, self.key = store, key

    def keep(self, data: bytes | bytearray, sha256: str, path: str) -> tuple[str, bool]:
        return self.store.keep(self.key, data, sha256, path)

    def new_path(self) -> str:
        return self.store.tmp_file(self.key)


def _write_new(path: str, data: bytes | bytearray) -> int:
    """`data` in a new file at `path` (its folder made when missing); what it costs on disk. FileExistsError when
    something is there already; nothing is left behind on any other failure."""
    with new_file(path) as fd:
        out = memoryview(data)
        while out:
            out = out[os.write(fd, out) :]
        return disk_bytes(os.fstat(fd))


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
