"""Bubblewrap: the sandbox a worker normally runs in, and the launcher that starts workers in it.

Two modes (see shared/reference/local-sandbox.md):
- "bwrap-root" (the server runs as root): bwrap runs privileged WITHOUT a user namespace, so that the sandboxed code
  can run as a real, dedicated, non-root host uid. A user namespace started by root maps the sandbox to host uid 0,
  and RLIMIT_NPROC never applies to uid 0, so a fork bomb would not be stopped. bwrap keeps only CAP_SETUID and
  CAP_SETGID; the worker uses them to switch to the container's uid/gid before any user code runs, which clears
  every capability. bwrap sets no_new_privs, so nothing can regain privileges afterwards.
- "bwrap-userns" (the server is not root): plain unprivileged bwrap with --unshare-user; the sandbox runs as the
  server's own uid with no capabilities.
Both unshare the network, pid, ipc, uts and cgroup namespaces, die with the server, start a new session, mount
only /usr, a few /etc files, the Python installation(s) and the worker read-only, the container's data folder at
/mnt/data and a size-capped private tmpfs at /tmp, and may load a seccomp filter (seccomp.py).

The worker's pid on the host comes from bwrap's --json-status-fd (the sandbox's pid 1) and that process's only
child; killing pid 1 takes the whole pid namespace with it. This module knows nothing of containers or of the
worker protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..kernel import protocol
from . import profile as sandbox
from .launcher import (
    LaunchedWorker,
    LaunchFailed,
    LaunchSpec,
    PopenWorker,
    WorkerFds,
    pidfd,
    popen,
    signal_pid,
    worker_config,
)
from .profile import BwrapInfo

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
TOP_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")  # merged-/usr symlinks at the top


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
    packages: Path | None = None
    seccomp_fd: int | None = None


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


def ancestors(path: str) -> list[str]:
    """The folders above `path` (not `/`, not `path`), outermost first."""
    parts = Path(path).parts[1:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def system_binds() -> list[str]:
    """bwrap arguments for the host's /usr, read-only, and its merged-/usr links at the top (/bin, /lib...):
    what any sandbox here needs to run the host's programs."""
    argv = ["--ro-bind", "/usr", "/usr"]
    for name in TOP_LINKS:
        host = "/" + name
        if os.path.islink(host):
            argv += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            argv += ["--ro-bind", host, host]
    return argv


def bwrap_argv(profile: sandbox.Profile, layout: Layout, worker_argv: list[str]) -> list[str]:
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

    argv += system_binds()
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
    for path in sandbox.python_paths():
        for anc in ancestors(path):
            if anc not in created:
                # Traverse-only: the sandbox can reach the interpreter but not list e.g. /root.
                argv += dir_(anc, "0711")
                created.add(anc)
        argv += ["--ro-bind", path, path]
        created.add(path)
    argv += dir_("/opt", "0755") + dir_(sandbox.WORKER_DIR_IN, "0755")
    for name in sandbox.WORKER_FILES:
        argv += ["--ro-bind", str(sandbox.HERE / name), f"{sandbox.WORKER_DIR_IN}/{name}"]
    if layout.mpl_cache is not None:
        argv += ["--ro-bind", str(layout.mpl_cache), sandbox.MPL_CACHE_IN]
    if layout.packages is not None:
        # The whole store of sets, bound once: a set installed later appears inside this live mount, so a worker
        # gets new packages without a restart. Read-only, like everything outside /mnt/data and /tmp.
        argv += [*dir_(sandbox.PACKAGES_IN, "0755"), "--ro-bind", str(layout.packages), sandbox.PACKAGES_IN]
    # No --chdir: the data folder belongs to the sandbox's uid (0700), which bwrap itself is not; the worker
    # changes into it after switching uid.
    argv += [*dir_("/mnt", "0755"), "--bind", str(layout.data_dir), sandbox.WORKDIR]
    # bwrap's root is a tmpfs the sandbox's uid may own (user-namespace mode): make it read-only.
    argv += ["--remount-ro", "/"]
    if layout.status_fd is not None:
        argv += ["--json-status-fd", str(layout.status_fd)]
    if layout.seccomp_fd is not None:
        argv += ["--seccomp", str(layout.seccomp_fd)]
    argv += ["--", *worker_argv]
    return argv


