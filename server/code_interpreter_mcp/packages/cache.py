"""The store of installed package sets: one folder per set, keyed by what it is, shared by every session and by
every server process that uses the same cache folder.

    <cache>/sets/<key>/site/       the installed set: mounted read-only, first on the run's sys.path
    <cache>/sets/<key>/meta.json   distributions, size, created, last used, how it was made
    <cache>/requests/<hash>        a request already resolved -> its set's key (the second ask runs nothing)
    <cache>/tmp/                   sets being installed (renamed into sets/ when complete, so a set is whole or absent)
    <cache>/tool-cache/uv|pip      the installer's own cache
    <cache>/locks/                 flock files: <key>.install (one install per key), <key>.use (leases),
                                   tool-cache.lock (installer commands running vs the cache being cleared)

A set is in use while someone holds a lease on it (a shared flock on `<key>.use`, counted per process): eviction
takes an exclusive flock without waiting, so it never removes a set a live container of any process mounts. The
quota covers the sets and the installer's cache; least recently used sets go first, then the installer's cache if
no install is running. Everything here is blocking file work: callers run it in a worker thread. This module knows
nothing of installers, indexes or policy.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import sys
import sysconfig
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from email.parser import HeaderParser
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from ..removal import remove_tree

TMP_MAX_AGE_S = 24 * 3600
TOOL_CACHE_TTL_S = 30.0


def environment_tag() -> dict[str, str]:
    """What a set is built for besides its pins: interpreter (implementation, version, ABI) and platform."""
    libc, libc_version = platform.libc_ver()
    impl = sys.implementation
    return {
        "interpreter": f"{impl.name}-{'.'.join(map(str, sys.version_info[:3]))}-{impl.cache_tag}",
        "platform": f"{sysconfig.get_platform()}-{libc or 'libc'}{libc_version}",
    }


def normalize_pin(name: str, version: str) -> str:
    """`name==version` with the name canonical and the version normalised, whichever tool reported it."""
    try:
        version = str(Version(version))
    except InvalidVersion:
        pass
    return f"{canonicalize_name(name)}=={version}"


def set_key(pins: list[str], allow_builds: bool) -> str:
    canon = sorted(normalize_pin(*pin.split("==", 1)) for pin in pins)
    blob = json.dumps({**environment_tag(), "pins": canon, "builds": allow_builds}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def request_hash(requirements: list[str], index_fingerprint: str, allow_builds: bool, tool: str) -> str:
    blob = json.dumps(
        {**environment_tag(), "req": sorted(requirements), "index": index_fingerprint, "builds": allow_builds,
         "tool": tool},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class SetMeta:
    key: str
    distributions: list[tuple[str, str]]
    bytes: int
    files: int
    created: float
    last_used: float
    requirements: list[str] = field(default_factory=list)  # what the first request asked for
    pins: list[str] = field(default_factory=list)
    installer: str = ""
    isolation: str = ""
    allow_builds: bool = False
    pth_files: list[str] = field(default_factory=list)
    interpreter: str = ""
    platform: str = ""

    @classmethod
    def from_json(cls, text: str) -> SetMeta:
        raw = json.loads(text)
        raw["distributions"] = [tuple(d) for d in raw.get("distributions", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


class SetStore:
    def __init__(self, root: Path, quota_bytes: int) -> None:
        self.root = root
        self.quota_bytes = quota_bytes
        self.sets_dir = root / "sets"  # Settings.package_sets_path: run sandboxes bind it
        self.tmp_dir = root / "tmp"
        self.locks_dir = root / "locks"
        self.requests_dir = root / "requests"
        self.tool_cache_root = root / "tool-cache"
        self._leases: dict[str, tuple[int, int]] = {}  # key -> (fd, count)
        self._mutex = threading.Lock()
        self._tool_cache_measure: tuple[float, int] = (0.0, 0)  # (monotonic time, bytes)

    def prepare(self) -> None:
        for d in (self.sets_dir, self.tmp_dir, self.locks_dir, self.requests_dir, self.tool_cache_root):
            d.mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()

    def tool_cache(self, tool: str) -> Path:
        path = self.tool_cache_root / tool
        path.mkdir(parents=True, exist_ok=True)
        return path

    def site_dir(self, key: str) -> Path:
        return self.sets_dir / key / "site"

    # ------------------------------------------------------------------------------------- sets and requests

    def lookup(self, key: str) -> SetMeta | None:
        try:
            meta = SetMeta.from_json((self.sets_dir / key / "meta.json").read_text())
        except (OSError, ValueError, TypeError):
            return None
        return meta if self.site_dir(key).is_dir() else None

    def touch(self, meta: SetMeta) -> None:
        meta.last_used = time.time()
        self._write_meta(self.sets_dir / meta.key, meta)

    def recall(self, rhash: str) -> str | None:
        try:
            key = (self.requests_dir / rhash).read_text().strip()
        except OSError:
            return None
        return key if key.isalnum() else None

    def remember(self, rhash: str, key: str) -> None:
        tmp = self.requests_dir / f".{rhash}.{uuid.uuid4().hex}"
        tmp.write_text(key)
        os.replace(tmp, self.requests_dir / rhash)

    def new_workdir(self) -> Path:
        path = self.tmp_dir / f"{int(time.time())}-{uuid.uuid4().hex}"
        path.mkdir(mode=0o755)
        return path

    def measure(self, site: Path) -> tuple[int, int, list[tuple[str, str]], list[str]]:
        """Bytes and files of an installed folder, its distributions (name, version) and its .pth files."""
        total = files = 0
        for dirpath, _dirs, names in os.walk(site):
            for name in names:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                    files += 1
                except OSError:
                    continue
        dists: list[tuple[str, str]] = []
        for info in site.glob("*.dist-info"):
            try:
                headers = HeaderParser().parsestr((info / "METADATA").read_text(errors="replace"))
            except OSError:
                continue
            if headers.get("Name") and headers.get("Version"):
                dists.append((str(canonicalize_name(headers["Name"])), headers["Version"]))
        pth = sorted(p.name for p in site.glob("*.pth"))
        return total, files, sorted(dists), pth

    def commit(self, workdir: Path, meta: SetMeta) -> SetMeta:
        """Make `workdir` (holding `site/`) the set `meta.key`, atomically. If another process got there first,
        its set wins and the work is dropped."""
        for name in ("requirements.in", "pins.txt", "resolution.json"):
            (workdir / name).unlink(missing_ok=True)
        self._write_meta(workdir, meta)
        os.chmod(workdir, 0o755)
        try:
            os.rename(workdir, self.sets_dir / meta.key)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            remove_tree(workdir)
            return self.lookup(meta.key) or meta
        return meta

    def discard(self, workdir: Path) -> None:
        remove_tree(workdir)

    def _write_meta(self, folder: Path, meta: SetMeta) -> None:
        tmp = folder / f".meta.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(asdict(meta), indent=1))
        os.replace(tmp, folder / "meta.json")

    def _sweep_tmp(self) -> None:
        # Left by a server that died while installing; an install in progress is far younger than this.
        now = time.time()
        for entry in self.tmp_dir.iterdir():
            try:
                if now - entry.lstat().st_mtime > TMP_MAX_AGE_S:
                    remove_tree(entry)
            except OSError:
                continue

    # ------------------------------------------------------------------------------------- locks and leases

    def try_install_lock(self, key: str) -> int | None:
        """An exclusive flock meaning "I install `key`"; the fd to pass to `unlock`, or None if someone else
        holds it."""
        return self._try_lock(self.locks_dir / f"{key}.install", fcntl.LOCK_EX)

    def unlock(self, fd: int) -> None:
        os.close(fd)

    def acquire(self, key: str) -> bool:
        """Take a lease on `key` (False while the set is being evicted). Leases are counted per process."""
        with self._mutex:
            held = self._leases.get(key)
            if held is not None:
                self._leases[key] = (held[0], held[1] + 1)
                return True
            fd = self._try_lock(self.locks_dir / f"{key}.use", fcntl.LOCK_SH)
            if fd is None:
                return False
            self._leases[key] = (fd, 1)
            return True

    def release(self, key: str) -> None:
        with self._mutex:
            held = self._leases.get(key)
            if held is None:
                return
            if held[1] > 1:
                self._leases[key] = (held[0], held[1] - 1)
            else:
                del self._leases[key]
                os.close(held[0])

    def leased(self) -> dict[str, int]:
        with self._mutex:
            return {k: n for k, (_fd, n) in self._leases.items()}

    def release_all(self) -> None:
        with self._mutex:
            for fd, _n in self._leases.values():
                os.close(fd)
            self._leases.clear()

    def _try_lock(self, path: Path, mode: int) -> int | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    # ------------------------------------------------------------------------------------- quota

    def names_installed(self, names: set[str]) -> bool:
        """Whether some set already holds distributions of all these (canonical) names: only then can a new
        request resolve to a set the store has."""
        return any(names <= {n for n, _ in meta.distributions} for meta in self.all_sets())

    def all_sets(self) -> list[SetMeta]:
        out: list[SetMeta] = []
        if not self.sets_dir.is_dir():
            return out
        for entry in self.sets_dir.iterdir():
            meta = self.lookup(entry.name)
            if meta is not None:
                out.append(meta)
        return out

    def tool_cache_bytes(self) -> int:
        total = 0
        for dirpath, _dirs, names in os.walk(self.tool_cache_root):
            for name in names:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
        return total

    def tool_cache_estimate(self, added: int) -> int:
        """The installer cache's size, walked at most every TOOL_CACHE_TTL_S (a large cache has many files);
        in between, what was measured plus what was installed since (the installer caches about what it lays
        out), an overestimate."""
        now = time.monotonic()
        with self._mutex:
            measured_at, size = self._tool_cache_measure
            if measured_at and now - measured_at < TOOL_CACHE_TTL_S:
                self._tool_cache_measure = (measured_at, size + added)
                return size + added
        size = self.tool_cache_bytes()
        with self._mutex:
            self._tool_cache_measure = (now, size)
        return size

    def evict(self, protect: set[str], added: int = 0) -> list[str]:
        """Drop least recently used sets (never one leased here or elsewhere, never one in `protect`) until the
        sets and the installer's cache fit the quota; then the installer's cache itself if still over. `added`
        is the size of a set just installed. Returns the keys dropped."""
        sets = sorted(self.all_sets(), key=lambda m: m.last_used)
        total = sum(m.bytes for m in sets) + self.tool_cache_estimate(added)
        dropped: list[str] = []
        for meta in sets:
            if total <= self.quota_bytes:
                break
            if meta.key in protect or meta.key in self.leased():
                continue
            fd = self._try_lock(self.locks_dir / f"{meta.key}.use", fcntl.LOCK_EX)
            if fd is None:
                continue  # leased by another process
            try:
                doomed = self.tmp_dir / f"evicted-{meta.key}-{uuid.uuid4().hex}"
                os.rename(self.sets_dir / meta.key, doomed)
            except OSError:
                os.close(fd)
                continue
            os.close(fd)
            remove_tree(doomed)
            total -= meta.bytes
            dropped.append(meta.key)
        if total > self.quota_bytes:
            # Over even so: measure the installer's cache for real before dropping it.
            kept = sum(m.bytes for m in sets if m.key not in dropped)
            if kept + self.tool_cache_bytes() > self.quota_bytes:
                self._clear_tool_cache()
        if dropped:
            self._forget_requests(set(dropped))
        return dropped

    def try_tool_cache_shared(self) -> int | None:
        """A shared flock held while installer commands use the installer's cache (None while it is cleared)."""
        return self._try_lock(self.locks_dir / "tool-cache.lock", fcntl.LOCK_SH)

    def _clear_tool_cache(self) -> None:
        # Only while no installer command of any process uses it: they hold the shared lock meanwhile.
        fd = self._try_lock(self.locks_dir / "tool-cache.lock", fcntl.LOCK_EX)
        if fd is None:
            return
        try:
            for entry in self.tool_cache_root.iterdir():
                doomed = self.tmp_dir / f"tool-cache-{uuid.uuid4().hex}"
                try:
                    os.rename(entry, doomed)
                except OSError:
                    continue
                remove_tree(doomed)
            with self._mutex:
                self._tool_cache_measure = (time.monotonic(), 0)
        finally:
            os.close(fd)

    def _forget_requests(self, keys: set[str]) -> None:
        for entry in self.requests_dir.iterdir():
            try:
                if entry.read_text().strip() in keys:
                    entry.unlink(missing_ok=True)
            except OSError:
                continue

    def describe(self, limit: int = 10) -> dict[str, object]:
        sets = sorted(self.all_sets(), key=lambda m: m.last_used, reverse=True)
        return {
            "dir": str(self.root),
            "sets": len(sets),
            "sets_bytes": sum(m.bytes for m in sets),
            "tool_cache_bytes": self.tool_cache_bytes(),
            "quota_bytes": self.quota_bytes,
            "recent": [
                {"key": m.key, "distributions": [f"{n}=={v}" for n, v in m.distributions], "bytes": m.bytes,
                 "last_used": m.last_used}
                for m in sets[:limit]
            ],
        }  # fmt: skip
