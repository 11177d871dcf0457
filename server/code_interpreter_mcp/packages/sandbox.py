"""The installer's own bubblewrap sandbox, and running one command in it.

The installer (uv or pip) reaches the package index, so the network is shared; everything else is closed: a user
namespace with no capabilities (and no nested user namespaces), its own pid, ipc and uts namespaces, read-only
/usr, a few /etc files (TLS roots, name resolution, the dynamic linker's cache), the interpreter and the installer
binary read-only, a private /tmp holding an empty home, and writable only the folders the caller names (the set's
temporary target and the installer's cache). No home folder, no data folder. The environment is built from
scratch: nothing the server holds (API keys, tokens) reaches the sandbox, and a name that looks secret is dropped
even if a caller passes it.

When bubblewrap is not usable, commands run unsandboxed only if the operator opted in (`unsafe_no_sandbox`).
This module knows bubblewrap and processes; nothing of packages, indexes or the cache. It imports nothing from
the local backend: the two sandboxes have different purposes (this one has the network and no user code).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteReceiveStream, Process

from ..backends.local.sandbox.bubblewrap import ancestors, system_binds
from ..backends.local.sandbox.bubblewrap import find_bwrap as find_bwrap  # the one lookup of bubblewrap, shared

logger = logging.getLogger(__name__)

# Variable names that carry secrets never enter the sandbox, whatever their prefix.
SECRET_NAME_RE = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE", re.IGNORECASE)
SANDBOX_HOME = "/tmp/home"
OUTPUT_CAP = 256 * 1024

_ETC_FILES = (
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "pki",
    "resolv.conf",
    "hosts",
    "nsswitch.conf",
    "gai.conf",
    "host.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "alternatives",
)


@dataclass(frozen=True)
class Bwrap:
    path: str
    has_perms: bool
    has_disable_userns: bool


@dataclass
class Mounts:
    """What one command sees besides the system: host paths bound at the same path unless said otherwise."""

    writable: list[str] = field(default_factory=list)
    readonly: list[tuple[str, str]] = field(default_factory=list)  # (host path, path inside)
    chdir: str = "/tmp"


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


Line = Callable[[str], Awaitable[None]]


@functools.cache
def probe_bwrap(path: str) -> Bwrap | str:
    """The bubblewrap at `path` with the optional flags it knows, if it can build the installer sandbox here;
    else why not (blocking, about 20 ms; the answer is kept for the process's life)."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    try:
        text = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10, env=env)
        helptext = text.stdout + text.stderr
        info = Bwrap(path, "--perms" in helptext, "--disable-userns" in helptext)
        with tempfile.TemporaryDirectory(prefix="ci-installer-probe-") as tmp:
            argv = installer_argv(info, Mounts(writable=[tmp], chdir=tmp), ["/bin/sh", "-c", f": > {tmp}/ok"])
            done = subprocess.run(argv, capture_output=True, text=True, timeout=20, env=env)
            if done.returncode != 0 or not os.path.exists(os.path.join(tmp, "ok")):
                return (done.stderr or done.stdout or f"exit status {done.returncode}").strip()[:500]
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return info


@functools.cache
def python_paths() -> list[str]:
    """Host folders the server's interpreter needs, bound read-only at the same paths (a venv's pyvenv.cfg and
    its interpreter's RPATH hold absolute paths)."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    candidates.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    paths = {v for c in candidates for v in (os.path.abspath(c), os.path.realpath(c)) if os.path.isdir(v)}
    chosen: list[str] = []
    for p in sorted(paths, key=len):
        if p in ("/", "/usr") or p.startswith("/usr/"):
            continue
        if not any(p == c or p.startswith(c.rstrip("/") + "/") for c in chosen):
            chosen.append(p)
    return chosen


def installer_argv(
    info: Bwrap,
    mounts: Mounts,
    command: list[str],
    extra_readonly: Sequence[str] = (),
    status_fd: int | None = None,
) -> list[str]:
    """The whole bwrap command line for one installer command."""

    def dir_(path: str, mode: str) -> list[str]:
        return (["--perms", mode] if info.has_perms else []) + ["--dir", path]

    argv = [info.path, "--unshare-user"]
    if info.has_disable_userns:
        argv.append("--disable-userns")
    argv += ["--uid", str(os.getuid()), "--gid", str(os.getgid())]
    # The network stays shared: the installer's one job is to reach the index.
    argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    argv += ["--die-with-parent", "--new-session", "--hostname", "installer", "--cap-drop", "ALL"]
    argv += system_binds()
    argv += dir_("/etc", "0755")
    bound_dirs: list[str] = []
    for name in _ETC_FILES:
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        bound_dirs.append(f"/etc/{name}")
    argv += ["--dev", "/dev", "--proc", "/proc"]
    # The private /tmp comes before anything bound beneath it (the sandbox's home, a test's folders).
    argv += (["--perms", "1777"] if info.has_perms else []) + ["--tmpfs", "/tmp"]
    argv += dir_(SANDBOX_HOME, "0700")
    created = {"/", "/usr", "/etc", "/tmp", SANDBOX_HOME, "/dev", "/proc"}

    def bind(flag: str, host: str, inside: str) -> None:
        nonlocal argv
        for anc in ancestors(inside):
            if anc not in created and not any(anc == c or anc.startswith(c + "/") for c in bound_dirs):
                # Traverse-only, even for its owner (the sandbox has no capabilities): what is bound below is
                # reachable, nothing can be listed or created there, also under the writable private /tmp.
                argv += dir_(anc, "0111")
                created.add(anc)
        argv += [flag, host, inside]
        if os.path.isdir(host):
            bound_dirs.append(inside.rstrip("/"))

    for path in python_paths():
        bind("--ro-bind", path, path)
    for path in extra_readonly:
        if not any(path.startswith(d + "/") for d in bound_dirs):
            bind("--ro-bind", path, path)
    for host, inside in sorted(mounts.readonly, key=lambda hi: len(hi[1])):
        bind("--ro-bind", host, inside)
    for path in mounts.writable:
        bind("--bind", path, path)
    argv += ["--remount-ro", "/", "--chdir", mounts.chdir]
    if status_fd is not None:
        argv += ["--json-status-fd", str(status_fd)]
    argv += ["--", *command]
    return argv


def installer_env(extra: Mapping[str, str], tool_dirs: list[str], home: str = SANDBOX_HOME) -> dict[str, str]:
    """The command's whole environment: a fixed base, the index/cache variables given, no secrets."""
    path = ":".join(dict.fromkeys([*tool_dirs, "/usr/local/bin", "/usr/bin", "/bin"]))
    env = {"PATH": path, "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8", "USER": "installer"}
    env.update(extra)
    return {k: v for k, v in env.items() if not SECRET_NAME_RE.search(k) and not k.startswith("OPENAI")}


