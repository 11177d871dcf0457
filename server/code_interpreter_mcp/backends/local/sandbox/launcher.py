"""Where a worker runs: the seam between the layers that drive workers and the process that hosts one.

Modelled on `subprocess.Popen` and jupyter_client's kernel provisioners: a `Launcher` starts one worker from a
`LaunchSpec` (host paths, uid, limits) and the fds the host talks to it over, and hands back a `LaunchedWorker`
that the layers above drive with post_launch / poll / wait / send_signal / kill / close. Bubblewrap
(bubblewrap.py) and the operator's unsafe no-sandbox mode (unsandboxed.py) implement it, both on `PopenWorker`; a
worker that runs elsewhere is one more module and one entry in pool.py's registry of launchers.

Nothing here speaks the worker protocol (process.py does), knows containers, or chooses the isolation (probe.py).
Signals go through pidfds, so a recycled pid can never be hit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio


class LaunchFailed(Exception):
    """The process came up but the worker in it cannot be driven (its pids cannot be learnt)."""


@dataclass(frozen=True)
class WorkerFds:
    """The host-made fds a worker inherits (same numbers inside a sandbox): its request and answer pipes, and the
    capture files its fd 1/2 point at during a run."""

    req_r: int
    resp_w: int
    out_fd: int
    err_fd: int
    ctl: int | None = None  # the worker's end of its control socket (snapshots), when snapshots are on

    def all(self) -> list[int]:
        fds = [self.req_r, self.resp_w, self.out_fd, self.err_fd]
        return fds if self.ctl is None else [*fds, self.ctl]


@dataclass(frozen=True)
class LaunchSpec:
    """What one worker is started from, in host terms."""

    root: Path  # the container's folder: start-up log, passwd/group, scratch space in unsafe mode
    data: Path  # its data folder, the worker's working directory
    uid: int | None  # the dedicated uid/gid to drop to, None for the server's own
    gid: int | None
    limits: dict[str, Any]  # rlimits, applied by the worker itself before any user code runs
    tmp_bytes: int  # size of the sandbox's private /tmp
    mpl_cache: Path | None  # the prebuilt matplotlib font list (fonts.py)
    packages: Path | None = None  # the folder of installed package sets, readable (never writable) by the worker
    threads: int = 1  # BLAS/OpenMP threads (the CPUs the sandbox may use)
    snapshot_max_bytes: int = 0  # the cap of a namespace snapshot; 0: snapshots off (no control socket)


def worker_config(
    spec: LaunchSpec,
    fds: WorkerFds,
    *,
    workdir: str,
    mplconfigdir: str,
    mpl_cache: str | None,
    may_kill_strays: bool,
    packages_dir: str | None = None,
) -> dict[str, Any]:
    """The worker's JSON config (argv): the paths as the worker sees them are the launcher's to say."""
    return {
        "uid": spec.uid,
        "gid": spec.gid,
        "limits": spec.limits,
        "workdir": workdir,
        "mplconfigdir": mplconfigdir,
        "mpl_cache": mpl_cache,
        "may_kill_strays": may_kill_strays,
        "packages_dir": packages_dir,
        "req_fd": fds.req_r,
        "resp_fd": fds.resp_w,
        "out_fd": fds.out_fd,
        "err_fd": fds.err_fd,
        "ctl_fd": fds.ctl,
        "snapshot_max_bytes": spec.snapshot_max_bytes,
    }


class LaunchedWorker(ABC):
    """One started worker, as the layers above see the process hosting it."""

    sandboxed: bool
    returncode: int | None
    worker_pid: int | None  # the worker's own pid on this host, once post_launch learnt it

    @abstractmethod
    async def post_launch(self) -> None:
        """Called once the worker answered "ready": learn what to signal. Raises to fail the start."""

    @abstractmethod
    def poll(self) -> int | None:
        """The exit status if the process hosting the worker ended, else None (never blocks)."""

    @abstractmethod
    async def wait(self, within: float) -> int | None:
        """Reap it, waiting up to `within` seconds; None when it is still there."""

    @abstractmethod
    def send_signal(self, sig: int) -> None:
        """A signal to the worker's own process (SIGINT: interrupt the running cell)."""

    @abstractmethod
    async def kill(self) -> None:
        """Kill the worker and everything it started, and reap it."""

    @abstractmethod
    def exit_reason(self) -> str:
        """A human reason for how it ended."""

    @abstractmethod
    def pids(self) -> dict[str, int]:
        """Host pids by role ("worker", and e.g. "bwrap", "init"), for benchmarks and tests."""

    @abstractmethod
    def close(self) -> None:
        """Release what the host holds for it (pidfds, pipes). Idempotent."""


