"""One Linux inotify instance: its fd, its watches, and the routing of its events to the listeners that own them.

ctypes on libc directly rather than the `inotify_simple` package: both come down to the same three calls
(`inotify_init1`, `inotify_add_watch`, `inotify_rm_watch`) and a 16-byte header to unpack. What inotify_simple adds
on top (a poll-based `read(timeout, read_delay)`, flag enums) is what we do not use: the fd is read non-blocking
when the event loop reports it readable, watches are set through `/proc/self/fd/N` on a directory already opened
and checked, and the reader is injectable for tests. So the binding is some forty lines here rather than one more
dependency of the server.

One instance can serve many listeners (one per container folder): the kernel allows 128 instances per user by
default (`fs.inotify.max_user_instances`), fewer than the containers a host may keep live. Events are routed by
watch descriptor; a queue overflow (wd -1) reaches every listener, since any of them may have lost events.

Owns: the fd, the wd -> listener routes, reading and parsing, and `serve`, the task that reads the fd as events
arrive. Must not know what a listener does with the events (paths, files, quotas are `changes.py`'s). Thread
safety: `lock` (re-entrant) guards routes and dispatch, so a listener walking a folder in a worker thread can add
watches while the event loop pumps.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import math
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import anyio

IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
_READ_SIZE = 64 * 1024
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # what os.fsdecode uses
Reader = Callable[[int, int], bytes]


class Event(NamedTuple):
    """One event. A named tuple: a run writing 1,000 files reads some 4,000 of them, and a frozen dataclass
    costs three times as much to make."""

    wd: int
    mask: int
    cookie: int
    name: str  # os.fsdecode'd (surrogateescape: any byte string survives, os.fsencode gives it back); "" = the dir


class Listener(Protocol):
    def on_events(self, events: list[Event]) -> None:
        """Events of this listener's watches, in the kernel's order (IN_IGNORED included)."""

    def on_overflow(self) -> None:
        """The queue overflowed: events of any watch may have been lost."""

    def on_batch_end(self) -> None:
        """Called once after each pump that delivered events to this listener."""

    def rescan_due(self, now: float, poll_s: float) -> float | None:
        """Seconds until this listener wants `rescan_in_thread` (0: now), or None."""

    async def rescan_in_thread(self) -> None:
        """Recover lost events (a walk in a worker thread)."""


def parse(data: bytes) -> list[Event]:
    """The events of one read. A file's name comes in several events in a row (create, modify, close): each
    distinct name is decoded once."""
    events: list[Event] = []
    append = events.append
    make = tuple.__new__  # Event's own __new__ is Python code: twice the cost, some 4,000 times a run
    unpack = _HEADER.unpack_from
    size = _HEADER.size
    end = len(data)
    names: dict[bytes, str] = {}
    offset = 0
    while offset + size <= end:
        wd, mask, cookie, length = unpack(data, offset)
        offset += size
        name = ""
        if length:
            raw = data[offset : offset + length]
            offset += length
            name = names.get(raw, "")
            if not name:
                name = names[raw] = raw.split(b"\0", 1)[0].decode(_FS_ENCODING, _FS_ERRORS)
        append(make(Event, (wd, mask, cookie, name)))
    return events


def pack(event: Event) -> bytes:
    """The kernel's encoding of one event (for tests that feed events through an injected reader)."""
    name = os.fsencode(event.name)
    padded = name + b"\0" * (16 - len(name) % 16) if name else b""
    return _HEADER.pack(event.wd, event.mask, event.cookie, len(padded)) + padded


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def _max_queued_events() -> int:
    try:
        with open("/proc/sys/fs/inotify/max_queued_events") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 16384


