"""Emulated containers: a temp folder standing for /mnt/data, a persistent Python kernel, and a file registry.

Code really runs (in `_worker.py`, one subprocess per container, cwd = the folder), so logs and files are real.
The literal prefix "/mnt/data" in the code is replaced by the folder's path before running; the code reported back
to the client is the original. Blocking work here (process pipes, directory scans) is called through
`anyio.to_thread` by the emulator core.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import selectors
import shutil
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("_worker.py")
DATA = "/mnt/data"


def new_id(prefix: str, hex_chars: int) -> str:
    return prefix + secrets.token_hex(hex_chars // 2)


@dataclass
class FileRec:
    id: str
    path: str  # absolute, /mnt/data/...
    bytes: int
    created_at: float
    source: str  # "user" | "assistant"
    mtime_ns: int = 0


class Kernel:
    """One persistent worker process. `run` is blocking (call it in a thread)."""

    def __init__(self, cwd: Path) -> None:
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self._reply_fd = -1
        self._pending = b""
        self._lock = threading.Lock()
        self._cell = 0

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, str(WORKER), str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(write_fd,),
                cwd=self._cwd,
                env=env,
            )
        finally:
            os.close(write_fd)
        self._reply_fd = read_fd
        self._pending = b""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
        if self._reply_fd >= 0:
            os.close(self._reply_fd)
            self._reply_fd = -1

    def run(self, code: str, timeout_s: float) -> dict[str, Any]:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self.stop()
                self.start()
            assert self._proc is not None and self._proc.stdin is not None
            self._cell += 1
            try:
                self._proc.stdin.write((json.dumps({"code": code, "cell": self._cell}) + "\n").encode())
                self._proc.stdin.flush()
            except BrokenPipeError:
                self.stop()
                return {"logs": "The kernel died before running the code.\n", "error": True, "value_json": None}
            line = self._read_line(time.monotonic() + timeout_s)
            if line is None:
                dead = self._proc.poll() is not None
                self.stop()
                why = "The kernel died." if dead else f"Execution timed out after {timeout_s:g} s."
                return {"logs": why + "\n", "error": True, "value_json": None, "timed_out": not dead}
            return json.loads(line)

    def _read_line(self, deadline: float) -> bytes | None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._reply_fd, selectors.EVENT_READ)
            while b"\n" not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(self._reply_fd, 1 << 16)
                if not chunk:
                    return None
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line


@dataclass
class EmuContainer:
    id: str
    name: str
    root: Path
    created_at: float
    minutes: int
    memory_limit: str
    last_active_at: float = 0.0
    status: str = "running"  # running | expired | deleted
    files: dict[str, FileRec] = field(default_factory=dict)
    kernel: Kernel | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, base: Path, name: str, minutes: int, memory_limit: str) -> EmuContainer:
        cid = new_id("cntr_", 48)
        root = base / cid
        root.mkdir(parents=True)
        now = time.time()
        container = cls(cid, name, root, now, minutes, memory_limit, last_active_at=now)
        container.kernel = Kernel(root)
        container.kernel.start()
        return container

    def touch(self) -> None:
        self.last_active_at = time.time()

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "container",
            "created_at": int(self.created_at),
            "status": self.status,
            "expires_after": {"anchor": "last_active_at", "minutes": self.minutes},
            "last_active_at": int(self.last_active_at),
            "memory_limit": self.memory_limit,
            "network_policy": {"type": "disabled"},
            "name": self.name,
        }

    def host_path(self, path: str) -> Path:
        rel = path[len(DATA) :].lstrip("/") if path.startswith(DATA) else path.lstrip("/")
        return self.root / rel

    def shutdown(self, discard: bool) -> None:
        """Stop the kernel; with discard, delete the data too (expiry and deletion discard everything)."""
        if self.kernel is not None:
            self.kernel.stop()
        if discard:
            shutil.rmtree(self.root, ignore_errors=True)
            self.files.clear()

    def run(self, code: str, timeout_s: float) -> dict[str, Any]:
        """Blocking: run one cell, with /mnt/data pointing at this container's folder."""
        assert self.kernel is not None
        return self.kernel.run(code.replace(DATA, str(self.root)), timeout_s)

    def scan(self, new_source: str = "assistant") -> list[FileRec]:
        """Blocking: sync the registry with the folder; return the files that are new or changed."""
        changed: list[FileRec] = []
        seen: set[str] = set()
        with self.lock:
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames.sort()
                for name in sorted(filenames):
                    full = Path(dirpath) / name
                    st = os.lstat(full)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    path = DATA + "/" + full.relative_to(self.root).as_posix()
                    seen.add(path)
                    rec = self.files.get(path)
                    if rec is not None and (rec.bytes, rec.mtime_ns) == (st.st_size, st.st_mtime_ns):
                        continue
                    rec = FileRec(new_id("cfile_", 32), path, st.st_size, time.time(), new_source, st.st_mtime_ns)
                    self.files[path] = rec
                    changed.append(rec)
            for path in [p for p in self.files if p not in seen]:
                del self.files[path]
        return changed

    def add_upload(self, filename: str, data: bytes, hashed: bool) -> FileRec:
        """Blocking: write an uploaded file and register it as source "user"."""
        name = Path(filename).name or "upload"
        if hashed:
            name = hashlib.sha256(data).hexdigest()[:32] + "-" + name
        full = self.root / name
        full.write_bytes(data)
        st = os.lstat(full)
        rec = FileRec(new_id("cfile_", 32), f"{DATA}/{name}", st.st_size, time.time(), "user", st.st_mtime_ns)
        with self.lock:
            self.files[rec.path] = rec
        return rec

    def file_by_id(self, file_id: str) -> FileRec | None:
        with self.lock:
            return next((f for f in self.files.values() if f.id == file_id), None)

    def listing(self) -> list[FileRec]:
        with self.lock:
            return sorted(self.files.values(), key=lambda f: (f.created_at, f.id))
