"""What a worker's sandbox is made of, whoever starts it: the isolation profile chosen at start-up, the paths the
worker sees, the files mounted for it, the interpreter and its read-only paths, the scrubbed environment, the rlimits
and the sandbox's passwd/group.

Modes (the profile's `mode`; bubblewrap.py says how each is built):
- "bwrap-root": the server runs as root; bwrap runs without a user namespace and the worker drops to a dedicated,
  non-root host uid per container (uids.py), so RLIMIT_NPROC applies.
- "bwrap-userns": plain unprivileged bwrap with a user namespace; the sandbox runs as the server's own uid.
- "none" (operator opted in with unsafe_no_sandbox): no isolation at all beyond rlimits and a scrubbed environment.

Nothing here starts a process or knows containers.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..kernel import KERNEL_DIR, KERNEL_FILES

Mode = Literal["bwrap-root", "bwrap-userns", "none"]

WORKDIR = "/mnt/data"
WORKER_DIR_IN = "/opt/code-interpreter"
MPL_CACHE_IN = WORKER_DIR_IN + "/mpl-cache"
MPLCONFIGDIR_IN = "/tmp/matplotlib"
PACKAGES_IN = "/opt/packages"  # the store's installed package sets, read-only
HERE = KERNEL_DIR  # the worker and the modules it loads by file path, mounted side by side
WORKER_FILES = KERNEL_FILES
WORKER_FILE = KERNEL_DIR / "worker.py"


@dataclass(frozen=True)
class BwrapInfo:
    """The bwrap binary found on this host and the options it supports (bubblewrap.inspect_bwrap)."""

    path: str
    version: str
    has_perms: bool
    has_size: bool
    has_disable_userns: bool


@dataclass
class Profile:
    """The isolation chosen at start-up."""

    mode: Mode
    bwrap: BwrapInfo | None = None
    seccomp: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def isolation(self) -> str:
        return "none" if self.mode == "none" else "bubblewrap"

    @property
    def dedicated_uid(self) -> bool:
        return self.mode == "bwrap-root"

    @property
    def sandboxed(self) -> bool:
        return self.mode != "none"


def profile_facts(profile: Profile | None) -> dict[str, Any]:
    """The isolation part of the backend's `describe`."""
    p = profile
    info = p.bwrap if p is not None else None
    if p is None:
        uid_mode = "not started"
    elif p.mode == "bwrap-root":
        uid_mode = "dedicated uid per container (bwrap without a user namespace, CAP_SETUID/SETGID only)"
    elif p.mode == "bwrap-userns":
        uid_mode = "the server's uid, in a user namespace"
    else:
        uid_mode = "the server's uid (no sandbox)"
    return {
        "mode": p.mode if p is not None else None,
        "bwrap": info.path if info else None,
        "bwrap_version": info.version if info else None,
        "seccomp": bool(p and p.seccomp),
        "uid": uid_mode,
        "network": "none (own network namespace)" if p is not None and p.mode != "none" else "host",
        "python": interpreter(),
        "mounts_read_only": python_paths(),
    }


