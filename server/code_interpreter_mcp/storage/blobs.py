"""The blob store: harvested bytes stored once per owner, keyed by their sha256.

Layout: `<files_dir>/<owner_key>/blobs/<sha[:2]>/<sha[2:]>`, copies in flight in `<files_dir>/<owner_key>/tmp/`.
An owner's sessions share its blobs; another owner never sees them (its key is another folder). A blob is never
changed once placed, so every record of the same bytes points at the same file.

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
from dataclasses import dataclass
from pathlib import Path

from ..errors import StorageQuota
from ..sessions import FileRecord
from .copying import disk_bytes

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
        self._tmp_dirs: dict[str, Path] = {}

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
        return self._blob_bytes + self.direct_bytes

    def full(self) -> bool:
        return self.used_bytes >= self.max_bytes

    def quota_error(self, what: str, cost: int | None = None) -> StorageQuota:
        mb = self.max_bytes // (1024 * 1024)
        detail = f" ({cost} bytes on disk)" if cost is not None else ""
        return StorageQuota(f"{what}{detail} was not kept: the server's store of harvested files is full ({mb} MB).")

    # ---- paths ------------------------------------------------------------------------------------------

    def blob_path(self, key: str, sha: str) -> Path:
        return self.files_dir / key / "blobs" / sha[:2] / sha[2:]

    def tmp_path(self, key: str) -> Path:
        """A fresh name for a copy in flight, on the blobs' filesystem (so placing it is a rename). The folder
        is made by whoever writes there first (backends make a destination's folder), never on the loop."""
        folder = self._tmp_dirs.get(key)
        if folder is None:  # a harvest asks once a file: three path joins each cost more than the name
            folder = self._tmp_dirs[key] = self.files_dir / key / "tmp"
        return folder / secrets.token_hex(12)

    # ---- placing and releasing --------------------------------------------------------------------------

    def place(self, key: str, tmp: Path, sha: str, what: str) -> Placed:
        """Turn a finished copy into the blob of its bytes (or drop it when the blob exists) and hold one
        reference to it. StorageQuota, with the copy removed, when new bytes do not fit."""
        bkey = (key, sha)
        dest = self.blob_path(key, sha)
        with self._lock:
            if bkey in self._refs or dest.exists():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                if bkey not in self._disk:  # on disk from before, held by no record yet (or swept soon)
                    self._disk[bkey] = disk_bytes(os.stat(dest))
                    self._blob_bytes += self._disk[bkey]
                self._refs[bkey] = self._refs.get(bkey, 0) + 1
                return Placed(dest, self._disk[bkey], new=False)
            cost = disk_bytes(os.stat(tmp))
            if self.used_bytes + cost > self.max_bytes:
                os.unlink(tmp)
                raise self.quota_error(what, cost)
            try:
                os.rename(tmp, dest)
            except FileNotFoundError:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, dest)
            self._refs[bkey] = 1
            self._disk[bkey] = cost
            self._blob_bytes += cost
            return Placed(dest, cost, new=True)

    def claim(self, key: str, sha: str) -> bool:
        """A copy about to be written holds these bytes' blob instead, when a record holds it already (so it
        is on disk, and stays while this reference lasts): True, and the caller owes one `release` or record."""
        with self._lock:
            left = self._refs.get((key, sha), 0)
            if left <= 0:
                return False
            self._refs[(key, sha)] = left + 1
            return True

    def hold(self, key: str, sha: str) -> None:
        """One more record points at an existing blob (a record copied from another)."""
        with self._lock:
            self._refs[(key, sha)] = self._refs.get((key, sha), 0) + 1

    def release(self, records: list[tuple[str, FileRecord]]) -> int:
        """Records (with their owner keys) no longer hold their copies: a blob no record holds any more is
        deleted, a legacy copy's folder too. The bytes freed."""
        freed = 0
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
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.blob_path(key, rec.blob))
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

    def forget_direct(self, cost: int) -> None:
        """Legacy copies removed wholesale (a session's folder deleted): no longer counted."""
        with self._lock:
            self.direct_bytes = max(self.direct_bytes - cost, 0)

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
                if entry.stat(follow_symlinks=False).st_mtime < self.started_at:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed += 1
            for fan in _entries(Path(owner.path) / "blobs"):
                for entry in _entries(Path(fan.path)):
                    bkey = (owner.name, fan.name + entry.name)
                    with self._lock:
                        if bkey in self._refs:
                            continue
                        self._blob_bytes -= self._disk.pop(bkey, 0)
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                            removed += 1
        return removed


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