class BubblewrapLauncher:
    """Starts workers in bubblewrap with one profile (and its seccomp program, when the profile uses one)."""

    sandboxed = True

    def __init__(self, profile: sandbox.Profile, seccomp: bytes | None) -> None:
        if profile.bwrap is None:
            raise ValueError("a bubblewrap launcher needs a bubblewrap profile")
        self.profile = profile
        self.seccomp = seccomp

    async def launch(self, spec: LaunchSpec, fds: WorkerFds, log_fd: int) -> LaunchedWorker:
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        seccomp_r: int | None = None
        try:
            if self.seccomp is not None:
                seccomp_r, seccomp_w = os.pipe2(os.O_CLOEXEC)
                try:
                    protocol.write_all(seccomp_w, self.seccomp)  # a few hundred bytes: fits the pipe buffer
                finally:
                    os.close(seccomp_w)
            cfg = worker_config(
                spec,
                fds,
                workdir=sandbox.WORKDIR,
                mplconfigdir=sandbox.MPLCONFIGDIR_IN,
                mpl_cache=sandbox.MPL_CACHE_IN if spec.mpl_cache else None,
                may_kill_strays=True,
                packages_dir=sandbox.PACKAGES_IN if spec.packages is not None else None,
            )
            layout = Layout(
                data_dir=spec.data,
                container_dir=spec.root,
                passwd=spec.root / "passwd",
                group=spec.root / "group",
                tmp_bytes=spec.tmp_bytes,
                mpl_cache=spec.mpl_cache,
                status_fd=status_w,
                seccomp_fd=seccomp_r,
                packages=spec.packages,
            )
            worker_argv = sandbox.worker_command(f"{sandbox.WORKER_DIR_IN}/worker.py", cfg)
            env = sandbox.sandbox_env(
                home="/tmp", tmp="/tmp", mplconfigdir=sandbox.MPLCONFIGDIR_IN, threads=spec.threads
            )
            child_fds = [*fds.all(), status_w] + ([seccomp_r] if seccomp_r is not None else [])
            process = popen(bwrap_argv(self.profile, layout, worker_argv), env, "/", log_fd, child_fds)
        except BaseException:
            for fd in (status_r, status_w, seccomp_r):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            raise
        os.close(status_w)
        if seccomp_r is not None:
            os.close(seccomp_r)
        os.set_blocking(status_r, False)
        return BwrapWorker(process, status_r)


class BwrapWorker(PopenWorker):
    """A worker inside bwrap: bwrap (our child) runs the sandbox's pid 1, whose only child is the worker."""

    sandboxed = True

    def __init__(self, process: subprocess.Popen[bytes], status_r: int) -> None:
        super().__init__(process)
        self.status_r = status_r
        self.init_pid: int | None = None
        self._init_pidfd: int | None = None

    async def post_launch(self) -> None:
        line = b""
        with anyio.fail_after(5):
            while b"\n" not in line:
                try:
                    chunk = os.read(self.status_r, 4096)
                except BlockingIOError:
                    await anyio.wait_readable(self.status_r)
                    continue
                if not chunk:
                    raise LaunchFailed("bwrap closed its status pipe")
                line += chunk
        status = json.loads(line.split(b"\n", 1)[0])
        self.init_pid = int(status["child-pid"])
        self._init_pidfd = pidfd(self.init_pid)
        children = _child_pids(self.init_pid)
        if len(children) != 1:
            raise LaunchFailed(f"expected one process under the sandbox's init, found {children}")
        self.worker_pid = children[0]
        self._worker_pidfd = pidfd(self.worker_pid)

    def _kill_tree(self) -> None:
        # The sandbox's pid 1 takes the whole pid namespace with it, and bwrap exits once its child died; kill
        # bwrap itself if that init was never identified.
        if self._init_pidfd is not None:
            signal_pid(self._init_pidfd, self.init_pid, signal.SIGKILL)
        else:
            signal_pid(self._popen_pidfd, self.popen.pid, signal.SIGKILL)

    def _signal_of(self, returncode: int) -> int | None:
        # bwrap reports its child's death by a signal as 128+signal.
        if returncode > 128:
            return returncode - 128
        return super()._signal_of(returncode)

    def pids(self) -> dict[str, int]:
        found = {"bwrap": self.popen.pid, "init": self.init_pid, "worker": self.worker_pid}
        return {role: pid for role, pid in found.items() if pid is not None}

    def _own_fds(self) -> list[int | None]:
        return [*super()._own_fds(), self._init_pidfd, self.status_r]


def _child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        pass
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) > 1 and int(rest[1]) == pid:
            found.append(int(name))
    return found