def mount_table_path(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str:
    """What the sandbox's /proc/self/mountinfo shows as the source of a bind of `path`: its path within its own
    filesystem (the kernel prints a bind mount's root relative to the filesystem, and neither bwrap nor an
    unprivileged process can mount a neutral filesystem over it). With the data folder on a filesystem of its own
    this is `/containers/...`, not the host's full path; `doctor` reports it."""
    target = os.path.realpath(path)
    best_point, best_root = "", "/"
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split(" ")
                if len(fields) < 5:
                    continue
                root, point = (_unescape(fields[3]), _unescape(fields[4]))
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best_point):
                    best_point, best_root = point, root
    except OSError:
        return target
    rest = target[len(best_point.rstrip("/")) :]
    return (best_root.rstrip("/") + rest) or "/"


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (a space is backslash-040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def python_paths() -> list[str]:
    """Host directories the sandbox's Python needs, bound read-only at the same paths (pyvenv.cfg, RPATHs and
    .pth files hold absolute paths, so relocating them is not reliable)."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for p in sys.path:
        if p and os.path.isdir(p) and ("site-packages" in p or "dist-packages" in p):
            candidates.add(p)
    paths: set[str] = set()
    for c in candidates:
        for variant in (os.path.abspath(c), os.path.realpath(c)):
            if os.path.isdir(variant):
                paths.add(variant)
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    if os.path.isdir(exe_dir):
        paths.add(os.path.dirname(exe_dir))
    chosen: list[str] = []
    for p in sorted(paths, key=len):
        if p == "/" or p == "/usr" or p.startswith("/usr/"):
            continue
        if any(p == c or p.startswith(c.rstrip("/") + "/") for c in chosen):
            continue
        chosen.append(p)
    return chosen


def interpreter() -> str:
    """The sandbox runs the server's own interpreter (its venv, so numpy/pandas/matplotlib are there)."""
    return os.path.abspath(sys.executable)


def worker_command(worker_path: str, config: dict[str, Any]) -> list[str]:
    # -I: ignore PYTHON* variables and the user site; -B: the read-only prefix gets no .pyc files.
    return [interpreter(), "-I", "-B", worker_path, json.dumps(config, separators=(",", ":"))]


def sandbox_env(home: str, tmp: str, mplconfigdir: str, user: str = "sandbox", threads: int = 1) -> dict[str, str]:
    """The worker's whole environment: built from scratch, so no API key or token of the server can leak in.
    `threads`: BLAS/OpenMP threads, the CPUs the sandbox may use (pool.blas_threads)."""
    exe_dir = os.path.dirname(interpreter())
    path = ":".join(dict.fromkeys([exe_dir, "/usr/local/bin", "/usr/bin", "/bin"]))
    threads_s = str(max(1, int(threads)))
    return {
        "PATH": path,
        "HOME": home,
        "TMPDIR": tmp,
        "USER": user,
        "LOGNAME": user,
        "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": mplconfigdir,
        "XDG_CACHE_HOME": os.path.join(home, ".cache"),
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "OPENBLAS_NUM_THREADS": threads_s,
        "OMP_NUM_THREADS": threads_s,
        "MKL_NUM_THREADS": threads_s,
        "NUMEXPR_NUM_THREADS": threads_s,
        "VECLIB_MAXIMUM_THREADS": threads_s,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
    }


def count_processes_of(uid: int) -> int:
    """Processes whose owner is `uid` (RLIMIT_NPROC counts them host-wide for that uid)."""
    n = 0
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    for name in names:
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    n += 1
            except OSError:
                continue
    return n


def rlimits(settings: Any, profile: Profile) -> dict[str, Any]:
    """The worker's rlimits. NPROC only means something for a uid that is not root."""
    cpu = int(settings.cpu_seconds)
    limits: dict[str, Any] = {
        "as": int(settings.memory_mb) * 1024 * 1024,
        # The soft limit raises SIGXCPU (fatal to the worker); the hard one is a backstop.
        "cpu": [cpu, cpu + 2],
        "fsize": int(settings.max_file_bytes),
        "nofile": int(settings.max_open_files),
        "core": 0,
    }
    if profile.dedicated_uid:
        limits["nproc"] = int(settings.max_processes)
    elif os.geteuid() != 0:
        # The server's own uid: its existing processes count too, so leave room for them.
        limits["nproc"] = count_processes_of(os.geteuid()) + int(settings.max_processes)
    return limits


def passwd_text(uid: int, gid: int) -> tuple[str, str]:
    passwd = (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"sandbox:x:{uid}:{gid}:sandbox:/tmp:/usr/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\nsandbox:x:{gid}:\nnogroup:x:65534:\n"
    return passwd, group
