"""Choosing the isolation at start-up: which bubblewrap mode works on this host, proven by a real worker.

Candidates, best first: "bwrap-root" (a root server with bwrap 0.8+ and the dedicated uid range mapped), then
"bwrap-userns"; each with the seccomp filter, then without. A candidate is accepted only when a worker started
with it shows, from inside, no network, no capabilities, no view of the server's data folder, no writable root,
the right uid, and user namespaces blocked by seccomp. When none works, the server refuses to run code unless the
operator opted in to running it unsandboxed. Nothing here is used after start-up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import anyio

from ....config import Settings
from ....errors import SandboxUnavailable
from ....removal import remove_tree
from ..sandbox import bubblewrap, uids
from ..sandbox.profile import Mode, Profile
from .containers import make_folder
from .pool import WorkerPool
from .process import WorkerProcess

logger = logging.getLogger(__name__)

_PREFIX = ".probe-"
_PROBE_CODE = """\
import os, socket
r = {{"uid": os.getuid(), "gid": os.getgid()}}
with open("/proc/self/status") as fh:
    r["cap_eff"] = next((l.split()[1] for l in fh if l.startswith("CapEff:")), None)
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    r["net"] = "connected"
except OSError as e:
    r["net"] = type(e).__name__
r["host_dir_visible"] = os.path.exists({host_dir!r})
try:
    open("/probe-escape", "w").close()
    r["write_root"] = "ok"
except OSError as e:
    r["write_root"] = type(e).__name__
if {check_userns}:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    r["unshare"] = "ok" if libc.unshare(0x10000000) == 0 else os.strerror(ctypes.get_errno())
r
"""


class IsolationProbe:
    """Finds the profile workers run with; `failures` says why better candidates were refused."""

    def __init__(self, settings: Settings, uid_allocator: uids.UidAllocator, seccomp: bytes | None) -> None:
        self.settings = settings
        self.containers_dir = settings.containers_dir
        self.uids = uid_allocator
        self.seccomp = seccomp
        self.failures: list[str] = []

    async def choose(self) -> Profile:
        """The best working profile; the unsafe "none" only when the operator allowed it, else SandboxUnavailable."""
        await anyio.to_thread.run_sync(self._remove_stale)
        profile = await self._best()
        if profile is not None:
            return profile
        detail = "; ".join(self.failures) or "unknown reason"
        if not self.settings.unsafe_no_sandbox:
            raise SandboxUnavailable(f"bubblewrap isolation is not usable on this host: {detail}")
        logger.warning(
            "!!! UNSAFE: running Python code WITHOUT a sandbox (unsafe_no_sandbox is set; bubblewrap: %s). "
            "Code can read and write this user's files and use the network. Only rlimits apply. !!!",
            detail,
        )
        return Profile(mode="none", notes=[detail])

    def _remove_stale(self) -> None:
        """What probes of an earlier process left behind (blocking)."""
        for stale in self.containers_dir.glob(_PREFIX + "*"):
            remove_tree(stale)

    async def _best(self) -> Profile | None:
        path = bubblewrap.find_bwrap(self.settings.bwrap_path)
        if path is None:
            self.failures.append("bwrap is not installed (apt-get install bubblewrap)")
            return None
        try:
            info = await anyio.to_thread.run_sync(bubblewrap.inspect_bwrap, path)
        except Exception as exc:
            self.failures.append(f"{path} does not run: {exc}")
            return None
        modes: list[Mode] = []
        if os.geteuid() == 0:
            if not info.has_perms:
                self.failures.append(f"bwrap {info.version} lacks --perms (need 0.8 or later) for root mode")
            elif not uids.uid_range_mapped():
                self.failures.append("the dedicated uid range is not mapped in this user namespace")
            else:
                modes.append("bwrap-root")
        modes.append("bwrap-userns")
        for mode in modes:
            for use_seccomp in (True, False) if self.seccomp is not None else (False,):
                profile = Profile(mode=mode, bwrap=info, seccomp=use_seccomp)
                if mode == "bwrap-userns" and os.geteuid() == 0:
                    profile.notes.append("root server without dedicated uids: RLIMIT_NPROC does not apply")
                if not use_seccomp:
                    profile.notes.append("no seccomp filter")
                try:
                    await self._probe(profile)
                except Exception as exc:
                    self.failures.append(f"{mode}{'' if use_seccomp else ' without seccomp'}: {exc}")
                    logger.info("sandbox probe failed (%s): %s", mode, exc)
                    continue
                return profile
        return None

    async def _probe(self, profile: Profile) -> None:
        """Start a real worker with this profile and check, from inside, that it is isolated."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        root = self.containers_dir / f"{_PREFIX}{secrets.token_hex(6)}"
        uid, gid = self.uids.allocate(profile.dedicated_uid)
        worker: WorkerProcess | None = None
        try:
            await anyio.to_thread.run_sync(make_folder, root, uid, gid, profile.sandboxed)
            pool = WorkerPool(self.settings, profile, self.seccomp)
            with anyio.fail_after(60):
                worker = await pool.spawn(root, uid, gid)
                code = _PROBE_CODE.format(port=port, host_dir=str(self.containers_dir), check_userns=profile.seccomp)
                resp = await worker.request({"op": "exec", "code": code, "run": 0, "structured": True, "cap": 20000})
            if resp.get("status") != "ok" or not isinstance(resp.get("last_value_json"), str):
                err = resp.get("error") or {}
                raise RuntimeError(f"probe code failed: {err.get('traceback') or err or resp.get('stderr')}")
            problems = _problems(json.loads(resp["last_value_json"]), listener, uid, profile)
            if problems:
                raise RuntimeError("; ".join(problems))
        finally:
            listener.close()
            with anyio.CancelScope(shield=True):
                if worker is not None:
                    await worker.kill()
                self.uids.release(uid)
                await anyio.to_thread.run_sync(_remove, root)


def _problems(r: dict[str, Any], listener: socket.socket, uid: int | None, profile: Profile) -> list[str]:
    """What the probe worker's report `r` shows is not isolated."""
    problems = []
    if r.get("net") == "connected":
        problems.append("the sandbox reached the host's loopback network")
    with contextlib.suppress(BlockingIOError):
        listener.accept()[0].close()
        problems.append("a connection from the sandbox arrived")
    if r.get("cap_eff") != "0000000000000000":
        problems.append(f"the sandbox kept capabilities (CapEff={r.get('cap_eff')})")
    if r.get("host_dir_visible"):
        problems.append("the server's data folder is visible in the sandbox")
    if r.get("write_root") == "ok":
        problems.append("the sandbox could write outside /mnt/data")
    if uid is not None and r.get("uid") != uid:
        problems.append(f"the sandbox runs as uid {r.get('uid')}, not the dedicated uid {uid}")
    if r.get("uid") == 0 and profile.mode == "bwrap-root":
        problems.append("the sandbox runs as root")
    if profile.seccomp and r.get("unshare") == "ok":
        problems.append("the seccomp filter did not block user namespaces")
    return problems


def _remove(root: Path) -> None:
    remove_tree(root)
