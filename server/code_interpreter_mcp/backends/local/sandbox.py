"""How a worker is isolated: the bubblewrap profile, the worker's environment and rlimits, and a seccomp filter.

Two bubblewrap modes (see shared/reference/local-sandbox.md):
- "bwrap-root" (the server runs as root): bwrap runs privileged WITHOUT a user namespace, so that the sandboxed code
  can run as a real, dedicated, non-root host uid. A user namespace started by root maps the sandbox to host uid 0,
  and RLIMIT_NPROC never applies to uid 0, so a fork bomb would not be stopped. bwrap keeps only CAP_SETUID and
  CAP_SETGID; the worker uses them to switch to the container's uid/gid before any user code runs, which clears
  every capability. bwrap sets no_new_privs, so nothing can regain privileges afterwards.
- "bwrap-userns" (the server is not root): plain unprivileged bwrap with --unshare-user; the sandbox runs as the
  server's own uid with no capabilities.
Both unshare the network, pid, ipc, uts and cgroup namespaces, die with the server, start a new session, mount
only /usr, a few /etc files, the Python installation(s) and the worker read-only, the container's data folder at
/mnt/data and a size-capped private tmpfs at /tmp. A seccomp filter (x86_64, aarch64) refuses namespace creation,
mounts, keyrings, bpf, userfaultfd, perf and io_uring.

"none" (operator opted in with unsafe_no_sandbox): no isolation at all beyond rlimits and a scrubbed environment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Mode = Literal["bwrap-root", "bwrap-userns", "none"]

WORKDIR = "/mnt/data"
WORKER_DIR_IN = "/opt/code-interpreter"
MPL_CACHE_IN = WORKER_DIR_IN + "/mpl-cache"
MPLCONFIGDIR_IN = "/tmp/matplotlib"
HERE = Path(__file__).resolve().parent
WORKER_FILE = HERE / "worker.py"
PROTOCOL_FILE = HERE / "protocol.py"

# Per-container uids are drawn at random from [UID_BASE, UID_BASE + UID_SPAN): far from real users, system ranges
# and systemd's dynamic/nspawn ranges, and random so that two servers on one host rarely share one.
UID_BASE = 0x70000000
UID_SPAN = 1 << 24

_ETC_FILES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "fonts",
    "localtime",
    "timezone",
    "ssl",
    "ca-certificates",
    "mime.types",
    "nsswitch.conf",
    "matplotlibrc",
)
_TOP_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


@dataclass(frozen=True)
class BwrapInfo:
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


@dataclass
class Layout:
    """What one worker's sandbox is built from (host paths) and the fds it inherits."""

    data_dir: Path
    container_dir: Path
    passwd: Path | None
    group: Path | None
    tmp_bytes: int
    mpl_cache: Path | None
    status_fd: int | None = None
    seccomp_fd: int | None = None


# ----------------------------------------------------------------------------------------------- bubblewrap


