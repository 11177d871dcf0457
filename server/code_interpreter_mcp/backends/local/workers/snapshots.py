"""The host's side of namespace snapshots: receiving what a worker's snapshot child streams, and restoring.

Each worker has a control socket (process.py). After a run the worker hands over one end of a fresh stream socket
on it, and this module reads that stream in a thread: a header per name, the bytes only of names whose digest
changed (the child waits for the answer), then an end frame; the files go into the session's folder of the
snapshot store (storage/snapshots.py). Everything the child sends is untrusted (it is a fork of user code): sizes
and counts are capped, names only ever land in the manifest, and a stream that breaks the rules is dropped.

Restoring: the newest snapshot's manifest goes to a new worker in a "restore" request and its part files as
read-only fds over the control socket, before the session's next run. What that run's result then says about it
(`state_restored`, or `state_lost` with the reason) is `Restored`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from ....storage.snapshots import SnapshotStore, SnapshotUnreadable
from ..kernel.protocol import HEADER, HEADER_SIZE
from ..kernel.restore import MAX_FDS  # per control message, as the worker reads them
from ..kernel.snapshot import human, over_cap_note
from .containers import Container
from .process import WorkerGone, WorkerProcess

logger = logging.getLogger(__name__)

RECV_TIMEOUT_S = 60.0  # one read of a stream: its child runs at idle priority, so a busy host slows it down
MAX_FRAME = 1 << 20
MAX_PARTS = 100_000
CHUNK = 1 << 20


class StreamError(Exception):
    """A snapshot stream that ended early or broke the rules: dropped, the last snapshot stays."""


class StoreFull(StreamError):
    """No room for the snapshot under MAX_STORED_MB: dropped, and the session's next run says so."""


@dataclass
class Restored:
    """What loading a snapshot into a new worker gave."""

    info: dict[str, Any] | None = None  # the result's state_restored
    lost: str | None = None  # why nothing could be restored (the result then says state_lost)
    warnings: list[str] = field(default_factory=list)


