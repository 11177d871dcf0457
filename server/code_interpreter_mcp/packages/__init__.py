"""Packages on demand: `PackageManager.ensure(requirements)` turns PEP 508 requirements into an installed,
read-only package set that a run's sandbox can mount.

    manager = PackageManager(settings)
    reqs = gather_requirements(packages, code)          # the packages argument + the code's PEP 723 block
    if reqs:
        pkg = await manager.ensure(reqs, progress)      # InstalledSet: key, path, distributions, seconds, reused
        ...                                             # mount pkg.path read-only, first on sys.path
        manager.release(pkg.key)                        # when the container that mounts it is gone

How: the policy is checked; a request already resolved maps straight to its set (nothing runs); else the
installer (uv, or pip) resolves it to exact pins inside the installer sandbox, the pins name the set (interpreter,
platform, pins, builds allowed), and a set already in the store is reused; else the pins are installed into a
temporary folder in the store, measured against the per-set limit and renamed into place. Installs of one set are
serialised (in-process lock and a lock file), so two sessions asking at once install once. All of it runs under
the install timeout; cancelling the caller kills the installer's process group.

The set's folder is meant to go on `sys.path` directly, not through `site.addsitedir`: `.pth` files a wheel
carries are kept (and listed in the set's metadata) but not executed. Every set `ensure` returns holds a lease
(counted) until `release`: eviction never drops a leased set, in this process or another sharing the cache.

This package knows nothing of MCP, sessions, engines or backends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..backends.base import Progress, no_progress
from ..config import Settings
from ..errors import (
    BadRequirement,
    CIError,
    PackageInstallFailed,
    PackageInstallTimeout,
    PackageTooLarge,
    SandboxUnavailable,
)
from .cache import SetMeta, SetStore, environment_tag, request_hash, set_key
from .index import index_config
from .installer import Installer, find_tool, tool_version
from .policy import PackagePolicy
from .requirements import gather_requirements, normalize_requirements, script_dependencies
from .sandbox import Bwrap, find_bwrap, probe_bwrap

__all__ = [
    "InstalledSet",
    "PackageManager",
    "gather_requirements",
    "normalize_requirements",
    "script_dependencies",
]

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
POLL_S = 0.05


@dataclass(frozen=True)
class InstalledSet:
    key: str
    path: Path  # mount read-only, first on sys.path
    distributions: list[tuple[str, str]]  # (canonical name, version) of every distribution in the set
    seconds: float
    reused: bool
    bytes: int = 0


class PackageManager:
    def __init__(self, settings: Settings, *, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.policy = PackagePolicy.build(settings.packages_policy, settings.package_allowlist)
        self.store = SetStore(settings.package_cache_path, settings.package_cache_quota_mb * MIB)
        self._environ = environ
        self._installer: Installer | None = None
        self._setup_lock = anyio.Lock()
        self._locks: dict[str, anyio.Lock] = {}
        self._limiter = anyio.CapacityLimiter(2)

    @property
    def enabled(self) -> bool:
        return self.policy.mode != "off"

    async def ensure(self, requirements: Iterable[object], progress: Progress = no_progress) -> InstalledSet:
        """The installed set for `requirements`, installing it if needed; it is leased until `release`."""
        started = time.monotonic()
        reqs = normalize_requirements(requirements)
        if not reqs:
            raise BadRequirement("No packages were named.")
        self.policy.check(reqs)
        timeout = self.settings.package_install_timeout_s
        with anyio.move_on_after(timeout) as scope:
            return await self._ensure(reqs, progress, started)
        assert scope.cancelled_caught
        raise PackageInstallTimeout(f"Installing {', '.join(reqs)} took longer than {timeout:g} s and was stopped.")

    def release(self, key: str) -> None:
        """Give back one lease taken by `ensure`."""
        self.store.release(key)

    async def aclose(self) -> None:
        self.store.release_all()

    async def describe(self) -> dict[str, object]:
        """Policy, installer, isolation, index and cache, for `doctor` (no secrets: index URLs are masked)."""
        s = self.settings
        out: dict[str, object] = {
            **self.policy.describe(),
            "allow_builds": s.package_allow_builds,
            "install_timeout_s": s.package_install_timeout_s,
            "set_max_bytes": s.package_set_max_mb * MIB,
            **environment_tag(),
        }
        if self.enabled:
            try:
                installer = await self._setup()
                out["installer"] = await anyio.to_thread.run_sync(tool_version, installer.tool)
                out["isolation"] = installer.isolation
                out["index"] = installer.index.describe()
            except CIError as exc:
                out["error"] = exc.user_text()
        try:
            out["cache"] = await anyio.to_thread.run_sync(self._describe_cache)
        except OSError as exc:
            out["cache"] = {"dir": str(self.store.root), "error": str(exc)}
        return out

    # ------------------------------------------------------------------------------------- the steps

    async def _ensure(self, reqs: list[str], progress: Progress, started: float) -> InstalledSet:
        installer = await self._setup()
        rhash = request_hash(reqs, installer.index.fingerprint(), installer.allow_builds, installer.tool.name)
        async with self._lock("request:" + rhash):
            key = await anyio.to_thread.run_sync(self.store.recall, rhash)
            if key is not None:
                found = await self._reuse(key, started)
                if found is not None:
                    return found
            await progress(0, 3, f"resolving {len(reqs)} requirement(s)")
            work = await anyio.to_thread.run_sync(self.store.new_workdir)
            try:
                async with self._limiter, self._tool_cache_in_use(installer):
                    pins = await installer.resolve(reqs, work)
                key = set_key(pins, installer.allow_builds)
                found = await self._reuse(key, started)
                if found is None:
                    found = await self._install(installer, key, pins, reqs, work, progress, started)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.store.discard, work)
            await anyio.to_thread.run_sync(self.store.remember, rhash, key)
            return found

    async def _install(
        self,
        installer: Installer,
        key: str,
        pins: list[str],
        reqs: list[str],
        work: Path,
        progress: Progress,
        started: float,
    ) -> InstalledSet:
        async with self._lock("set:" + key):
            fd = await self._install_lock(key)
            try:
                # Another server process may have installed it while we waited for the lock.
                found = await self._reuse(key, started)
                if found is not None:
                    return found
                n = len(pins)
                await progress(1, 3, f"downloading {n} distribution(s)")

                async def installing() -> None:
                    await progress(2, 3, f"installing {n} distribution(s)")

                async with self._limiter, self._tool_cache_in_use(installer):
                    await installer.install(pins, work, work / "site", installing)
                meta = await anyio.to_thread.run_sync(self._commit, work, key, pins, reqs, installer)
                if not await anyio.to_thread.run_sync(self.store.acquire, key):
                    raise PackageInstallFailed("The new package set was removed while it was being installed.")
            finally:
                self.store.unlock(fd)
        await anyio.to_thread.run_sync(self.store.evict, {key})
        await progress(3, 3, f"installed {n} distribution(s)")
        return self._result(meta, started, reused=False)

    def _commit(self, work: Path, key: str, pins: list[str], reqs: list[str], installer: Installer) -> SetMeta:
        size, files, dists, pth = self.store.measure(work / "site")
        limit = self.settings.package_set_max_mb * MIB
        if size > limit:
            raise PackageTooLarge(
                f"The packages take {size / MIB:.1f} MiB installed, over this server's limit of "
                f"{self.settings.package_set_max_mb} MiB per set."
            )
        now = time.time()
        tag = environment_tag()
        meta = SetMeta(
            key=key, distributions=dists, bytes=size, files=files, created=now, last_used=now, requirements=reqs,
            pins=pins, installer=installer.tool.name, isolation=installer.isolation,
            allow_builds=installer.allow_builds, pth_files=pth, **tag,
        )  # fmt: skip
        return self.store.commit(work, meta)

    async def _reuse(self, key: str, started: float) -> InstalledSet | None:
        meta = await anyio.to_thread.run_sync(self._lease_existing, key)
        if meta is None:
            return None
        return self._result(meta, started, reused=True)

    def _result(self, meta: SetMeta, started: float, *, reused: bool) -> InstalledSet:
        elapsed = time.monotonic() - started
        return InstalledSet(meta.key, self.store.site_dir(meta.key), meta.distributions, elapsed, reused, meta.bytes)

    def _lease_existing(self, key: str) -> SetMeta | None:
        if not self.store.acquire(key):
            return None  # being evicted right now: install it again
        meta = self.store.lookup(key)
        if meta is None:
            self.store.release(key)
            return None
        self.store.touch(meta)
        return meta

    def _describe_cache(self) -> dict[str, object]:
        self.store.prepare()
        return self.store.describe()

    # ------------------------------------------------------------------------------------- set-up and locks

    async def _setup(self) -> Installer:
        if self._installer is not None:
            return self._installer
        async with self._setup_lock:
            if self._installer is None:
                self._installer = await anyio.to_thread.run_sync(self._build_installer)
            return self._installer

    def _build_installer(self) -> Installer:
        s = self.settings
        self.store.prepare()
        tool = find_tool(s.package_installer)
        if tool is None:
            wanted = "uv" if s.package_installer == "uv" else "uv or pip"
            raise PackageInstallFailed(
                f"No package installer ({wanted}) is available to the server.",
                hint="Install uv into the server's environment (pip install uv).",
            )
        forbidden = [s.data_dir, self.store.root]
        index = index_config(s.package_index_url, s.package_find_links, forbidden=forbidden, environ=self._environ)
        bwrap: Bwrap | None = None
        path = find_bwrap(s.bwrap_path)
        reason = "bubblewrap (bwrap) was not found"
        if path is not None:
            probed = probe_bwrap(path)
            if isinstance(probed, Bwrap):
                bwrap = probed
            else:
                reason = probed
        if bwrap is None:
            if not s.unsafe_no_sandbox:
                raise SandboxUnavailable(f"Packages are installed only inside a sandbox, and it is unusable: {reason}")
            logger.warning("installing packages WITHOUT a sandbox (unsafe_no_sandbox): %s", reason)
        return Installer(tool, bwrap, index, self.store.tool_cache(tool.name), allow_builds=s.package_allow_builds)

    @asynccontextmanager
    async def _lock(self, name: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(name, anyio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(name, None)

    async def _install_lock(self, key: str) -> int:
        while True:
            fd = await anyio.to_thread.run_sync(self.store.try_install_lock, key)
            if fd is not None:
                return fd
            await anyio.sleep(POLL_S)  # another process installs this set

    @asynccontextmanager
    async def _tool_cache_in_use(self, installer: Installer) -> AsyncIterator[None]:
        while True:
            fd = await anyio.to_thread.run_sync(self.store.try_tool_cache_shared)
            if fd is not None:
                break
            await anyio.sleep(POLL_S)  # the cache is being cleared
        try:
            await anyio.to_thread.run_sync(lambda: installer.tool_cache.mkdir(parents=True, exist_ok=True))
            yield
        finally:
            self.store.unlock(fd)
