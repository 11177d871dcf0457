"""A session's file history: which superseded versions to drop once they cost more than its history quota.

A path's latest version is always kept. The versions it superseded (each handed out by the result that made it)
are kept newest first while what they cost together stays within the quota; past it, the older ones are dropped.
Versions sharing a blob go together (dropping one but not the other frees nothing), and a blob the current
versions still hold costs nothing to keep. Pure: it decides, the caller releases and records; `check_not_dropped`
refuses a dropped version, naming the current one.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import FileSuperseded
from ..sessions import FileRecord


def current_versions(records: list[FileRecord]) -> dict[str, FileRecord]:
    """The latest version of each path that still has its copy (records in harvest order)."""
    current: dict[str, FileRecord] = {}
    for rec in records:
        if not rec.dropped:
            current[rec.path] = rec
    return current


def superseded_to_drop(
    records: list[FileRecord], quota_bytes: int, cost: Callable[[FileRecord], int]
) -> list[FileRecord]:
    """The superseded versions to drop, given the session's records in harvest order and what each copy costs."""
    current = current_versions(records)
    held = {rec.blob for rec in current.values() if rec.blob is not None}
    groups: dict[str, list[FileRecord]] = {}  # blob (or the record's own id) -> versions, newest last
    for rec in records:
        if rec.dropped or not rec.local_path or current.get(rec.path) is rec:
            continue
        groups.setdefault(rec.blob or rec.file_id, []).append(rec)
    newest_first = sorted(groups.items(), key=lambda item: item[1][-1].seq, reverse=True)
    total = 0
    drop: list[FileRecord] = []
    over = False
    for key, versions in newest_first:
        if key in held:
            continue
        total += cost(versions[-1])
        over = over or total > quota_bytes
        if over:
            drop.extend(versions)
    return sorted(drop, key=lambda r: r.seq)


def check_not_dropped(records: list[FileRecord], rec: FileRecord) -> None:
    """A version dropped past the history quota says so and names its path's current version."""
    if not rec.dropped:
        return
    current = current_versions(records).get(rec.path)
    now = f" The current version of {rec.path!r} is {current.file_id}." if current is not None else ""
    raise FileSuperseded(
        f"{rec.file_id} is an earlier version of {rec.path!r} that was superseded; its copy was dropped to keep "
        f"the session's file history within its quota.{now}",
        current.file_id if current is not None else None,
    )
