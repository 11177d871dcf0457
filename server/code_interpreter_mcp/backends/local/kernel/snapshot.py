"""The session's namespace, saved after runs and loaded into a new worker: runs inside the sandbox, stdlib + dill.

Saving is off the run's path. After a run's answer is sent the worker forks; the child (idle CPU priority, first
to go when memory runs out) pickles each user name on its own with dill (protocol 5, large buffers out of band, so
a DataFrame's arrays are never copied), hashes it, and streams it to the host over a socket pair of its own whose
other end the worker hands the host over its control socket (SCM_RIGHTS). The host asks for the bytes of a name
only when its digest changed, and writes the files: no path of a snapshot is ever visible in the sandbox. One
child at a time: a snapshot due while one is being written waits for it (like Redis's background save), so a burst
of quick runs costs one more snapshot, not one each, and a big namespace's snapshot is never starved.

Modules are kept by name. Classes and functions bound to one name and used by another's value are pickled as
references to that name, so `isinstance(obj, Cls)` still holds after a restore. Loading is restore.py's.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
import types

# socket, select and hashlib are imported when first needed: a worker's start-up is on the path of every new
# container, and a worker that never saves anything must not pay for them.

QUIET_S = 0.01  # a snapshot starts once the session sent no request for this long
MAX_DEFER_S = 2.0  # ... or once it has waited this long, however busy the session is
CHILD_TIMEOUT_S = 600  # a child stuck (e.g. on a lock a thread held at fork) is killed by its own alarm
_SKIP = ("_", "__builtins__", "__name__", "__doc__", "__package__", "__loader__", "__spec__")


class _OverCap(Exception):
    pass


class _CapWriter(io.RawIOBase):
    """A pickle's in-band bytes, refused past the cap (so a huge value never fills the child's memory)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parts: list[bytes] = []
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        data = bytes(b)  # type: ignore[call-overload]
        self.size += len(data)
        if self.size > self.cap:
            raise _OverCap
        self.parts.append(data)
        return len(data)


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def over_cap_note(name: str, size: int, max_bytes: int) -> str:
    """The warning for a name left out of snapshots (the worker says it for sizes plain from the value, the host
    for those only the pickling found out)."""
    return f"not kept across restarts: {name} ({human(size)}; SNAPSHOT_MAX_MB is {max_bytes // 2**20})"