class _Stream:
    """Buffered reads of frames and raw bytes from a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            data = self.sock.recv(CHUNK)
            if not data:
                raise StreamError("the stream ended early")
            self.buf += data

    def frame(self) -> dict[str, Any]:
        self._fill(HEADER_SIZE)
        (length,) = HEADER.unpack_from(self.buf, 0)
        if length > MAX_FRAME:
            raise StreamError("a frame over the size cap")
        self._fill(HEADER_SIZE + length)
        body = bytes(self.buf[HEADER_SIZE : HEADER_SIZE + length])
        del self.buf[: HEADER_SIZE + length]
        try:
            obj = json.loads(body)
        except ValueError:
            raise StreamError("a frame that is not JSON") from None
        if not isinstance(obj, dict):
            raise StreamError("a frame that is not an object")
        return obj

    def copy(self, fh: Any, n: int) -> None:
        head = min(n, len(self.buf))
        if head:
            fh.write(self.buf[:head])
            del self.buf[:head]
        left = n - head
        chunk = bytearray(min(CHUNK, max(left, 1)))
        view = memoryview(chunk)
        while left > 0:
            got = self.sock.recv_into(view, min(left, len(chunk)))
            if got == 0:
                raise StreamError("the stream ended inside a part")
            fh.write(view[:got])
            left -= got


def _name(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 1000:
        raise StreamError("a part without a proper name")
    return value


def _ints(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) > 100_000 or not all(isinstance(v, int) and v >= 0 for v in value):
        raise StreamError(f"bad {what}")
    return value


def _named_reasons(value: object, key: str) -> list[dict[str, Any]]:
    out = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            entry: dict[str, Any] = {"name": item["name"][:1000]}
            if key == "reason":
                entry["reason"] = str(item.get("reason", ""))[:300]
            else:
                entry["bytes"] = int(item["bytes"]) if isinstance(item.get("bytes"), int) else 0
                entry["warned"] = item.get("warned") is True  # the worker said so in the run's own result
            out.append(entry)
        if len(out) >= 10_000:
            break
    return out


class Keeper:
    """Snapshots of this backend's sessions: receiving them from workers, loading them into new ones."""

    def __init__(self, store: SnapshotStore, max_bytes: int, spawn: Any) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.spawn = spawn  # Service.spawn: runs a background task on the event loop
        # Streams being read at once (a thread each): a session that stalls its own stream holds one for at most
        # RECV_TIMEOUT_S per read, so a few such sessions cannot hold up everyone's snapshots.
        self.limiter = anyio.CapacityLimiter(32)
        self.inflight: dict[str, anyio.Event] = {}  # session id -> set when its stream is done
        self.warned: dict[str, set[str]] = {}  # session id -> names already said to be over the cap
        self.notes: dict[str, list[str]] = {}  # session id -> warnings for its next run
        self._socks: set[socket.socket] = set()
        self.find: Any = None  # WorkerProcess -> its Container or None (the backend's registry)

    # ---- receiving -----------------------------------------------------------------------------------------

    def listen(self, worker: WorkerProcess) -> None:
        """Serve a new worker's control socket until it closes."""
        if worker.ctl is not None:
            self.spawn("snapshot-control", lambda: self._listen(worker))

    async def _listen(self, worker: WorkerProcess) -> None:
        ctl = worker.ctl
        while ctl is not None and ctl.fileno() >= 0:
            try:
                await anyio.wait_readable(ctl)
                msg, fds, _flags, _addr = socket.recv_fds(ctl, 4096, 4)
            except BlockingIOError:
                continue
            except (OSError, anyio.ClosedResourceError):
                return
            if not msg and not fds:
                return
            c = self.find(worker) if self.find is not None else None
            if c is None or c.session_id is None or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            await self._receive(c, fds[0])

    async def _receive(self, c: Container, fd: int) -> None:
        session_id, key = str(c.session_id), str(c.owner_key)
        try:
            sock = socket.socket(fileno=fd)  # what user code sent on the socket need not be a socket at all
        except OSError:
            os.close(fd)
            return
        done = anyio.Event()
        self.inflight[session_id] = done
        self._socks.add(sock)
        try:
            over = await anyio.to_thread.run_sync(self._receive_sync, sock, key, session_id, limiter=self.limiter)
        except StoreFull:
            self.notes.setdefault(session_id, []).append(
                "variables not saved for restarts: the server's store of files and snapshots is full (MAX_STORED_MB)"
            )
            over = None
        except (StreamError, OSError) as exc:
            logger.debug("snapshot of session %s dropped: %s", session_id, exc)
            over = None
        finally:
            self._socks.discard(sock)
            sock.close()
            done.set()
            if self.inflight.get(session_id) is done:
                del self.inflight[session_id]
        if over:
            warned = self.warned.setdefault(session_id, set())
            for name, size in over:
                if name not in warned:
                    warned.add(name)
                    self.notes.setdefault(session_id, []).append(over_cap_note(name, size, self.max_bytes))

    def _receive_sync(self, sock: socket.socket, key: str, session_id: str) -> list[tuple[str, int]]:
        sock.settimeout(RECV_TIMEOUT_S)
        stream = _Stream(sock)
        begin = stream.frame()
        if begin.get("op") != "begin":
            raise StreamError("no begin frame")
        writer = self.store.begin(key, session_id)
        try:
            while True:
                frame = stream.frame()
                op = frame.get("op")
                if op == "end":
                    break
                if op != "part" or len(writer.parts) >= MAX_PARTS:
                    raise StreamError("an unexpected frame")
                name = _name(frame.get("name"))
                kind = frame.get("kind")
                if kind == "module":
                    writer.add({"name": name, "kind": "module", "module": _name(frame.get("module"))})
                    continue
                if kind != "value":
                    raise StreamError("a part of an unknown kind")
                size, pickle_len = frame.get("bytes"), frame.get("pickle")
                buffers = _ints(frame.get("buffers"), "buffers")
                digest = frame.get("digest")
                if not isinstance(size, int) or not isinstance(pickle_len, int) or not isinstance(digest, str):
                    raise StreamError("a part without its sizes")
                if pickle_len + sum(buffers) != size or writer.bytes + size > self.max_bytes:
                    raise StreamError("a part over the snapshot's cap")
                part = {"name": name, "kind": "value", "digest": digest[:128], "pickle": pickle_len,
                        "buffers": buffers, "bytes": size}  # fmt: skip
                old = writer.unchanged(name, part["digest"])
                if old is not None and writer.previous is not None and writer.previous.part_file(old).is_file():
                    sock.sendall(b"0")
                    writer.link(part, old)
                    continue
                if not self.store.room(writer.bytes + size):
                    raise StoreFull("the server's store is full")
                sock.sendall(b"1")
                with writer.open_part(part) as fh:
                    stream.copy(fh, size)
            skipped = _named_reasons(frame.get("skipped"), "reason")
            over = _named_reasons(frame.get("over"), "bytes")
            meta = {
                "run": begin.get("run") if isinstance(begin.get("run"), int) else None,
                "python": str(begin.get("python", ""))[:40],
                "dill": str(begin.get("dill", ""))[:40],
                "saved_at": time.time(),
                "skipped": skipped,
                "over": [{"name": o["name"], "bytes": o["bytes"]} for o in over],
            }
            writer.commit(meta)
        except BaseException:
            writer.abort()
            raise
        with contextlib.suppress(OSError):
            sock.sendall(b"1")
        return [(o["name"], o["bytes"]) for o in over if not o["warned"]]

    async def flush(self, c: Container, within: float = 10.0) -> None:
        """Before an idle worker is stopped on purpose (eviction, shutdown): its due snapshot written now, so the
        session's next worker loads its last run's variables. The child waits for the host's ack of the whole
        stream before it exits, so once the worker answers the snapshot is in place."""
        worker = c.worker
        if c.session_id is None or worker is None or worker.ctl is None or not worker.alive():
            return
        with anyio.move_on_after(within + 1.0):
            try:
                await worker.request({"op": "flush", "within": within})
            except WorkerGone:
                return
            pending = self.inflight.get(c.session_id)
            if pending is not None:
                await pending.wait()

    async def drain(self, within: float) -> None:
        """Let snapshots being written finish (a graceful stop keeps the last run's variables)."""
        with anyio.move_on_after(within):
            while self.inflight:
                await next(iter(self.inflight.values())).wait()

    def close(self) -> None:
        """Stop every reception at once (their threads would otherwise wait out a read)."""
        for sock in list(self._socks):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def forget(self, session_id: str) -> None:
        self.warned.pop(session_id, None)
        self.notes.pop(session_id, None)

    def has_snapshot(self, c: Container) -> bool:
        return c.session_id is not None and c.owner_key is not None and self.store.has(c.owner_key, c.session_id)

    def take_notes(self, c: Container) -> list[str]:
        return self.notes.pop(str(c.session_id), []) if c.session_id else []

    # ---- restoring -----------------------------------------------------------------------------------------

    async def restore(self, c: Container, worker: WorkerProcess, packages: list[str], timeout_s: float) -> Restored:
        """Load the session's newest snapshot into a worker that has not run anything yet."""
        if c.session_id is None or c.owner_key is None or not self.store.has(c.owner_key, c.session_id):
            return Restored()
        pending = self.inflight.get(c.session_id)
        if pending is not None:  # the old worker's last stream: it ends as soon as its child is gone
            with anyio.move_on_after(10):
                await pending.wait()
        try:
            snap = await anyio.to_thread.run_sync(self.store.latest, c.owner_key, c.session_id)
        except SnapshotUnreadable as exc:
            return Restored(lost=str(exc))
        if snap is None:
            return Restored()
        parts = []
        for p in snap.parts:
            keep = {k: p.get(k) for k in ("name", "kind", "module", "pickle", "buffers", "bytes")}
            parts.append({k: v for k, v in keep.items() if v is not None})
        values = [p for p in snap.parts if p.get("kind") == "value"]
        fds = await anyio.to_thread.run_sync(_open_parts, [snap.part_file(p) for p in values])
        try:
            rid = await worker.send({"op": "restore", "parts": parts, "packages": packages})
            for i in range(0, len(fds), MAX_FDS):
                await _send_fds(worker, fds[i : i + MAX_FDS])
        finally:
            for fd in fds:
                os.close(fd)
        with anyio.fail_after(max(timeout_s, 30.0)):
            resp = await worker.response(rid)
        if resp.get("op") != "restored":
            raise WorkerGone("the worker answered a restore out of protocol")
        skipped = _named_reasons(resp.get("skipped"), "reason")
        skipped += _named_reasons(snap.manifest.get("skipped"), "reason")  # a manifest edited by hand stays safe
        for o in _named_reasons(snap.manifest.get("over"), "bytes"):
            skipped.append({"name": o["name"], "reason": f"over SNAPSHOT_MAX_MB when saved ({human(o['bytes'])})"})
        restored = [n for n in resp.get("restored") or [] if isinstance(n, str)]
        seconds = resp.get("seconds") if isinstance(resp.get("seconds"), int | float) else 0.0
        info = {
            "from_run": snap.manifest.get("run"),
            "saved_at": snap.manifest.get("saved_at"),
            "restored": restored,
            "skipped": skipped,
            "seconds": seconds,
        }
        return Restored(info=info)


def _open_parts(paths: list[Any]) -> list[int]:
    """Read-only fds of the parts; a missing one is /dev/null (the worker then names it as truncated)."""
    fds = []
    for path in paths:
        try:
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW))
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    return fds


async def _send_fds(worker: WorkerProcess, fds: list[int]) -> None:
    ctl = worker.ctl
    if ctl is None:
        raise WorkerGone("the worker has no control socket")
    while True:
        try:
            socket.send_fds(ctl, [b"parts"], fds)
            return
        except BlockingIOError:
            await anyio.wait_writable(ctl)
        except OSError as exc:
            raise WorkerGone(f"cannot hand the snapshot to the worker: {exc}") from None
