"""What the registry's file records say about the stored copies: the blobs they hold (rebuilt into the blob
store's reference counts at start) and, once on the upgrade from the one-folder-per-file layout, what those older
copies really cost on disk.

Plain SQL over the registry's `Database` (either engine); it knows the files and sessions tables and nothing else.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .database import Database

StoredCopies = tuple[list[tuple[str | None, str, int, int]], int]
"""(owner, sha256, records holding the blob, its disk bytes) of every blob, and the disk bytes of legacy copies."""


def stored_copies(db: Database) -> StoredCopies:
    blobs = db.rows(
        "SELECT s.owner, f.blob, COUNT(*), MAX(COALESCE(f.disk_bytes, f.bytes)) FROM files f "
        "JOIN sessions s ON s.id = f.session_id WHERE f.blob IS NOT NULL AND f.dropped = 0 "
        "GROUP BY s.owner, f.blob"
    )
    row = db.row(
        "SELECT COALESCE(SUM(disk_bytes), 0) FROM files WHERE blob IS NULL AND dropped = 0 "
        "AND local_path IS NOT NULL AND source = 'generated'"
    )
    return [(o, b, int(n), int(d)) for o, b, n, d in blobs], int(row[0] if row else 0)


def measure_legacy_copies(db: Database) -> None:
    """Once, on the upgrade: what each copy of the earlier layout really costs on disk (for the server quota)."""
    costs = []
    for file_id, local_path in db.rows(
        "SELECT file_id, local_path FROM files WHERE local_path IS NOT NULL AND disk_bytes IS NULL"
    ):
        try:
            cost = os.stat(local_path, follow_symlinks=False).st_blocks * 512
        except OSError:
            cost = 0
        costs.append((cost, file_id))
    db.transaction([("UPDATE files SET disk_bytes = ? WHERE file_id = ?", costs)])
