"""Memory of a container limited for all its processes together, with the mechanism this host offers:

- "cgroup2": a child group with `memory.max` below the server's own cgroup v2 group, where the memory controller is
  delegated to it (listed in its `cgroup.subtree_control`);
- "cgroup1": a child group with `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes` where swap is accounted)
  below the server's own group of a writable cgroup v1 `memory` hierarchy;
- "rlimit": neither can be had. RLIMIT_AS (`memory_mb`, set in every process by the worker) bounds each process,
  and the runner sums the resident memory of the container's processes while a run goes (`over_rss`), stopping the
  sandbox when they together pass `memory_mb`. The sum is sampled (every 0.25 s), so a burst can pass it briefly.

RLIMIT_AS stays on in every mode: one process asking for too much gets a catchable MemoryError instead of a kill.
The kernel's OOM killer acts inside a group that reaches its limit and kills one of its processes (the worker: the
run reports it). Workers also get a raised `oom_score_adj`, so that should the host itself run short, the kernel
picks a sandbox before the server. Owns: the groups (create, place pids, delete), the OOM count, the RSS check.
Must not know containers or workers (it is given ids and pids).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Literal

from . import procs

logger = logging.getLogger(__name__)

Mechanism = Literal["cgroup2", "cgroup1", "rlimit"]
OOM_SCORE_ADJ = 500


def _own_groups() -> dict[str, str]:
    """controller (or "" for v2) -> this process's group path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for name in parts[1].split(",") if parts[1] else [""]:
            out[name] = parts[2]
    return out


def _mounts() -> dict[str, str]:
    """ "cgroup2" or a v1 controller -> its mount point."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[2] == "cgroup2":
            out.setdefault("cgroup2", fields[1])
        elif fields[2] == "cgroup":
            for opt in fields[3].split(","):
                out.setdefault(opt, fields[1])
    return out


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


class MemoryLimiter:
    """Per-container memory groups (or the RSS fallback) for a limit of `limit_bytes`."""

    def __init__(self, limit_bytes: int, base: Path | None = None, mechanism: Mechanism | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.mechanism: Mechanism = "rlimit"
        self.base: Path | None = None
        self.reason = ""
        if mechanism is not None:
            self.mechanism, self.base = mechanism, base
        else:
            self._detect()

    def _detect(self) -> None:
        groups, mounts = _own_groups(), _mounts()
        v2 = mounts.get("cgroup2")
        if v2 is not None and "" in groups:
            own = Path(v2 + groups[""])
            try:
                delegated = "memory" in (own / "cgroup.subtree_control").read_text().split()
            except OSError:
                delegated = False
            if delegated and _writable_dir(own):
                self.mechanism, self.base = "cgroup2", own
                return
        v1 = mounts.get("memory")
        if v1 is not None and "memory" in groups:
            own = Path(v1 + groups["memory"])
            if _writable_dir(own) and (own / "memory.limit_in_bytes").exists():
                self.mechanism, self.base = "cgroup1", own
                return
        self.reason = "no delegated cgroup v2 memory controller and no writable cgroup v1 memory hierarchy"

    def describe(self) -> dict[str, object]:
        return {
            "mechanism": self.mechanism,
            "per": "container (all its processes together)" if self.mechanism != "rlimit" else "process",
            "group_parent": str(self.base) if self.base is not None else None,
            "fallback": "RLIMIT_AS per process + the sum of the container's RSS checked during runs"
            if self.mechanism == "rlimit"
            else None,
            "why_fallback": self.reason or None,
        }

    def _group(self, cid: str) -> Path | None:
        return self.base / f"ci-{cid}" if self.base is not None else None

    def place(self, cid: str, pids: list[int]) -> None:
        """Put these processes (those they start follow) into the container's group, made on first use, and raise
        their OOM score. Blocking but cheap (a few small writes): fine on the event loop."""
        for pid in pids:
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/oom_score_adj").write_text(str(OOM_SCORE_ADJ))
        group = self._group(cid)
        if group is None:
            return
        try:
            if not group.is_dir():
                group.mkdir()
                self._set_limit(group)
            for pid in pids:
                (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            logger.warning("memory group %s: %s; this container falls back to per-process limits", group, exc)

    def _set_limit(self, group: Path) -> None:
        limit = str(self.limit_bytes)
        if self.mechanism == "cgroup2":
            (group / "memory.max").write_text(limit)
            with contextlib.suppress(OSError):
                (group / "memory.swap.max").write_text("0")
            return
        (group / "memory.limit_in_bytes").write_text(limit)
        with contextlib.suppress(OSError):  # only where swap is accounted; must follow the memory limit
            (group / "memory.memsw.limit_in_bytes").write_text(limit)

    def oom_kills(self, cid: str) -> int:
        """How many processes the kernel killed in this container's group for want of memory."""
        group = self._group(cid)
        if group is None:
            return 0
        name = "memory.events" if self.mechanism == "cgroup2" else "memory.oom_control"
        try:
            for line in (group / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def usage(self, cid: str, root_pid: int | None) -> int:
        """Memory the container's processes use together now."""
        group = self._group(cid)
        if group is not None:
            name = "memory.current" if self.mechanism == "cgroup2" else "memory.usage_in_bytes"
            with contextlib.suppress(OSError, ValueError):
                return int((group / name).read_text())
        if root_pid is None:
            return 0
        return procs.rss_bytes([root_pid, *procs.descendants(root_pid)])

    def over_rss(self, root_pid: int | None) -> bool:
        """The RSS fallback's check: the processes below `root_pid` together hold more than the limit."""
        if self.mechanism != "rlimit" or root_pid is None:
            return False
        return procs.rss_bytes([root_pid, *procs.descendants(root_pid)]) > self.limit_bytes

    def remove(self, cid: str) -> None:
        """Delete the container's group once its processes are gone (they are: called after a kill)."""
        group = self._group(cid)
        if group is not None and group.is_dir():
            try:
                group.rmdir()
            except OSError as exc:
                logger.debug("memory group %s not removed yet: %s", group, exc)

    def sweep(self) -> None:
        """At shutdown: remove the empty container groups left (the kernel refuses to remove one in use)."""
        if self.base is None:
            return
        with contextlib.suppress(OSError):
            for group in self.base.glob("ci-lc_*"):
                with contextlib.suppress(OSError):
                    group.rmdir()
