"""Snapshots of sessions' namespaces on the host: one folder per session under its owner's folder, newest only.

Layout: `<files_dir>/<owner_key>/snapshots/<session_id>/run-<seq>/` holding `manifest.json` and one `p<index>.bin`
per pickled name; a snapshot being written is `.tmp-<random>/` beside them and is renamed to `run-<seq>` only once
its manifest is written, so a reader (or a server killed mid-write) only ever sees complete ones. A part whose
digest did not change since the last snapshot is hard-linked from it rather than written again, and a snapshot
identical to the last one is not written at all. Older snapshots are removed once a newer one is in place.

Nothing here unpickles anything: the parts are only ever loaded inside a sandbox of the session that wrote them
(backends/local/kernel/snapshot.py). Part file names are made here, never taken from the sandbox, and session ids
and owner keys are checked, so no path can be named from outside. Blocking: call from a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_SESSION = re.compile(r"[A-Za-z0-9_-]{1,80}")
_OWNER = re.compile(r"o_[0-9a-f]{32}|o_none")
_RUN = re.compile(r"run-(\d{1,12})")


class SnapshotUnreadable(Exception):
    """The newest snapshot's manifest cannot be read: nothing of it can be restored."""


@dataclass
class Snapshot:
    """A complete snapshot as its manifest says."""

    path: Path
    seq: int
    manifest: dict[str, Any]

    @property
    def parts(self) -> list[dict[str, Any]]:
        return [p for p in self.manifest.get("parts") or [] if isinstance(p, dict)]

    def part_file(self, part: dict[str, Any]) -> Path:
        return self.path / str(part.get("file", ""))