def find_bwrap(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("bwrap")
    if found:
        return found
    for candidate in ("/usr/bin/bwrap", "/usr/local/bin/bwrap", "/bin/bwrap"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def inspect_bwrap(path: str) -> BwrapInfo:
    """Version and the optional flags this bubblewrap knows (blocking: call from a thread)."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    ver = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, env=env)
    help_ = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10, env=env)
    version = (ver.stdout or ver.stderr).strip().split()[-1] if (ver.stdout or ver.stderr).strip() else "unknown"
    text = help_.stdout + help_.stderr
    return BwrapInfo(
        path=path,
        version=version,
        has_perms="--perms" in text,
        has_size="--size" in text,
        has_disable_userns="--disable-userns" in text,
    )


def uid_range_mapped(base: int = UID_BASE, span: int = UID_SPAN) -> bool:
    """Whether [base, base+span) is mapped in our user namespace (false inside a rootless container)."""
    try:
        with open("/proc/self/uid_map") as fh:
            for line in fh:
                inside, _outside, count = (int(x) for x in line.split())
                if inside <= base and base + span <= inside + count:
                    return True
    except (OSError, ValueError):
        return False
    return False


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


def _ancestors(path: str) -> list[str]:
    parts = Path(path).parts[1:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def bwrap_argv(profile: Profile, layout: Layout, worker_argv: list[str]) -> list[str]:
    """The full bwrap command line for one worker."""
    info = profile.bwrap
    if info is None:
        raise ValueError("bwrap_argv needs a bubblewrap profile")
    perms = info.has_perms

    def dir_(path: str, mode: str) -> list[str]:
        return (["--perms", mode] if perms else []) + ["--dir", path]

    argv = [info.path, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if profile.mode == "bwrap-userns":
        argv += ["--unshare-user"]
        if info.has_disable_userns:
            argv += ["--disable-userns"]
        argv += ["--uid", str(os.getuid()), "--gid", str(os.getgid())]
    argv += ["--die-with-parent", "--new-session", "--hostname", "sandbox", "--cap-drop", "ALL"]
    if profile.mode == "bwrap-root":
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]

    argv += ["--ro-bind", "/usr", "/usr"]
    for name in _TOP_LINKS:
        host = "/" + name
        if os.path.islink(host):
            argv += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            argv += ["--ro-bind", host, host]
    created = {"/", "/usr", "/etc", "/tmp", "/dev", "/proc", "/mnt", "/opt", "/var"}
    argv += dir_("/etc", "0755")
    for name in _ETC_FILES:
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    if layout.passwd is not None:
        argv += ["--ro-bind", str(layout.passwd), "/etc/passwd"]
    if layout.group is not None:
        argv += ["--ro-bind", str(layout.group), "/etc/group"]
    if os.path.isdir("/var/cache/fontconfig"):
        argv += dir_("/var", "0755") + dir_("/var/cache", "0755")
        argv += ["--ro-bind", "/var/cache/fontconfig", "/var/cache/fontconfig"]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    size = ["--size", str(layout.tmp_bytes)] if info.has_size else []
    argv += (["--perms", "1777"] if perms else []) + size + ["--tmpfs", "/dev/shm"]
    argv += (["--perms", "1777"] if perms else []) + size + ["--tmpfs", "/tmp"]
    for path in python_paths():
        for anc in _ancestors(path):
            if anc not in created:
                # Traverse-only: the sandbox can reach the interpreter but not list e.g. /root.
                argv += dir_(anc, "0711")
                created.add(anc)
        argv += ["--ro-bind", path, path]
        created.add(path)
    argv += dir_("/opt", "0755") + dir_(WORKER_DIR_IN, "0755")
    argv += ["--ro-bind", str(WORKER_FILE), f"{WORKER_DIR_IN}/worker.py"]
    argv += ["--ro-bind", str(PROTOCOL_FILE), f"{WORKER_DIR_IN}/protocol.py"]
    if layout.mpl_cache is not None:
        argv += ["--ro-bind", str(layout.mpl_cache), MPL_CACHE_IN]
    # No --chdir: the data folder belongs to the sandbox's uid (0700), which bwrap itself is not; the worker
    # changes into it after switching uid.
    argv += [*dir_("/mnt", "0755"), "--bind", str(layout.data_dir), WORKDIR]
    # bwrap's root is a tmpfs the sandbox's uid may own (user-namespace mode): make it read-only.
    argv += ["--remount-ro", "/"]
    if layout.status_fd is not None:
        argv += ["--json-status-fd", str(layout.status_fd)]
    if layout.seccomp_fd is not None:
        argv += ["--seccomp", str(layout.seccomp_fd)]
    argv += ["--", *worker_argv]
    return argv


def worker_command(worker_path: str, config: dict[str, Any]) -> list[str]:
    import json

    # -I: ignore PYTHON* variables and the user site; -B: the read-only prefix gets no .pyc files.
    return [interpreter(), "-I", "-B", worker_path, json.dumps(config, separators=(",", ":"))]


def sandbox_env(home: str, tmp: str, mplconfigdir: str, user: str = "sandbox") -> dict[str, str]:
    """The worker's whole environment: built from scratch, so no API key or token of the server can leak in."""
    exe_dir = os.path.dirname(interpreter())
    path = ":".join(dict.fromkeys([exe_dir, "/usr/local/bin", "/usr/bin", "/bin"]))
    threads = "1"
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
        "OPENBLAS_NUM_THREADS": threads,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "NUMEXPR_NUM_THREADS": threads,
        "VECLIB_MAXIMUM_THREADS": threads,
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


# ----------------------------------------------------------------------------------------------- seccomp

# Syscalls refused with EPERM. Namespace creation is the important one (the root mode has no --disable-userns);
# the rest is attack surface sandboxed code has no use for.
_DENY = {
    "x86_64": {
        "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "userfaultfd": 323,
        "perf_event_open": 298, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "syslog": 103, "open_by_handle_at": 304, "acct": 163,
        "swapon": 167, "swapoff": 168, "reboot": 169, "quotactl": 179, "lookup_dcookie": 212,
    },
    "aarch64": {
        "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280, "userfaultfd": 282,
        "perf_event_open": 241, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "syslog": 116, "open_by_handle_at": 265, "acct": 89,
        "swapon": 224, "swapoff": 225, "reboot": 142, "quotactl": 60, "lookup_dcookie": 18,
    },
}  # fmt: skip
_ARCH = {"x86_64": (0xC000003E, 56, 435), "aarch64": (0xC00000B7, 220, 435)}  # audit arch, clone, clone3
_CLONE_NS_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_EPERM, _ENOSYS = 1, 38
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06


def seccomp_program(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp filter for `bwrap --seccomp FD`, or None on an architecture we have no table for."""
    machine = machine or platform.machine()
    if machine in ("amd64", "x64"):
        machine = "x86_64"
    if machine == "arm64":
        machine = "aarch64"
    if machine not in _DENY:
        return None
    audit_arch, nr_clone, nr_clone3 = _ARCH[machine]
    ins: list[tuple[int, int, int, int]] = []

    def stmt(code: int, k: int) -> None:
        ins.append((code, 0, 0, k))

    def jump(code: int, k: int, jt: int, jf: int) -> None:
        ins.append((code, jt, jf, k))

    stmt(_LD_W_ABS, 4)  # seccomp_data.arch
    jump(_JEQ_K, audit_arch, 1, 0)
    stmt(_RET_K, _RET_ERRNO | _ENOSYS)  # a foreign ABI (e.g. int 0x80 on x86_64)
    stmt(_LD_W_ABS, 0)  # seccomp_data.nr
    if machine == "x86_64":
        jump(_JGE_K, 0x40000000, 0, 1)  # the x32 ABI
        stmt(_RET_K, _RET_ERRNO | _ENOSYS)
    for nr in sorted(_DENY[machine].values()):
        jump(_JEQ_K, nr, 0, 1)
        stmt(_RET_K, _RET_ERRNO | _EPERM)
    # clone3 hides its flags in memory a filter cannot read: ENOSYS makes glibc fall back to clone.
    jump(_JEQ_K, nr_clone3, 0, 1)
    stmt(_RET_K, _RET_ERRNO | _ENOSYS)
    jump(_JEQ_K, nr_clone, 0, 3)
    stmt(_LD_W_ABS, 16)  # low 32 bits of args[0] (little-endian): the clone flags
    jump(_JSET_K, _CLONE_NS_FLAGS, 0, 1)
    stmt(_RET_K, _RET_ERRNO | _EPERM)
    stmt(_RET_K, _RET_ALLOW)
    return b"".join(struct.pack("=HBBI", *i) for i in ins)


# ----------------------------------------------------------------------------------------------- font cache


def font_cache_key() -> str | None:
    """Identifies the interpreter + matplotlib whose font list we cache; None when matplotlib is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        mpl_version = version("matplotlib")
    except PackageNotFoundError:
        return None
    except Exception:
        return None
    raw = f"{interpreter()}|{sys.prefix}|{mpl_version}".encode()
    return f"mpl-{mpl_version}-{hashlib.sha256(raw).hexdigest()[:12]}"


def prebuild_font_cache(cache_root: Path, timeout_s: float = 120.0) -> Path | None:
    """Build matplotlib's font list once on the host (blocking: call from a thread) and return its directory.

    A fresh MPLCONFIGDIR costs about 0.5 s on the first `import matplotlib.pyplot` in every new sandbox; the worker
    copies this prebuilt list instead. Font paths are the same inside the sandbox (same-path binds), and HOME is a
    scratch folder so no per-user fonts get listed."""
    key = font_cache_key()
    if key is None:
        return None
    final = cache_root / key
    if any(final.glob("fontlist-*.json")):
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=".build-") as scratch:
        build = Path(scratch) / "out"
        build.mkdir()
        env = sandbox_env(home=scratch, tmp=scratch, mplconfigdir=str(build))
        proc = subprocess.run(
            [interpreter(), "-I", "-B", "-c", "import matplotlib.font_manager"],
            env=env,
            cwd=scratch,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0 or not any(build.glob("fontlist-*.json")):
            err = proc.stderr.decode(errors="replace")[-500:]
            logger.warning("could not prebuild matplotlib's font cache: %s", err)
            return None
        for p in build.iterdir():
            if not p.name.endswith(".json"):
                p.unlink()
        build.chmod(0o755)
        for p in build.iterdir():
            p.chmod(0o644)
        try:
            build.rename(final)
        except OSError:
            if not any(final.glob("fontlist-*.json")):  # another server won the race: fine
                raise
    return final


def valid_container_id(cid: str) -> bool:
    return re.fullmatch(r"lc_[0-9a-f]{24}", cid) is not None
