"""Packages on demand: `PackageManager.ensure(requirements)` turns PEP 508 requirements into an installed,
read-only package set that a run's sandbox can mount.

    manager = PackageManager(settings)
    reqs = gather_requirements(packages, code)          # the packages argument + the code's PEP 723 block
    if reqs:
        pkg = await manager.ensure(reqs, progress)      # InstalledSet: key, path, distributions, seconds, reused
        ...                                             # mount pkg.path read-only, first on sys.path
        manager.release(pkg.key)                        # when the container that mounts it is gone

How: the policy is checked; a request already resolved maps straight to its set (nothing runs). Else, when some
stored set holds all the names asked for, the installer (uv, or pip) resolves the request to exact pins inside the
installer sandbox, the pins name the set (interpreter, platform, pins, builds allowed), and a set already stored
is reused; else the pins are installed (no dependencies) into a temporary folder in the store. When no stored set
holds those names the request cannot resolve to one, so resolving and installing are one installer command, and
what it laid out names the set. Either way the folder is measured against the per-set limit and renamed into
place, so a set is whole or absent. The same request (and installs of one set) are serialised (in-process locks
and a lock file): two sessions asking at once install once. All of it runs under the install timeout;
cancelling the caller kills the installer's sandbox.

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
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
from .cache import SetMeta, SetStore, environment_tag, normalize_pin, request_hash, set_key
from .index import index_config
from .installer import Installer, Phase, find_tool, tool_version
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
        named = ", ".join(reqs[:5]) + (f" and {len(reqs) - 5} more" if len(reqs) > 5 else "")
        raise PackageInstallTimeout(f"Installing {named} took longer than {timeout:g} s and was stopped.")

    async def start(self) -> None:
        """Prepare the store, find the installer and probe its sandbox now rather than on the first request
        (blocking work, done in a thread). Raises what the first request would raise."""
        if self.enabled:
            await self._setup()

    def release(self, key: str) -> None:
        """Give back one lease taken by `ensure` or `lease`."""
        self.store.release(key)

    def lease(self, key: str) -> bool:
        """One more lease on a set already leased (or stored); False when it is being evicted right now."""
        return self.store.acquire(key)

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
            out["cache"] = await anyio.to_thread.run_sync(self.store.describe)
        except OSError as exc:
            out["cache"] = {"dir": str(self.store.root), "error": str(exc)}
        return out

    # ------------------------------------------------------------------------------------- the steps

    async def _ensure(self, reqs: list[str], progress: Progress, started: float) -> InstalledSet:
        installer = await self._setup()
        rhash = await anyio.to_thread.run_sync(
            lambda: request_hash(reqs, installer.index.fingerprint(), installer.allow_builds, installer.tool.name)
        )
        async with self._lock("request:" + rhash):
            key = await anyio.to_thread.run_sync(self.store.recall, rhash)
            if key is not None:
                found = await self._reuse(key, started)
                if found is not None:
                    return found
            await progress(0, 3, f"resolving {len(reqs)} requirement(s)")
            names = {canonicalize_name(Requirement(r).name) for r in reqs}
            work = await anyio.to_thread.run_sync(self.store.new_workdir)
            try:
                if await anyio.to_thread.run_sync(self.store.names_installed, names):
                    found = await self._resolve_then_install(installer, reqs, work, progress, started)
                else:
                    found = await self._install_directly(installer, reqs, work, progress, started)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.store.discard, work)
            await anyio.to_thread.run_sync(self.store.remember, rhash, found.key)
            return found

    async def _resolve_then_install(
        self, installer: Installer, reqs: list[str], work: Path, progress: Progress, started: float
    ) -> InstalledSet:
        # Some set holds these names, so the request may resolve to it: resolve first, install only if not.
        async with self._limiter, self._tool_cache_in_use(installer):
            pins = await installer.resolve(reqs, work)
        key = set_key(pins, installer.allow_builds)
        found = await self._reuse(key, started)
        if found is not None:
            return found
        async with self._lock("set:" + key):
            fd = await self._install_lock(key)
            try:
                # Another server process may have installed it while we waited for the lock.
                found = await self._reuse(key, started)
                if found is not None:
                    return found
                await self._run_install(installer, pins, work, progress, exact=True)
                meta, reused = await anyio.to_thread.run_sync(self._commit, work, pins, reqs, installer)
            finally:
                self.store.unlock(fd)
        return await self._finish(meta, reused, progress, started)

    async def _install_directly(
        self, installer: Installer, reqs: list[str], work: Path, progress: Progress, started: float
    ) -> InstalledSet:
        # No set holds all these names, so none can be what they resolve to: resolve and install in one installer
        # command (one sandbox, one process: a first install costs about what the installer alone does), and
        # name the set by what was installed. Two requests racing to the same new set: the first rename wins.
        await self._run_install(installer, reqs, work, progress, exact=False)
        meta, reused = await anyio.to_thread.run_sync(self._commit, work, None, reqs, installer)
        return await self._finish(meta, reused, progress, started)

    async def _run_install(
        self, installer: Installer, items: list[str], work: Path, progress: Progress, *, exact: bool
    ) -> None:
        reached: set[str] = set()

        async def on_phase(phase: Phase) -> None:
            if phase not in reached:
                reached.add(phase)
                step = 1 if phase == "downloading" else 2
                await progress(step, 3, f"{phase} {len(items)} {'distribution' if exact else 'requirement'}(s)")

        if exact:
            await on_phase("downloading")  # resolved already
        async with self._limiter, self._tool_cache_in_use(installer):
            await installer.install(items, work, work / "site", on_phase, exact=exact)

    def _commit(
        self, work: Path, pins: list[str] | None, reqs: list[str], installer: Installer
    ) -> tuple[SetMeta, bool]:
        """Measure, check and store the installed folder, and lease the set; True when it turned out to be a set
        stored meanwhile by someone else (this folder is then dropped)."""
        size, files, dists, pth = self.store.measure(work / "site")
        installed = [normalize_pin(n, v) for n, v in dists]
        if pins is not None and sorted(normalize_pin(*p.split("==", 1)) for p in pins) != installed:
            raise PackageInstallFailed(f"The installer laid out {installed}, not the resolved {pins}.")
        key = set_key(installed, installer.allow_builds)
        existing = self._lease_existing(key)
        if existing is not None:
            return existing, True
        if size > self.settings.package_set_max_mb * MIB:
            raise PackageTooLarge(
                f"The packages take {size / MIB:.1f} MiB installed, over this server's limit of "
                f"{self.settings.package_set_max_mb} MiB per set."
            )
        now = time.time()
        meta = SetMeta(
            key=key, distributions=dists, bytes=size, files=files, created=now, last_used=now, requirements=reqs,
            pins=installed, installer=installer.tool.name, isolation=installer.isolation,
            allow_builds=installer.allow_builds, pth_files=pth, **environment_tag(),
        )  # fmt: skip
        stored = self.store.commit(work, meta)
        if not self.store.acquire(key):
            raise PackageInstallFailed("The new package set was removed while it was being stored.")
        return stored, stored is not meta

    async def _finish(self, meta: SetMeta, reused: bool, progress: Progress, started: float) -> InstalledSet:
        await anyio.to_thread.run_sync(self.store.evict, {meta.key}, 0 if reused else meta.bytes)
        await progress(3, 3, f"installed {len(meta.distributions)} distribution(s)")
        return self._result(meta, started, reused=reused)

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
