"""A worker's processes as the host sees them: the tree below a pid, signalling it, and its resident memory.

Read from /proc (`task/<tid>/children`), so it costs a few file reads per process and needs no cgroup. Used to stop
what a run started the moment it overfills the disk quota (quota.py) and for the memory fallback where no cgroup
can be had (memory.py). Nothing here knows workers or containers; every function is non-blocking enough for the
event loop (a sandbox holds a handful of processes; the walk stops at `limit`).
"""

from __future__ import annotations

import contextlib
import os
import signal

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found.extend(int(x) for x in fh.read().split())
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int, limit: int = 10_000) -> list[int]:
    """Every process below `pid` (not `pid` itself), parents before children."""
    out: list[int] = []
    todo = children(pid)
    seen: set[int] = set()
    while todo and len(out) < limit:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        todo.extend(children(p))
    return out


def kill(pids: list[int], sig: int = signal.SIGKILL) -> int:
    """Signal each pid (already gone is fine); how many were signalled."""
    n = 0
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)
            n += 1
    return n


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes together (statm; shared pages count in each)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total