async def run_sandboxed(
    info: Bwrap,
    mounts: Mounts,
    command: list[str],
    env: Mapping[str, str],
    extra_readonly: Sequence[str] = (),
    on_stderr_line: Line | None = None,
) -> Completed:
    """Run `command` in the installer sandbox (see `run_command`). bwrap reports the host pid of the sandbox's
    init on a status pipe: killing it ends every process of the sandbox, and the kill waits until they are gone."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    argv = installer_argv(info, mounts, command, extra_readonly, status_fd=write_fd)
    # run_command owns both ends from here on (closing an fd twice could close another run's reused number).
    return await run_command(argv, env, on_stderr_line=on_stderr_line, status_pipe=(read_fd, write_fd))


async def run_command(
    argv: list[str],
    env: Mapping[str, str],
    *,
    cwd: str | None = None,
    on_stderr_line: Line | None = None,
    status_pipe: tuple[int, int] | None = None,
) -> Completed:
    """Run one command to its end; stderr is passed on line by line as it comes. Cancellation (a timeout, the
    caller going away) kills the command's whole process group before the cancellation goes on."""
    try:
        process = await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            pass_fds=(status_pipe[1],) if status_pipe else (),
            # Whatever the server's umask, a set's files must be readable by the run sandbox's own uid.
            umask=0o022,
        )
    except BaseException:
        if status_pipe is not None:
            os.close(status_pipe[0])
        raise
    finally:
        if status_pipe is not None:
            os.close(status_pipe[1])  # the child holds it now: EOF comes when bwrap is done
    try:
        return await _supervise(process, on_stderr_line, status_pipe[0] if status_pipe else None)
    finally:
        if status_pipe is not None:
            os.close(status_pipe[0])


async def _supervise(process: Process, on_stderr_line: Line | None, status_fd: int | None) -> Completed:
    sandbox_pid: list[int] = []
    out: list[bytes] = []
    err: list[bytes] = []
    try:
        async with anyio.create_task_group() as tg:
            assert process.stdout is not None and process.stderr is not None
            tg.start_soon(_drain, process.stdout, out, None)
            tg.start_soon(_drain, process.stderr, err, on_stderr_line)
            if status_fd is not None:
                tg.start_soon(_read_status, status_fd, sandbox_pid)
        returncode = await process.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            # The sandbox's init first, while bwrap (its parent, which reaps it) still holds its pid.
            for pid in sandbox_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _kill_group(process)
            for pid in sandbox_pid:
                await _wait_gone(pid)
            await process.aclose()
        raise
    await process.aclose()
    return Completed(returncode, b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace"))


async def _read_status(fd: int, sandbox_pid: list[int]) -> None:
    os.set_blocking(fd, False)
    buf = b""
    while True:
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not chunk:
            return
        buf = (buf + chunk)[-8192:]
        if not sandbox_pid:
            found = re.search(rb'"child-pid"\s*:\s*(\d+)', buf)
            if found:
                sandbox_pid.append(int(found.group(1)))


async def _wait_gone(pid: int, limit_s: float = 5.0) -> None:
    # The sandbox's init: when it dies the kernel kills the rest of its pid namespace and reaps it before the
    # init itself turns into a zombie, so "zombie or gone" means the whole sandbox is gone.
    with anyio.move_on_after(limit_s):
        while _alive(pid):  # noqa: ASYNC110 (no event tells a process in another pid namespace is gone)
            await anyio.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


async def _drain(stream: ByteReceiveStream, sink: list[bytes], on_line: Line | None) -> None:
    size = 0
    pending = b""
    async for chunk in stream:
        if size < OUTPUT_CAP:
            sink.append(chunk[: OUTPUT_CAP - size])
            size += len(chunk)
        if on_line is not None:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                await on_line(line.decode(errors="replace"))
            pending = pending[-OUTPUT_CAP:]


def _kill_group(process: Process) -> None:
    # bwrap started its own session (start_new_session) and dies with its parent's death signal chain: killing
    # the group reaches bwrap and, unsandboxed, every child of the installer (build backends included).
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.kill()
    except ProcessLookupError:
        pass