class Inotify:
    """An inotify fd (non-blocking, close-on-exec) shared by any number of listeners.

    `read` replaces `os.read` (tests inject events such as IN_Q_OVERFLOW through it). OSError from the
    constructor when the kernel refuses an instance (EMFILE at `max_user_instances`, ENOSYS)."""

    def __init__(self, read: Reader | None = None) -> None:
        self._lib = _libc()
        fd = self._lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        self.lock = threading.RLock()
        self.closed = False
        self.serving: anyio.Event | None = None  # set by the one task reading the fd (changes.serve) when it stops
        self._read: Reader = read or os.read
        self._routes: dict[int, Listener] = {}
        self._listeners: list[Listener] = []
        # Everything queued when a pump starts fits in this many events, so one pump empties the queue as it was
        # without ever chasing a writer that keeps it non-empty.
        self._pump_limit = _max_queued_events() + 1

    def fileno(self) -> int:
        return self.fd

    @property
    def listeners(self) -> list[Listener]:
        return list(self._listeners)

    def attach(self, listener: Listener) -> None:
        with self.lock:
            if listener not in self._listeners:
                self._listeners.append(listener)

    def detach(self, listener: Listener) -> None:
        """Forget a listener and remove its watches."""
        with self.lock:
            if listener in self._listeners:
                self._listeners.remove(listener)
            for wd in [wd for wd, owner in self._routes.items() if owner is listener]:
                self.rm_watch(wd)

    def add_watch(self, listener: Listener, target: int | str, mask: int) -> int:
        """Watch an open directory fd (through /proc/self/fd, so exactly that inode) or a path. The same inode
        watched again returns the same wd (mask replaced). OSError with the kernel's errno on refusal."""
        if isinstance(target, int):
            path = f"/proc/self/fd/{target}".encode()
        else:
            path = os.fsencode(target)
            mask |= IN_DONT_FOLLOW
        with self.lock:
            if self.closed:
                raise OSError(errno.EBADF, "inotify instance closed")
            wd = self._lib.inotify_add_watch(self.fd, path, mask)
            if wd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"inotify_add_watch: {os.strerror(err)}")
            self._routes[wd] = listener
            return wd

    def rm_watch(self, wd: int) -> None:
        with self.lock:
            self._routes.pop(wd, None)
            if not self.closed:
                # EINVAL: the kernel already dropped it (directory deleted); IN_IGNORED is then on its way.
                self._lib.inotify_rm_watch(self.fd, wd)

    def pump(self) -> int:
        """Read and dispatch every event queued now, without blocking. Returns how many were read."""
        with self.lock:
            if self.closed:
                return 0
            count = 0
            touched: list[Listener] = []
            while count < self._pump_limit:
                try:
                    data = self._read(self.fd, _READ_SIZE)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                if not data:
                    break
                events = parse(data)
                count += len(events)
                self._dispatch(events, touched)
            for listener in touched:
                listener.on_batch_end()
            return count

    def _dispatch(self, events: list[Event], touched: list[Listener]) -> None:
        """Each listener's events in one batch per read, in order; the events before an overflow first."""
        groups: dict[int, tuple[Listener, list[Event]]] = {}
        routes = self._routes
        last_wd: int | None = None  # the events of a folder come in runs: one route lookup per run
        batch: list[Event] = []  # last_wd's, while it is not None

        def flush() -> None:
            for listener, events in groups.values():  # in order of first appearance
                listener.on_events(events)
            groups.clear()

        for event in events:
            wd, mask = event.wd, event.mask
            if wd == last_wd and not mask & (IN_Q_OVERFLOW | IN_IGNORED):
                batch.append(event)
                continue
            last_wd = None
            if mask & IN_Q_OVERFLOW:
                flush()  # what came before the overflow is still good
                for listener in self._listeners:
                    listener.on_overflow()
                    if listener not in touched:
                        touched.append(listener)
                continue
            listener = routes.get(wd)
            if mask & IN_IGNORED:
                routes.pop(wd, None)
            if listener is None:
                continue
            group = groups.get(id(listener))
            if group is None:
                group = groups[id(listener)] = (listener, [])
                if listener not in touched:
                    touched.append(listener)
            group[1].append(event)
            if not mask & IN_IGNORED:
                last_wd, batch = wd, group[1]
        flush()

    def close(self) -> None:
        """Close the fd. A task waiting on it is woken first (ClosedResourceError) when called on its loop."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self._routes.clear()
            self._listeners.clear()
            # A task waiting in anyio.wait_readable would otherwise wait on a closed (or reused) fd number.
            with contextlib.suppress(RuntimeError):  # no event loop in this thread: nobody waits through it
                anyio.notify_closing(self.fd)
            os.close(self.fd)


async def serve(hub: Inotify, *, poll_s: float = 2.0) -> None:
    """Read `hub`'s events as they arrive, until cancelled or the hub is closed, and run the rescans its listeners
    ask for (in tasks, so reading goes on meanwhile). No events, no work: the task sleeps in the event loop's wait
    on the fd. One task reads a hub at a time; another caller waits, and takes over when the first stops."""
    while hub.serving is not None:
        await hub.serving.wait()
    stopped = anyio.Event()
    hub.serving = stopped
    busy: set[int] = set()

    async def rescan(listener: Listener) -> None:
        try:
            await listener.rescan_in_thread()
        finally:
            busy.discard(id(listener))

    try:
        async with anyio.create_task_group() as tg:
            while not hub.closed:
                wait = math.inf
                now = time.monotonic()
                for listener in hub.listeners:
                    due = listener.rescan_due(now, poll_s)
                    if due is None:
                        continue
                    if id(listener) in busy:
                        due = poll_s  # look again once it is done
                    elif due <= 0:
                        busy.add(id(listener))
                        tg.start_soon(rescan, listener)
                        due = poll_s
                    wait = min(wait, due)
                with anyio.move_on_after(wait):
                    try:
                        await anyio.wait_readable(hub.fd)
                    except (anyio.ClosedResourceError, OSError):
                        return
                hub.pump()
    finally:
        hub.serving = None
        stopped.set()