class Launcher(Protocol):
    sandboxed: bool

    async def launch(self, spec: LaunchSpec, fds: WorkerFds, log_fd: int) -> LaunchedWorker:
        """Start one worker whose stderr goes to `log_fd`. On failure it raises and leaves none of its own fds
        open; the caller owns `fds` and `log_fd`."""
        ...


def pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def signal_pid(pidfd: int | None, pid: int | None, sig: int) -> None:
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        elif pid is not None:
            os.kill(pid, sig)
    except (ProcessLookupError, OSError):
        pass


def popen(argv: list[str], env: dict[str, str], cwd: str, log_fd: int, fds: list[int]) -> subprocess.Popen[bytes]:
    # Deliberately on the event-loop thread: bwrap's --die-with-parent (PR_SET_PDEATHSIG) fires when the *thread*
    # that forked it exits, and anyio's worker threads exit when idle. vfork+exec, ~0.3 ms. A new session keeps a
    # terminal's Ctrl-C (sent to the server's process group) away from the workers.
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log_fd,
        env=env,
        cwd=cwd,
        pass_fds=fds,
        close_fds=True,
        start_new_session=True,
    )


class PopenWorker(LaunchedWorker):
    """A worker hosted by a child process of this server (bwrap, or the bare interpreter)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.popen = process
        self.returncode = None
        self.worker_pid = None
        self._worker_pidfd: int | None = None
        self._popen_pidfd = pidfd(process.pid)
        self._closed = False

    @abstractmethod
    def _kill_tree(self) -> None:
        """SIGKILL whatever takes the worker and its descendants with it."""

    def _signal_of(self, returncode: int) -> int | None:
        """The signal that ended it, read from its exit status."""
        return -returncode if returncode < 0 else None

    def poll(self) -> int | None:
        rc = self.popen.poll()
        if rc is not None:
            self.returncode = rc
        return rc

    async def wait(self, within: float) -> int | None:
        if self.returncode is not None:
            return self.returncode
        with anyio.move_on_after(within):
            while True:
                rc = self.popen.poll()
                if rc is not None:
                    self.returncode = rc
                    break
                if self._popen_pidfd is not None:
                    with anyio.move_on_after(0.5):
                        await anyio.wait_readable(self._popen_pidfd)
                else:
                    await anyio.sleep(0.005)
        if self.returncode is None:
            # Last resort so nothing is left as a zombie: block in a thread.
            try:
                self.returncode = await anyio.to_thread.run_sync(self.popen.wait, within)
            except subprocess.TimeoutExpired:
                return None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        signal_pid(self._worker_pidfd, self.worker_pid, sig)

    async def kill(self) -> None:
        self._kill_tree()
        await self.wait(5.0)
        if self.returncode is None:
            signal_pid(self._popen_pidfd, self.popen.pid, signal.SIGKILL)
            await self.wait(5.0)

    def exit_reason(self) -> str:
        returncode = self.returncode
        if returncode is None:
            return "the worker stopped responding"
        sig = self._signal_of(returncode)
        if sig is None:
            return f"the worker exited with code {returncode}"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGXCPU:
            return f"the worker used up its CPU-time budget ({name})"
        if sig == signal.SIGKILL:
            return f"the worker was killed ({name}; out of memory, or stopped by the server)"
        if sig == signal.SIGSEGV:
            return f"the worker crashed ({name}, segmentation fault)"
        return f"the worker was terminated by {name}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in self._own_fds():
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _own_fds(self) -> list[int | None]:
        return [self._worker_pidfd, self._popen_pidfd]
