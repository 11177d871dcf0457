"""What the registry's file records say about the stored copies: the blobs they hold (rebuilt into the blob
store's reference counts at start) and, once on the upgrade from the one-folder-per-file layout, what those older
copies really cost on disk.

Plain SQL over a connection the registry holds (and locks); it knows the files and sessions tables and nothing else.
"""

from __future__ import annotations

import os
import sqlite3

StoredCopies = tuple[list[tuple[str | None, str, int, int]], int]
"""(owner, sha256, records holding the blob, its disk bytes) of every blob, and the disk bytes of legacy copies."""


def stored_copies(db: sqlite3.Connection) -> StoredCopies:
    blobs = db.execute(
        "SELECT s.owner, f.blob, COUNT(*), MAX(COALESCE(f.disk_bytes, f.bytes)) FROM files f "
        "JOIN sessions s ON s.id = f.session_id WHERE f.blob IS NOT NULL AND f.dropped = 0 "
        "GROUP BY s.owner, f.blob"
    ).fetchall()
    direct = db.execute(
        "SELECT COALESCE(SUM(disk_bytes), 0) FROM files WHERE blob IS NULL AND dropped = 0 "
        "AND local_path IS NOT NULL AND source = 'generated'"
    ).fetchone()[0]
    return [(o, b, int(n), int(d)) for o, b, n, d in blobs], int(direct)


def measure_legacy_copies(db: sqlite3.Connection) -> None:
    """Once, on the upgrade: what each copy of the earlier layout really costs on disk (for the server quota)."""
    db.execute("BEGIN")
    for file_id, local_path in db.execute(
        "SELECT file_id, local_path FROM files WHERE local_path IS NOT NULL AND disk_bytes IS NULL"
    ).fetchall():
        try:
            cost = os.stat(local_path, follow_symlinks=False).st_blocks * 512
        except OSError:
            cost = 0
        db.execute("UPDATE files SET disk_bytes = ? WHERE file_id = ?", (cost, file_id))
    db.execute("COMMIT")
