"""The host end of one worker: start it through a launcher, exchange protocol frames with it, interrupt it, kill it,
and read what its last run printed.

I/O is non-blocking on the event loop (`anyio.wait_readable` on the pipe fds): a thread hop per call would cost more
than the whole round trip. Where and how the worker's process runs is the launcher's (launcher.py); which worker
belongs to which container, and when one is replaced, is the pool's (pool.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ..kernel import protocol
from ..sandbox.launcher import LaunchedWorker, Launcher, LaunchFailed, LaunchSpec, WorkerFds

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
class Printed:
    """What a run printed, clipped to the output cap."""

    stdout: str = ""
    stderr: str = ""
    truncated: bool = False


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


def _close_all(fds: tuple[int | None, ...] | list[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class WorkerProcess:
    """One running worker. Not safe for concurrent requests: the backend holds a lock per container."""

    def __init__(
        self, process: LaunchedWorker, req_w: int, resp_r: int, out_fd: int, err_fd: int, log_path: Path
    ) -> None:
        self.process = process
        self.req_w = req_w
        self.resp_r = resp_r
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.log_path = log_path
        self.decoder = protocol.FrameDecoder(MAX_RESPONSE_BYTES)
        self.ready: dict[str, Any] = {}
        self._next_id = 0
        self._closed = False
        self.dead = False
        self.ctl: socket.socket | None = None  # the control socket (snapshots), when they are on
        self.fresh = True  # nothing has run in it yet: the session's snapshot is loaded before its first run

    @property
    def sandboxed(self) -> bool:
        return self.process.sandboxed

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def worker_pid(self) -> int | None:
        return self.process.worker_pid

    # ---- spawning

    @classmethod
    async def spawn(cls, launcher: Launcher, spec: LaunchSpec, ready_timeout: float = 30.0) -> WorkerProcess:
        out_fd, err_fd, log_fd = await anyio.to_thread.run_sync(_prepare_files, spec.root)
        req_r, req_w = os.pipe2(os.O_CLOEXEC)
        resp_r, resp_w = os.pipe2(os.O_CLOEXEC)
        ctl: socket.socket | None = None
        ctl_theirs: socket.socket | None = None
        if spec.snapshot_max_bytes > 0:
            # Message boundaries kept, and fds pass both ways: snapshot streams out, part files in (snapshots.py).
            ctl, ctl_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = WorkerFds(req_r, resp_w, out_fd, err_fd, ctl_theirs.fileno() if ctl_theirs is not None else None)
        try:
            process = await launcher.launch(spec, fds, log_fd)
        except BaseException:
            _close_all((req_r, resp_w, out_fd, err_fd, req_w, resp_r, log_fd))
            for sock in (ctl, ctl_theirs):
                if sock is not None:
                    sock.close()
            raise
        _close_all((req_r, resp_w, log_fd))
        if ctl_theirs is not None:
            ctl_theirs.close()
        if ctl is not None:
            ctl.setblocking(False)
        os.set_blocking(req_w, False)
        os.set_blocking(resp_r, False)
        proc = cls(process, req_w, resp_r, out_fd, err_fd, spec.root / "worker.log")
        proc.ctl = ctl
        try:
            with anyio.fail_after(ready_timeout):
                ready = await proc.receive()
            if ready.get("op") != "ready":
                raise WorkerGone(f"unexpected first frame {ready.get('op')!r}")
            proc.ready = ready
            await process.post_launch()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if isinstance(exc, WorkerGone) and exc.eof:
                    await proc.wait(1.0)  # bwrap or Python failed by itself: keep its own exit status
                await proc.kill()
                log = await anyio.to_thread.run_sync(_read_log, proc.log_path)
            if isinstance(exc, WorkerGone | LaunchFailed | TimeoutError):
                reason = process.exit_reason() if proc.returncode is not None else str(exc)
                raise WorkerStartError(f"{reason}. {log}".strip()) from None
            raise
        return proc

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
        self.process.send_signal(signal.SIGINT)

    async def kill(self, close: bool = True) -> None:
        """Kill the worker with everything it started, and reap it. With close=False the host's fds stay open (to
        read what a dead run printed); call close() after."""
        await self.process.kill()
        self.dead = True
        if close:
            self.close()

    async def wait(self, within: float) -> int | None:
        """Reap the worker's process, waiting up to `within` seconds."""
        return await self.process.wait(within)

    def alive(self) -> bool:
        if self.dead:
            return False
        if self.process.poll() is not None:
            self.dead = True
        return not self.dead

    def exit_reason(self) -> str:
        return self.process.exit_reason()

    def read_output(self, cap: int) -> Printed:
        """What the last run printed, read from the host's own fds of the capture files (blocking)."""
        try:
            out_size = os.fstat(self.out_fd).st_size
            err_size = os.fstat(self.err_fd).st_size
            ob, eb = protocol.split_budget(cap, out_size, err_size)
            out, t1, _ = protocol.clip_capture(self.out_fd, ob, out_size)
            err, t2, _ = protocol.clip_capture(self.err_fd, eb, err_size)
        except OSError:
            return Printed()
        return Printed(out, err, t1 or t2)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _close_all((self.req_w, self.resp_r, self.out_fd, self.err_fd))
        ctl, self.ctl = self.ctl, None
        if ctl is not None:
            with contextlib.suppress(RuntimeError):
                anyio.notify_closing(ctl)  # its listener (snapshots.py) wakes up and ends
            ctl.close()
        self.process.close()
