"""The data folder's files kept in step with the shared store (`STORE_URL`), so any replica can serve them and a
session's files and variables outlive the machine that made them.

The local folder stays the working copy (harvests hard-link and copy into it, workers read snapshots from it); the
store is its durable, shared mirror, keyed by the path under `files/` (`storage.objects`):
- `push`: a harvest's new copies and uploads go to the store before the run's result is returned. A store that does
  not answer loses nothing: the keys wait in the journal (`<data_dir>/store-pending.json`, rewritten whole on each
  change, so a restart keeps them) and `drain` uploads them once it answers again.
- `snapshot_written`: a namespace snapshot is queued and uploaded in the background (off the run's path, as it is
  written), its parts first and its manifest last, so a reader of the store never sees half of one.
- `fetch`/`fetch_snapshot`: a file or snapshot missing here (made on another replica, or adopted from a dead one)
  is streamed back into its place.
- `forget`: copies let go locally are deleted from the store after a grace period, and only once no record in the
  registry holds them (`needed`, set by the engine): another replica may have recorded the same bytes meanwhile.

Every method blocks except the `*_async` ones; nothing here knows runs, sessions' models or MCP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from ..errors import StoreUnavailable
from .objects import ObjectStore

logger = logging.getLogger(__name__)

DELETE_GRACE_S = 120.0
"""How long a copy let go here stays in the store: longer than a registry flush, so a record of the same bytes made
meanwhile on another replica is seen before the object goes."""

MANIFEST = "manifest.json"
_RUN = re.compile(r"run-(\d{1,12})")


class Mirror:
    def __init__(self, store: ObjectStore, files_dir: Path, journal: Path) -> None:
        self.store, self.files_dir, self.journal = store, files_dir, journal
        self._root = os.fspath(files_dir) + "/"
        self._lock = threading.Lock()
        self._put: dict[str, float] = {}  # key -> when it was first due: local files the store must get
        self._delete: dict[str, float] = {}  # key -> when it was let go here
        self._snapshots: dict[tuple[str, str], int] = {}  # (owner key, session) -> newest run to upload
        self._stored: set[str] = set()  # keys this process knows the store has
        self.needed: Callable[[str], bool] = lambda key: False  # does a record in the registry still hold key?
        self.last_error: str | None = None
        self._load()

    # ---- keys -----------------------------------------------------------------------------------------------

    def key_of(self, path: str | os.PathLike[str]) -> str | None:
        """The store key of a file in the data folder's `files/`; None for anything outside it."""
        text = os.fspath(path)
        if not text.startswith(self._root) or "/../" in text:
            return None
        return text[len(self._root) :]

    def path_of(self, key: str) -> str:
        return self._root + key

    # ---- uploading ------------------------------------------------------------------------------------------

    def push(self, keys: list[str]) -> int:
        """Upload these files (each once; one missing here was stored by whoever made it). The number left
        waiting in the journal because the store did not answer (0: all are in the store)."""
        todo = [k for k in dict.fromkeys(keys) if k not in self._stored]
        for i, key in enumerate(todo):
            try:
                self._upload(key)
            except StoreUnavailable as exc:
                self._note_failure(exc)
                with self._lock:
                    now = time.time()
                    for k in todo[i:]:
                        self._put.setdefault(k, now)
                self._save()
                return len(todo) - i
        return 0

    async def push_async(self, keys: list[str]) -> int:
        return await anyio.to_thread.run_sync(self.push, keys) if keys else 0

    def _upload(self, key: str) -> None:
        try:
            self.store.put_file(key, self.path_of(key))
        except FileNotFoundError:
            pass  # let go since (nothing to keep), or a copy another replica made and stored
        with self._lock:
            self._stored.add(key)
            self._delete.pop(key, None)

    def snapshot_written(self, owner_key: str, session_id: str, seq: int) -> None:
        """A new snapshot is in place (a reception thread): uploaded by the next `drain`."""
        with self._lock:
            self._snapshots[(owner_key, session_id)] = seq
        self._save()

    def _upload_snapshot(self, owner_key: str, session_id: str, seq: int) -> None:
        prefix = f"{owner_key}/snapshots/{session_id}/"
        folder = Path(self.path_of(prefix + f"run-{seq}"))
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return  # replaced by a newer one (queued in its turn) or the session was closed
        if MANIFEST not in names:
            return
        names.remove(MANIFEST)
        for name in [*names, MANIFEST]:  # the manifest last: a reader of the store sees complete ones only
            try:
                self.store.put_file(f"{prefix}run-{seq}/{name}", str(folder / name))
            except FileNotFoundError:
                return  # pruned mid-upload by a newer snapshot, whose own upload follows
        old = [k for k in self.store.list(prefix) if not k.startswith(f"{prefix}run-{seq}/")]
        self.store.delete(old)

    # ---- fetching -------------------------------------------------------------------------------------------

    def fetch(self, key: str) -> bool:
        """The file of `key` in its place here, from the store when it is missing; False when neither has it."""
        path = self.path_of(key)
        if os.path.exists(path):
            return True
        got = self.store.get_file(key, path)
        if got:
            with self._lock:
                self._stored.add(key)
        return got

    async def fetch_async(self, key: str) -> bool:
        return await anyio.to_thread.run_sync(self.fetch, key)

    def fetch_snapshot(self, owner_key: str, session_id: str, newer_than: int = 0) -> int | None:
        """The session's newest complete snapshot in the store, brought here unless it is here already or not
        newer than `newer_than` (the newest here): its run number, or None when the store has none."""
        prefix = f"{owner_key}/snapshots/{session_id}/"
        runs: dict[int, list[str]] = {}
        for key in self.store.list(prefix):
            m = _RUN.fullmatch(key[len(prefix) :].split("/", 1)[0])
            if m:
                runs.setdefault(int(m.group(1)), []).append(key)
        complete = [seq for seq, keys in runs.items() if f"{prefix}run-{seq}/{MANIFEST}" in keys]
        if not complete:
            return None
        seq = max(complete)
        dest = Path(self.path_of(prefix + f"run-{seq}"))
        if seq <= newer_than or (dest / MANIFEST).is_file():
            return seq
        tmp = dest.with_name(f".tmp-{secrets.token_hex(8)}")  # swept by the snapshot store's scan if we die here
        try:
            for key in runs[seq]:
                if not self.store.get_file(key, str(tmp / key.rsplit("/", 1)[1])):
                    return None  # replaced in the store while we read it: the caller goes without
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return seq

    # ---- letting go -----------------------------------------------------------------------------------------

    def forget(self, keys: list[str]) -> None:
        """Copies let go here: deleted from the store by a later `drain` once nothing holds them."""
        if not keys:
            return
        now = time.time()
        with self._lock:
            for key in keys:
                self._put.pop(key, None)
                self._stored.discard(key)
                self._delete[key] = now
        self._save()

    def forget_prefix(self, prefix: str) -> None:
        """Everything under a folder (a closed session's snapshots or inputs), listed from the store."""
        with self._lock:
            for key in [k for k in self._put if k.startswith(prefix)]:
                del self._put[key]
            for k in [k for k in self._snapshots if f"{k[0]}/snapshots/{k[1]}/" == prefix]:
                del self._snapshots[k]
        try:
            self.forget(self.store.list(prefix))
        except StoreUnavailable as exc:
            self._note_failure(exc)

    # ---- the background pass --------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        return len(self._put) + len(self._snapshots) + len(self._delete)

    def drain(self) -> bool:
        """One pass over what waits: uploads, queued snapshots, deletions whose grace ended. True when the store
        answered every call (False: it is down; what is left waits for the next pass)."""
        try:
            with self._lock:
                snaps, self._snapshots = self._snapshots, {}
            for i, ((owner, session), seq) in enumerate(snaps.items()):
                try:
                    self._upload_snapshot(owner, session, seq)
                except BaseException:
                    with self._lock:
                        for k, v in list(snaps.items())[i:]:
                            self._snapshots.setdefault(k, v)
                    raise
            with self._lock:
                puts = list(self._put)
            for key in puts:
                self._upload(key)
                with self._lock:
                    self._put.pop(key, None)
            now = time.time()
            with self._lock:
                due = [k for k, t in self._delete.items() if now - t >= DELETE_GRACE_S]
            gone = [k for k in due if not self.needed(k)]
            self.store.delete(gone)
            with self._lock:
                for k in due:
                    self._delete.pop(k, None)
        except StoreUnavailable as exc:
            self._note_failure(exc)
            return False
        finally:
            self._save()
        self.last_error = None
        return True

    def _note_failure(self, exc: StoreUnavailable) -> None:
        if self.last_error is None:
            logger.warning("%s (kept here; uploaded when it answers)", exc.message)
        self.last_error = exc.message

    # ---- the journal ----------------------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            data = json.loads(self.journal.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict):
            self._put = {str(k): float(v) for k, v in (data.get("put") or {}).items()}
            self._delete = {str(k): float(v) for k, v in (data.get("delete") or {}).items()}
            for item in data.get("snapshots") or []:
                with contextlib.suppress(TypeError, ValueError):
                    self._snapshots[(str(item[0]), str(item[1]))] = int(item[2])

    def _save(self) -> None:
        with self._lock:
            data = {
                "put": dict(self._put),
                "delete": dict(self._delete),
                "snapshots": [[o, s, n] for (o, s), n in self._snapshots.items()],
            }
            if not any(data.values()) and not self.journal.exists():
                return
            tmp = self.journal.with_name(self.journal.name + ".tmp")
            try:
                tmp.write_text(json.dumps(data))
                os.replace(tmp, self.journal)
            except OSError:
                logger.exception("could not write the store's journal %s", self.journal)