def human(n: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _estimate(value: object) -> int:
    """A cheap lower bound of a value's pickled size: arrays, frames, bytes, strings; 0 when unknown."""
    try:
        if isinstance(value, (bytes, bytearray, str)):
            return len(value)
        nbytes = getattr(type(value), "nbytes", None)
        if nbytes is not None and type(value).__module__.split(".")[0] == "numpy":
            return int(value.nbytes)  # type: ignore[attr-defined]
        if type(value).__module__.split(".")[0] == "pandas" and hasattr(value, "memory_usage"):
            usage = value.memory_usage(index=True, deep=False)  # type: ignore[attr-defined]
            return int(usage.sum()) if hasattr(usage, "sum") else int(usage)
    except Exception:
        return 0
    return 0


class Snapshots:
    """The worker's side of snapshots: when to save, the saving child, and loading."""

    def __init__(
        self, runner: object, hidden: set[str], ctl_fd: int | None, max_bytes: int, protocol: types.ModuleType
    ) -> None:
        self.encode = protocol.encode  # the worker's frames (protocol.py): the host reads the stream's the same way
        self.ns: dict[str, object] = runner.ns  # type: ignore[attr-defined]
        self.hidden = hidden
        self.ctl_fd = ctl_fd
        self._ctl: object = None
        self.max_bytes = max_bytes
        self.dirty = False
        self.dirty_since = 0.0
        self.child: int | None = None
        self.child_fd: int | None = None  # its pidfd: readable once it exited
        self.run = 0
        self.known: dict[str, int] = {}  # name -> id(value) after the last run: rebound names are estimated
        self.warned: set[str] = set()
        self.pids: set[int] = set()  # children of ours, which the zombie reaper must leave alone
        self.saved = False  # a snapshot was started (or restored): an empty namespace must then be saved too

    @property
    def enabled(self) -> bool:
        return self.ctl_fd is not None

    @property
    def ctl(self):
        if self._ctl is None and self.ctl_fd is not None:
            import socket

            self._ctl = socket.socket(fileno=self.ctl_fd)
        return self._ctl

    def names(self) -> list[str]:
        return [n for n in self.ns if n not in self.hidden and n not in _SKIP and not n.startswith("__")]

    # ---- after a run (parent) -----------------------------------------------------------------------------

    def over_cap_warnings(self) -> list[str]:
        """Warnings for names rebound by the run that alone exceed the cap (estimated, so said in the same run's
        result; the child's exact sizes catch the rest and the host says those with the next result)."""
        if not self.enabled:
            return []
        out = []
        known, self.known = self.known, {}
        for name in self.names():
            value = self.ns[name]
            self.known[name] = id(value)
            if known.get(name) == id(value) or name in self.warned:
                continue
            size = _estimate(value)
            if size > self.max_bytes:
                self.warned.add(name)
                out.append(over_cap_note(name, size, self.max_bytes))
        return out

    def ran(self, run: int) -> None:
        """A run ended (its answer was sent): the namespace is saved once the session pauses (`idle`)."""
        if not self.enabled:
            return
        self.run = run
        if not self.saved and not self.known:  # over_cap_warnings listed this run's names just before
            return  # nothing was ever kept, nothing to keep: no snapshot at all
        if not self.dirty:
            self.dirty_since = time.monotonic()
        self.dirty = True

    def pending(self) -> bool:
        return self.dirty

    def idle(self, req_fd: int) -> None:
        """`_idle`, which never raises: a snapshot that cannot start (no fd left, no memory) is skipped until the
        next run, and the worker goes on serving."""
        try:
            self._idle(req_fd)
        except Exception:
            self.dirty = False

    def _idle(self, req_fd: int) -> None:
        """Between runs, while a snapshot is due: return as soon as a request arrives; start the snapshot once
        no request came for `QUIET_S` (or it has waited `MAX_DEFER_S`) and no child is still writing the last
        one. A burst of quick runs thus forks once, after it, and runs never share the CPU or pay copy-on-write
        faults for a child they did not need."""
        import select

        while self.dirty:
            self._reap()
            if self.child is not None and self.child_fd is not None:
                ready, _, _ = select.select([req_fd, self.child_fd], [], [])
                if req_fd in ready:
                    return
                continue
            wait = min(QUIET_S, max(0.0, self.dirty_since + MAX_DEFER_S - time.monotonic()))
            ready, _, _ = select.select([req_fd], [], [], wait)
            if ready:
                return
            self._start()

    def flush(self, within: float) -> dict[str, object]:
        """Save now what is due and wait until it is written (the host is about to stop this worker: an eviction,
        a shutdown), at most `within` seconds. Never raises."""
        import select

        deadline = time.monotonic() + within
        try:
            while time.monotonic() < deadline:
                self._reap()
                if self.child is not None and self.child_fd is not None:
                    select.select([self.child_fd], [], [], max(deadline - time.monotonic(), 0))
                    continue
                if not self.dirty:
                    break
                self._start()
                if self.child is None:
                    break
        except Exception:
            pass
        return {"op": "flushed", "saved": self.child is None and not self.dirty}

    def reap(self) -> None:
        """The child that wrote the last snapshot, reaped if it exited (one waitpid)."""
        self._reap()

    def _reap(self) -> None:
        if self.child is None:
            return
        try:
            pid, _status = os.waitpid(self.child, os.WNOHANG)
        except ChildProcessError:
            pid = self.child
        if pid == 0:
            return
        self.pids.discard(self.child)
        self.child = None
        if self.child_fd is not None:
            os.close(self.child_fd)
            self.child_fd = None

    def _start(self) -> None:
        assert self.ctl is not None
        self.dirty = False  # whatever happens below, the next try is after the next run
        try:
            import dill  # noqa: F401  (once, in the parent: every child then has it)
        except ImportError:
            self.ctl_fd = None  # the server checks for dill before turning snapshots on; never retried
            return
        import socket

        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            return  # out of fds: the next run tries again
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return
        if pid == 0:
            theirs.close()
            code = 1
            try:
                self._child(ours)
                code = 0
            except BaseException:
                pass
            os._exit(code)
        ours.close()
        self.saved = True
        self.child = pid
        self.pids.add(pid)
        try:
            self.child_fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.child_fd = None
        try:
            socket.send_fds(self.ctl, [json.dumps({"op": "snapshot", "run": self.run}).encode()], [theirs.fileno()])
        except OSError:
            os.kill(pid, signal.SIGKILL)  # the host is not listening: nobody would read it
        finally:
            theirs.close()

    # ---- the child ----------------------------------------------------------------------------------------

    def _child(self, sock: object) -> None:
        import hashlib

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.SIG_IGN)
        signal.alarm(CHILD_TIMEOUT_S)
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):
            os.nice(19)
        try:
            with open("/proc/self/oom_score_adj", "w") as fh:
                fh.write("1000")
        except OSError:
            pass
        os.dup2(os.open(os.devnull, os.O_RDWR), 1)  # nothing the pickling prints reaches a run's capture
        os.dup2(1, 2)
        import dill

        names = self.names()
        tops = {id(self.ns[n]): n for n in names if isinstance(self.ns[n], (type, types.FunctionType))}
        ns = self.ns

        class Pickler(dill.Pickler):  # type: ignore[misc, name-defined]
            # dill's own rule pickles a plain ndarray through __reduce__, in band (a full copy); without it
            # numpy's protocol-5 reduction hands the array's memory out of band, never copied.
            dispatch = _dispatch_without_ndarray(dill)
            current = ""

            def persistent_id(self, obj: object) -> object:
                if isinstance(obj, (type, types.FunctionType)):
                    name = tops.get(id(obj))
                    if name is not None and name != self.current and ns.get(name) is obj:
                        return name
                return None

        parts: list[dict[str, object]] = []
        skipped: list[dict[str, str]] = []
        bodies: dict[str, tuple[list[bytes], list[memoryview]]] = {}
        for name in names:
            value = ns[name]
            if isinstance(value, types.ModuleType):
                parts.append({"name": name, "kind": "module", "module": value.__name__})
                continue
            writer = _CapWriter(self.max_bytes)
            buffers: list[memoryview] = []
            size = [0]

            def keep(buf: object, buffers: list[memoryview] = buffers, size: list[int] = size) -> None:
                view = buf.raw()  # type: ignore[attr-defined]
                size[0] += view.nbytes
                if size[0] > self.max_bytes:
                    raise _OverCap
                buffers.append(view)

            pickler = Pickler(writer, protocol=5, buffer_callback=keep)
            pickler.current = name
            try:
                pickler.dump(value)
            except _OverCap:
                parts.append({"name": name, "kind": "over", "bytes": max(writer.size + size[0], self.max_bytes + 1)})
                continue
            except BaseException as exc:
                skipped.append({"name": name, "reason": _reason(exc)})
                continue
            digest = hashlib.sha256()
            for chunk in writer.parts:
                digest.update(chunk)
            for view in buffers:
                digest.update(view)
            parts.append(
                {
                    "name": name,
                    "kind": "value",
                    "digest": digest.hexdigest(),
                    "pickle": writer.size,
                    "buffers": [v.nbytes for v in buffers],
                    "bytes": writer.size + sum(v.nbytes for v in buffers),
                }
            )
            bodies[name] = (writer.parts, buffers)
        # Over the cap all together: the biggest names go first.
        over = [p for p in parts if p["kind"] == "over"]
        kept = [p for p in parts if p["kind"] != "over"]
        total = sum(int(p.get("bytes", 0)) for p in kept)  # type: ignore[call-overload]
        for p in sorted(kept, key=lambda p: -int(p.get("bytes", 0))):  # type: ignore[call-overload]
            if total <= self.max_bytes:
                break
            if p["kind"] == "value":
                total -= int(p["bytes"])  # type: ignore[call-overload]
                over.append(p)
        over_names = {p["name"] for p in over}
        kept = [p for p in kept if p["name"] not in over_names]

        send = sock.sendall  # type: ignore[attr-defined]
        version = ".".join(map(str, sys.version_info[:3]))
        send(self.encode({"op": "begin", "run": self.run, "python": version, "dill": dill.__version__}))
        for p in kept:
            send(self.encode({"op": "part", **p}))
            if p["kind"] != "value":
                continue
            answer = sock.recv(1)  # type: ignore[attr-defined]
            if answer == b"1":
                chunks, buffers = bodies[p["name"]]  # type: ignore[index]
                for chunk in chunks:
                    send(chunk)
                for view in buffers:
                    send(view)
            elif answer != b"0":
                return  # the host hung up
        over_list = [
            {"name": p["name"], "bytes": int(p["bytes"]), "warned": p["name"] in self.warned}  # type: ignore[call-overload]
            for p in over
        ]
        send(self.encode({"op": "end", "skipped": skipped, "over": over_list}))
        sock.recv(1)  # type: ignore[attr-defined]  # the host's ack: it has everything

    # ---- loading into a new worker (parent, before any run) ------------------------------------------------

    def restored(self) -> None:
        """A new worker loaded the last snapshot: later runs compare with what it loaded."""
        self.known = {n: id(self.ns[n]) for n in self.names()}
        self.saved = True


def _dispatch_without_ndarray(dill: types.ModuleType) -> dict[type, object]:
    table = type(dill.Pickler.dispatch)(dill.Pickler.dispatch)  # its class answers metaclasses too
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        table.pop(numpy.ndarray, None)
    return table  # type: ignore[no-any-return]
