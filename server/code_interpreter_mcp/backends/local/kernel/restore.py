"""Loading a session's last snapshot into a new worker, before its first run: runs inside the sandbox, stdlib + dill.

The host sends the manifest in a "restore" request and the part files as read-only fds over the worker's control
socket, in batches each read (or mapped) and closed before the next. Each name is loaded on its own, so one that
fails (a package gone, another Python, a truncated part) is named with the reason and the others come back; a value
that refers to a class or function another name holds is loaded once that name is. Modules are imported by name.
Large parts with out-of-band buffers are mapped copy-on-write: their arrays are back at once, backed by the file's
pages, and writable without the file ever changing. The writing side is snapshot.py.
"""

from __future__ import annotations

import io
import os
import time
import types

Any = object  # a plain alias: `typing` costs ~9 ms, and this module is loaded at every worker's start

MMAP_MIN = 1 << 20  # parts from this size with buffers are mapped rather than read
MMAP_MAX = 32  # mapped parts at most: Python's mmap keeps a duplicate of its fd open for its whole life
MAX_FDS = 64  # per control message, as the host sends them (workers/snapshots.py)


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def restore(snaps: Any, req: dict[str, object]) -> dict[str, object]:
    """Load the request's parts into the worker's namespace (`snaps` is its snapshot.Snapshots); the answer names
    what came back and why the rest did not. Never raises for a broken part."""
    started = time.monotonic()
    parts = [p for p in req.get("parts") or [] if isinstance(p, dict)]  # type: ignore[union-attr]
    values = [p for p in parts if p.get("kind") == "value"]
    datas = _receive_parts(snaps, values)
    restored: list[str] = []
    skipped: list[dict[str, str]] = []
    try:
        import dill
    except ImportError as exc:
        dill = None
        missing = _reason(exc)
    for p in parts:
        if p.get("kind") == "module":
            try:
                import importlib

                snaps.ns[str(p["name"])] = importlib.import_module(str(p["module"]))
                restored.append(str(p["name"]))
            except BaseException as exc:
                skipped.append({"name": str(p["name"]), "reason": f"module {p['module']!r}: {_reason(exc)}"})
    ns = snaps.ns
    waiting: list[tuple[dict[str, object], object]] = list(zip(values, datas, strict=True))
    # Several passes: a value may refer to a class or function another name holds (restored first).
    failures: dict[str, str] = {}
    while waiting:
        progress = False
        later = []
        for p, data in waiting:
            name = str(p.get("name"))
            if isinstance(data, str):
                failures[name] = data
                continue
            if dill is None:
                failures[name] = missing
                continue
            try:
                ns[name] = _load(dill, ns, p, data)  # type: ignore[arg-type]
                restored.append(name)
                failures.pop(name, None)
                progress = True
            except _NeedsName as exc:
                failures[name] = f"it needs {exc.args[0]!r}, which was not restored"
                later.append((p, data))
            except BaseException as exc:
                failures[name] = _reason(exc)
        if not progress:
            break
        waiting = later
    skipped.extend({"name": n, "reason": r} for n, r in failures.items())
    order = {str(p.get("name")): i for i, p in enumerate(parts)}
    restored.sort(key=lambda n: order.get(n, 0))
    seconds = round(time.monotonic() - started, 4)
    return {"op": "restored", "restored": restored, "skipped": skipped, "seconds": seconds}


def _receive_parts(snaps: Any, values: list[dict[str, object]]) -> list[object]:
    """Each value part's bytes (read, or mapped), or why it cannot be had (a str); fds come in batches, each read
    and closed before the next."""
    import socket

    out: list[object] = []
    if snaps.ctl is None:
        return ["snapshots are off in this worker"] * len(values)
    snaps.ctl.settimeout(30)
    try:
        while len(out) < len(values):
            try:
                msg, fds, _flags, _addr = socket.recv_fds(snaps.ctl, 64, MAX_FDS)
            except OSError as exc:
                out.extend([f"its part could not be received ({exc})"] * (len(values) - len(out)))
                break
            if not msg and not fds:
                break
            for fd in fds:
                p = values[len(out)] if len(out) < len(values) else {}
                try:
                    out.append(_read_part(p, fd))
                except (OSError, ValueError) as exc:
                    out.append(str(exc))
                finally:
                    os.close(fd)
    finally:
        snaps.ctl.settimeout(None)
    out.extend(["its part of the snapshot never arrived"] * (len(values) - len(out)))
    return out[: len(values)]


class _NeedsName(Exception):
    pass


_MAPPED = [0]


def _read_part(p: dict[str, object], fd: int) -> object:
    """The part's bytes: a private copy-on-write mapping when it has out-of-band buffers (arrays come back at once,
    backed by the file's pages, and stay writable without ever changing the file), else read into memory."""
    size = os.fstat(fd).st_size
    total = int(p.get("bytes", 0))  # type: ignore[call-overload]
    if size != total:
        raise ValueError(f"its part is {size} bytes, the snapshot says {total} (truncated)")
    if p.get("buffers") and size >= MMAP_MIN and _MAPPED[0] < MMAP_MAX:
        import mmap

        _MAPPED[0] += 1
        return mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        n = os.preadv(fd, [view[got:]], got)
        if n <= 0:
            raise ValueError("its part ended early (truncated)")
        got += n
    return data


def _load(dill: types.ModuleType, ns: dict[str, object], p: dict[str, object], data: object) -> object:
    view = memoryview(data)
    pickle_len = int(p.get("pickle", 0))  # type: ignore[call-overload]
    buffers = []
    offset = pickle_len
    for length in p.get("buffers") or []:  # type: ignore[union-attr]
        buffers.append(view[offset : offset + int(length)])
        offset += int(length)

    class Unpickler(dill.Unpickler):  # type: ignore[misc, name-defined]
        def persistent_load(self, pid: object) -> object:
            if isinstance(pid, str) and pid in ns:
                return ns[pid]
            raise _NeedsName(pid)

    return Unpickler(io.BytesIO(view[:pickle_len]), buffers=buffers).load()
