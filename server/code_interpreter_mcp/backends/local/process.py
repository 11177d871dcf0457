"""The host side of one worker: spawn it (inside bwrap or bare), exchange frames, interrupt it, kill it, reap it.

I/O is non-blocking on the event loop (`anyio.wait_readable` on the pipe fds): a thread hop per call would cost more
than the whole round trip. The process is spawned from the event-loop thread on purpose: bwrap's
--die-with-parent (PR_SET_PDEATHSIG) fires when the *thread* that forked it exits, and anyio's worker threads exit
when idle. Popen of bwrap takes ~0.3 ms.

Signals go through pidfds, so a recycled pid can never be hit. The worker's pid on the host comes from bwrap's
--json-status-fd (the sandbox's pid 1) and that process's only child.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from . import protocol

logger = logging.getLogger(__name__)

# Generous: stdout+stderr+repr are capped by the worker, but the last value's JSON may be large.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class WorkerGone(Exception):
    """The worker's pipe closed (`eof`: it is dying) or it broke the protocol (it must be killed)."""

    def __init__(self, message: str, eof: bool = False) -> None:
        super().__init__(message)
        self.eof = eof


class WorkerStartError(Exception):
    """The worker did not come up; the message carries bwrap's/Python's own error text."""


@dataclass
class SpawnFds:
    """fd numbers the child inherits (same numbers inside the sandbox)."""

    req_r: int
    resp_w: int
    out_fd: int
    err_fd: int
    status_w: int | None
    seccomp_r: int | None


Builder = Callable[[SpawnFds], tuple[list[str], dict[str, str], str]]


def _capture_file(directory: Path) -> int:
    """An anonymous host file the worker's fd 1/2 point at during a run. The host keeps its own fd, so output
    written before a crash can still be read."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    try:
        return os.open(directory, flags | os.O_TMPFILE, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    # Filesystems without O_TMPFILE: create, open, unlink.
    name = directory / f".capture-{os.urandom(8).hex()}"
    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(name)
    return fd


def _prepare_files(container_dir: Path) -> tuple[int, int, int]:
    """Blocking file work of a spawn (run in a thread): two capture files and the start-up log."""
    out_fd = _capture_file(container_dir)
    err_fd = _capture_file(container_dir)
    log_fd = os.open(container_dir / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    return out_fd, err_fd, log_fd


def _read_log(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace").strip()


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


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def describe_exit(returncode: int | None, sandboxed: bool) -> str:
    """A human reason for a worker's exit status (bwrap reports a signal death as 128+signal)."""
    if returncode is None:
        return "the worker stopped responding"
    sig = None
    if returncode < 0:
        sig = -returncode
    elif sandboxed and returncode > 128:
        sig = returncode - 128
    if sig is not None:
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
    return f"the worker exited with code {returncode}"


def _popen(argv: list[str], env: dict[str, str], cwd: str, log_fd: int, fds: list[int]) -> subprocess.Popen[bytes]:
    # Deliberately on the event-loop thread (see the module docstring): vfork+exec, ~0.3 ms. A new session keeps
    # a terminal's Ctrl-C (sent to the server's process group) away from the workers.
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


