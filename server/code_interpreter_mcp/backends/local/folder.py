"""One container's data folder as the backend sees it: which files it holds, how much disk it uses, and uploads
into it within the disk quota.

Changes are found by scanning the whole folder after each run (files.py does the symlink-proof work); change
tracking from kernel events would replace `list` here and nowhere else. Nothing here knows workers or runs.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from ...errors import ContainerExpired
from ..base import FetchResult, RemoteFile
from . import files


class DataFolder:
    """The data folder of container `cid`, owned by the sandbox's uid/gid (None: the server's own)."""

    def __init__(self, cid: str, path: Path, uid: int | None, gid: int | None) -> None:
        self.cid = cid
        self.path = path
        self.uid = uid
        self.gid = gid
        self.usage = 0  # disk bytes at the last measurement (a listing, an upload, the quota watch)
        self.user_versions: dict[str, str] = {}  # path -> version of files put there by upload, unchanged since
        self.scan_inline = True

    async def list(self) -> list[RemoteFile]:
        try:
            if self.scan_inline:
                # A few dozen stat calls take ~20 µs; a thread hop costs ~140 µs here and this runs on every run.
                # A folder that scanned slowly once goes to a thread from then on.
                result = files.scan(self.path, self.user_versions)
            else:
                result = await anyio.to_thread.run_sync(files.scan, self.path, self.user_versions)
        except OSError:
            raise ContainerExpired(f"Container {self.cid} no longer exists.") from None
        self.usage = result.usage_bytes
        self.scan_inline = result.seconds < 0.0005 and len(result.files) < 200
        return result.files

    def measure(self) -> files.Scan:
        """Disk usage only (blocking: the quota watch's thread). OSError when the folder is being deleted."""
        result = files.scan(self.path, with_files=False)
        self.usage = result.usage_bytes
        return result

    async def fetch(self, path: str, dest: Path, max_bytes: int) -> FetchResult:
        return await anyio.to_thread.run_sync(files.fetch, self.path, path, Path(dest), int(max_bytes))

    async def put(self, src: Path, dest_path: str, max_file_bytes: int, quota_bytes: int) -> RemoteFile:
        def do_put() -> tuple[RemoteFile, int]:
            used = files.scan(self.path, with_files=False).usage_bytes
            remote = files.put(
                self.path,
                Path(src),
                dest_path,
                self.uid,
                self.gid,
                int(max_file_bytes),
                room_bytes=max(quota_bytes - used, 0),
            )
            return remote, used

        remote, used = await anyio.to_thread.run_sync(do_put)
        self.user_versions[remote.path] = remote.version
        self.usage = used + remote.bytes
        return remote