@dataclass
class Writer:
    """One snapshot being written (by a reception thread)."""

    store: SnapshotStore
    owner_key: str
    session_id: str
    tmp: Path
    previous: Snapshot | None
    parts: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0
    changed: bool = False

    def unchanged(self, name: str, digest: str) -> dict[str, Any] | None:
        """The last snapshot's part of `name` when it has this digest (its bytes need not travel again)."""
        if self.previous is None:
            return None
        for p in self.previous.parts:
            if p.get("name") == name and p.get("digest") == digest and p.get("kind") == "value":
                return p
        return None

    def link(self, part: dict[str, Any], old: dict[str, Any]) -> None:
        assert self.previous is not None
        name = f"p{len(self.parts):05d}.bin"
        src = self.previous.part_file(old)
        try:
            os.link(src, self.tmp / name)
        except OSError:
            shutil.copyfile(src, self.tmp / name)
        self.parts.append({**part, "file": name})
        self.bytes += int(part.get("bytes", 0))

    def open_part(self, part: dict[str, Any]) -> Any:
        name = f"p{len(self.parts):05d}.bin"
        self.parts.append({**part, "file": name})
        self.bytes += int(part.get("bytes", 0))
        self.changed = True
        return open(self.tmp / name, "wb")

    def add(self, part: dict[str, Any]) -> None:
        """A part without bytes (a module kept by name)."""
        self.parts.append(dict(part))

    def commit(self, meta: dict[str, Any]) -> Snapshot | None:
        """Put it in place (None, and nothing written, when it equals the last one)."""
        prev = self.previous
        if prev is not None and not self.changed:
            same = [(p.get("name"), p.get("kind"), p.get("digest"), p.get("module")) for p in prev.parts] == [
                (p.get("name"), p.get("kind"), p.get("digest"), p.get("module")) for p in self.parts
            ]
            if (
                same
                and prev.manifest.get("skipped") == meta.get("skipped")
                and prev.manifest.get("over") == meta.get("over")
            ):
                self.abort()
                return None
        manifest = {"version": 1, "session": self.session_id, **meta, "parts": self.parts, "bytes": self.bytes}
        with open(self.tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh)
        seq = (prev.seq if prev is not None else 0) + 1
        folder = self.store.folder(self.owner_key, self.session_id)
        dest = folder / f"run-{seq}"
        while dest.exists():
            seq += 1
            dest = folder / f"run-{seq}"
        if self.store.is_closed(self.owner_key, self.session_id):
            self.abort()
            return None
        os.rename(self.tmp, dest)
        self.store.prune(self.owner_key, self.session_id, keep=seq)
        self.store.committed(self.owner_key, self.session_id, seq)
        return Snapshot(dest, seq, manifest)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class SnapshotStore:
    """Every session's newest snapshot, counted against the server's store of files."""

    def __init__(self, files_dir: Path) -> None:
        self.files_dir = files_dir
        self._lock = threading.Lock()
        self._bytes: dict[tuple[str, str], int] = {}  # (owner_key, session) -> bytes of its newest snapshot
        self.room: Callable[[int], bool] = lambda extra: True  # set by the engine: does the store have room?
        self._closed: set[tuple[str, str]] = set()  # sessions deleted: a snapshot still in flight is dropped
        # Set by the engine when a shared store mirrors the data folder: a snapshot in place, a session's gone.
        self.committed: Callable[[str, str, int], None] = lambda owner_key, session_id, seq: None
        self.deleted: Callable[[str, str], None] = lambda owner_key, session_id: None

    def folder(self, owner_key: str, session_id: str) -> Path:
        if not _OWNER.fullmatch(owner_key) or not _SESSION.fullmatch(session_id):
            raise ValueError("not a session of this server")
        return self.files_dir / owner_key / "snapshots" / session_id

    @property
    def used_bytes(self) -> int:
        return sum(self._bytes.values())

    def scan(self) -> None:
        """The sizes of every snapshot on disk (at start), and in-flight leftovers of a killed server removed."""
        sizes: dict[tuple[str, str], int] = {}
        for owner in _entries(self.files_dir):
            if not _OWNER.fullmatch(owner.name):
                continue
            for session in _entries(Path(owner.path) / "snapshots"):
                for entry in _entries(Path(session.path)):
                    if entry.name.startswith(".tmp-"):
                        shutil.rmtree(entry.path, ignore_errors=True)
                runs = [e for e in _entries(Path(session.path)) if _RUN.fullmatch(e.name)]
                if runs:  # a broken one too: restoring it says why it cannot be read
                    sizes[(owner.name, session.name)] = sum(_disk_bytes(Path(e.path)) for e in runs)
        with self._lock:
            self._bytes = sizes

    def has(self, owner_key: str, session_id: str) -> bool:
        """Whether the session has a snapshot (from memory: asked before every new worker's first run)."""
        return (owner_key, session_id) in self._bytes

    def is_closed(self, owner_key: str, session_id: str) -> bool:
        with self._lock:
            return (owner_key, session_id) in self._closed

    def sessions(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._bytes)

    def latest(self, owner_key: str, session_id: str) -> Snapshot | None:
        """The newest complete snapshot; SnapshotUnreadable when its manifest is broken."""
        return self._newest(self.folder(owner_key, session_id), strict=True)

    def _newest(self, folder: Path, strict: bool = False) -> Snapshot | None:
        best: tuple[int, Path] | None = None
        for entry in _entries(folder):
            m = _RUN.fullmatch(entry.name)
            if m and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), Path(entry.path))
        if best is None:
            return None
        try:
            with open(best[1] / MANIFEST, encoding="utf-8") as fh:
                manifest = json.load(fh)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("parts"), list):
                raise ValueError("it is not a snapshot manifest")
        except (OSError, ValueError) as exc:
            if strict:
                reason = f"the snapshot's manifest cannot be read ({type(exc).__name__}: {exc})"
                raise SnapshotUnreadable(reason) from None
            return None
        return Snapshot(best[1], best[0], manifest)

    def begin(self, owner_key: str, session_id: str) -> Writer:
        folder = self.folder(owner_key, session_id)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = folder / f".tmp-{secrets.token_hex(8)}"
        tmp.mkdir(mode=0o700)
        try:
            previous = self._newest(folder)
        except OSError:
            previous = None
        return Writer(self, owner_key, session_id, tmp, previous)

    def prune(self, owner_key: str, session_id: str, keep: int) -> None:
        folder = self.folder(owner_key, session_id)
        for entry in _entries(folder):
            m = _RUN.fullmatch(entry.name)
            if m and int(m.group(1)) != keep:
                shutil.rmtree(entry.path, ignore_errors=True)
        with self._lock:
            self._bytes[(owner_key, session_id)] = _disk_bytes(folder / f"run-{keep}")

    def delete(self, owner_key: str, session_id: str) -> None:
        """The session's snapshots, all gone, and none written for it again (close_session)."""
        with self._lock:
            self._closed.add((owner_key, session_id))
        with contextlib.suppress(ValueError):
            shutil.rmtree(self.folder(owner_key, session_id), ignore_errors=True)
        with self._lock:
            self._bytes.pop((owner_key, session_id), None)
        self.deleted(owner_key, session_id)

    def newest_seq(self, owner_key: str, session_id: str) -> int:
        """The run number of the newest complete snapshot here (0: none)."""
        snap = self._newest(self.folder(owner_key, session_id))
        return snap.seq if snap is not None else 0

    def adopted(self, owner_key: str, session_id: str, seq: int) -> None:
        """A snapshot brought from the shared store is in place: counted, and found by `has`."""
        self.prune(owner_key, session_id, keep=seq)


def _entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _disk_bytes(path: Path) -> int:
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    st = e.stat(follow_symlinks=False)
                    # A part linked from an older snapshot costs nothing more; count it once all the same.
                    total += st.st_blocks * 512
    except OSError:
        return 0
    return total