class WorkerProcess:
    """One running worker. Not safe for concurrent requests: the backend holds a lock per container."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        req_w: int,
        resp_r: int,
        out_fd: int,
        err_fd: int,
        status_r: int | None,
        log_path: Path,
        sandboxed: bool,
    ) -> None:
        self.popen = popen
        self.req_w = req_w
        self.resp_r = resp_r
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.status_r = status_r
        self.log_path = log_path
        self.sandboxed = sandboxed
        self.decoder = protocol.FrameDecoder(MAX_RESPONSE_BYTES)
        self.ready: dict[str, Any] = {}
        self.init_pid: int | None = None
        self.worker_pid: int | None = None
        self._init_pidfd: int | None = None
        self._worker_pidfd: int | None = None
        self._bwrap_pidfd: int | None = _pidfd(popen.pid)
        self.returncode: int | None = None
        self.started_at = time.time()
        self._next_id = 0
        self._closed = False
        self.dead = False

    # ---- spawning

    @classmethod
    async def spawn(
        cls,
        build: Builder,
        container_dir: Path,
        sandboxed: bool,
        seccomp: bytes | None,
        ready_timeout: float = 30.0,
    ) -> WorkerProcess:
        out_fd, err_fd, log_fd = await anyio.to_thread.run_sync(_prepare_files, container_dir)
        req_r, req_w = os.pipe2(os.O_CLOEXEC)
        resp_r, resp_w = os.pipe2(os.O_CLOEXEC)
        status_r = status_w = seccomp_r = None
        if sandboxed:
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            if seccomp is not None:
                seccomp_r, seccomp_w = os.pipe2(os.O_CLOEXEC)
                protocol.write_all(seccomp_w, seccomp)  # a few hundred bytes: fits the pipe buffer
                os.close(seccomp_w)
        fds = SpawnFds(req_r, resp_w, out_fd, err_fd, status_w, seccomp_r)
        child_fds = [fd for fd in (req_r, resp_w, out_fd, err_fd, status_w, seccomp_r) if fd is not None]
        try:
            argv, env, cwd = build(fds)
            popen = _popen(argv, env, cwd, log_fd, child_fds)
        except BaseException:
            for fd in (*child_fds, req_w, resp_r, status_r, log_fd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            raise
        for fd in (req_r, resp_w, status_w, seccomp_r, log_fd):
            if fd is not None:
                os.close(fd)
        os.set_blocking(req_w, False)
        os.set_blocking(resp_r, False)
        if status_r is not None:
            os.set_blocking(status_r, False)
        proc = cls(popen, req_w, resp_r, out_fd, err_fd, status_r, container_dir / "worker.log", sandboxed)
        try:
            with anyio.fail_after(ready_timeout):
                ready = await proc.receive()
            if ready.get("op") != "ready":
                raise WorkerGone(f"unexpected first frame {ready.get('op')!r}")
            proc.ready = ready
            await proc._find_pids()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if isinstance(exc, WorkerGone) and exc.eof:
                    await proc.wait(1.0)  # bwrap or Python failed by itself: keep its own exit status
                await proc.kill()
                log = await anyio.to_thread.run_sync(_read_log, proc.log_path)
            if isinstance(exc, WorkerGone | TimeoutError):
                reason = describe_exit(proc.returncode, sandboxed) if proc.returncode is not None else str(exc)
                raise WorkerStartError(f"{reason}. {log}".strip()) from None
            raise
        return proc

    async def _find_pids(self) -> None:
        if not self.sandboxed:
            self.init_pid = self.worker_pid = self.popen.pid
            self._worker_pidfd = _pidfd(self.popen.pid)
            return
        assert self.status_r is not None
        line = b""
        with anyio.fail_after(5):
            while b"\n" not in line:
                try:
                    chunk = os.read(self.status_r, 4096)
                except BlockingIOError:
                    await anyio.wait_readable(self.status_r)
                    continue
                if not chunk:
                    raise WorkerGone("bwrap closed its status pipe")
                line += chunk
        status = json.loads(line.split(b"\n", 1)[0])
        self.init_pid = int(status["child-pid"])
        self._init_pidfd = _pidfd(self.init_pid)
        children = _child_pids(self.init_pid)
        if len(children) != 1:
            raise WorkerGone(f"expected one process under the sandbox's init, found {children}")
        self.worker_pid = children[0]
        self._worker_pidfd = _pidfd(self.worker_pid)

    # ---- frames

    async def send(self, obj: dict[str, Any]) -> int:
        self._next_id += 1
        obj["id"] = self._next_id
        data = memoryview(protocol.encode(obj))
        while data:
            try:
                n = os.write(self.req_w, data)
            except BlockingIOError:
                await anyio.wait_writable(self.req_w)
                continue
            except (BrokenPipeError, OSError) as exc:
                raise WorkerGone(f"cannot write to the worker: {exc}") from None
            data = data[n:]
        return self._next_id

    def _next_frame(self) -> dict[str, Any] | None:
        try:
            return self.decoder.next()
        except protocol.ProtocolError as exc:
            raise WorkerGone(f"the worker broke the protocol: {exc}") from None

    def _read_some(self) -> bool:
        """Feed what the pipe holds to the decoder; False when it holds nothing yet."""
        try:
            data = os.read(self.resp_r, protocol.READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise WorkerGone(f"cannot read from the worker: {exc}") from None
        if not data:
            raise WorkerGone("the worker closed its pipe", eof=True)
        try:
            self.decoder.feed(data)
        except protocol.ProtocolError as exc:
            raise WorkerGone(f"the worker broke the protocol: {exc}") from None
        return True

    @staticmethod
    def _answers(frame: dict[str, Any], rid: int) -> bool:
        """Whether the frame answers `rid`. Frames for an earlier, abandoned request (e.g. cancelled) are stale
        and skipped; anything else (a forged frame) breaks the exchange."""
        fid = frame.get("id")
        if fid == rid:
            return True
        if not (isinstance(fid, int) and 0 < fid < rid):
            raise WorkerGone("the worker sent a frame that answers no request")
        return False

    async def receive(self) -> dict[str, Any]:
        """The next frame. Cancellation-safe: partial frames stay buffered in the decoder."""
        while True:
            frame = self._next_frame()
            if frame is not None:
                return frame
            if not self._read_some():
                await anyio.wait_readable(self.resp_r)

    def poll_response(self, rid: int, spin_s: float) -> dict[str, Any] | None:
        """The answer to `rid` if it arrives within `spin_s`, busy-waiting (yielding the CPU) instead of going
        through the event loop: a short run answers in tens of microseconds, and an epoll wake-up on each side
        costs about as much again. None when it takes longer (then `response` waits the usual way); raises
        WorkerGone like `receive`."""
        deadline = time.perf_counter() + spin_s
        while True:
            frame = self._next_frame()
            if frame is not None:
                if self._answers(frame, rid):
                    return frame
                continue
            if time.perf_counter() >= deadline:
                return None
            if not self._read_some():
                os.sched_yield()

    async def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Send and wait for the matching answer (no timeout: callers wrap it)."""
        rid = await self.send(obj)
        return await self.response(rid)

    async def response(self, rid: int) -> dict[str, Any]:
        while True:
            frame = await self.receive()
            if self._answers(frame, rid):
                return frame

    # ---- signals and lifetime

    def interrupt(self) -> None:
        """SIGINT to the worker: KeyboardInterrupt in the running cell, state kept."""
        self._signal(self._worker_pidfd, self.worker_pid, signal.SIGINT)

    def _signal(self, pidfd: int | None, pid: int | None, sig: int) -> None:
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, sig)
            elif pid is not None:
                os.kill(pid, sig)
        except (ProcessLookupError, OSError):
            pass

    async def kill(self, close: bool = True) -> None:
        """SIGKILL the sandbox (its pid 1 takes the whole pid namespace with it) and reap bwrap. With
        close=False the host's fds stay open (to read what a dead run printed); call close() after."""
        if self.sandboxed and self._init_pidfd is not None:
            self._signal(self._init_pidfd, self.init_pid, signal.SIGKILL)
        if not self.sandboxed:
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                if self.popen.poll() is None:
                    os.killpg(self.popen.pid, signal.SIGKILL)
        # bwrap (outer) exits once its child died; kill it too if the sandbox's init was never identified.
        if self._init_pidfd is None:
            self._signal(self._bwrap_pidfd, self.popen.pid, signal.SIGKILL)
        await self.wait(5.0)
        if self.returncode is None:
            self._signal(self._bwrap_pidfd, self.popen.pid, signal.SIGKILL)
            await self.wait(5.0)
        self.dead = True
        if close:
            self.close()

    async def wait(self, within: float) -> int | None:
        """Reap the bwrap/worker process, waiting up to `within` seconds."""
        if self.returncode is not None:
            return self.returncode
        with anyio.move_on_after(within):
            while True:
                rc = self.popen.poll()
                if rc is not None:
                    self.returncode = rc
                    break
                if self._bwrap_pidfd is not None:
                    with anyio.move_on_after(0.5):
                        await anyio.wait_readable(self._bwrap_pidfd)
                else:
                    await anyio.sleep(0.005)
        if self.returncode is None:
            # Last resort so nothing is left as a zombie: block in a thread.
            try:
                self.returncode = await anyio.to_thread.run_sync(self.popen.wait, within)
            except subprocess.TimeoutExpired:
                return None
        return self.returncode

    def alive(self) -> bool:
        if self.dead:
            return False
        if self.popen.poll() is not None:
            self.returncode = self.popen.returncode
            self.dead = True
        return not self.dead

    def read_capture_tail(self, limit: int) -> tuple[str, str]:
        """What the dead worker's last run printed (blocking: call from a thread)."""
        out = []
        for fd in (self.out_fd, self.err_fd):
            try:
                size = os.fstat(fd).st_size
                data = os.pread(fd, min(size, limit * 4), max(0, size - limit * 4))
                out.append(data.decode("utf-8", "replace")[-limit:])
            except OSError:
                out.append("")
        return out[0], out[1]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (
            self.req_w,
            self.resp_r,
            self.status_r,
            self.out_fd,
            self.err_fd,
            self._init_pidfd,
            self._worker_pidfd,
            self._bwrap_pidfd,
        ):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def rss_bytes(self) -> dict[str, int]:
        """Resident set sizes of bwrap, the sandbox's init and the worker (for benchmarks and `describe`)."""
        out = {}
        for label, pid in (("bwrap", self.popen.pid), ("init", self.init_pid), ("worker", self.worker_pid)):
            if pid is None or (label != "worker" and pid == self.worker_pid):
                continue
            try:
                with open(f"/proc/{pid}/status") as fh:
                    for line in fh:
                        if line.startswith("VmRSS:"):
                            out[label] = int(line.split()[1]) * 1024
            except OSError:
                continue
        return out
