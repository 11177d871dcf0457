"""Which replica is a session's home: leases in the shared registry (`REPLICA_URL` set, with `DATABASE_URL`).

Each replica beats (`replicas.seen_at`, every `LEASE_S / 3`); a session's home is the replica named in `homes`,
with an epoch that grows at each change of home. A home whose last beat is older than `LEASE_S` is gone (a crash,
kill -9, a lost host), and the next replica that needs the session adopts it with a compare-and-set on
(home, epoch): under PostgreSQL's row locks or SQLite's one writer, exactly one of any number of racing replicas
wins, and the others read the winner back. A session let go by a graceful stop is homeless (replica '') and
taken the same way, without waiting. Adopting a dead home's session marks the runs that home had in flight `lost`.
A former home that comes back finds its epoch stale (`lost`) and drops the session without writing.

Every method blocks (one short transaction): call it from a worker thread. Nothing here knows engines or MCP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .database import Database

LEASES_SCHEMA = """
CREATE TABLE IF NOT EXISTS homes (session_id TEXT PRIMARY KEY, replica TEXT NOT NULL, epoch INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS replicas (url TEXT PRIMARY KEY, seen_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS replica_owners (
    replica TEXT NOT NULL, owner TEXT NOT NULL, live INTEGER NOT NULL, PRIMARY KEY (replica, owner)
);
"""


@dataclass(frozen=True)
class Claim:
    """What holding a session took: its epoch here, and the dead home it was adopted from (None: it was free)."""

    epoch: int
    adopted_from: str | None = None


class HeldElsewhere(Exception):
    """The session's home is another replica that is alive."""

    def __init__(self, home: str) -> None:
        super().__init__(home)
        self.home = home


class Leases:
    def __init__(self, db: Database, replica: str, lease_s: float) -> None:
        self.db, self.replica, self.lease_s = db, replica, lease_s

    def beat(self, owners: dict[str, int] | None = None) -> None:
        """This replica is alive (now); with `owners`, how many live workers each owner (its key) has here."""
        statements: list[tuple[str, Any]] = [
            (
                "INSERT INTO replicas (url, seen_at) VALUES (?, ?) "
                "ON CONFLICT (url) DO UPDATE SET seen_at = excluded.seen_at",
                (self.replica, time.time()),
            )
        ]
        if owners is not None:
            statements.append(("DELETE FROM replica_owners WHERE replica = ?", (self.replica,)))
            rows = [(self.replica, key, n) for key, n in owners.items() if n > 0]
            if rows:
                statements.append(("INSERT INTO replica_owners (replica, owner, live) VALUES (?, ?, ?)", rows))
        self.db.transaction(statements)

    def owners_elsewhere(self) -> dict[str, dict[str, int]]:
        """Owner key -> {live replica: its live workers}, as the other live replicas last counted them."""
        rows = self.db.rows(
            "SELECT o.owner, o.replica, o.live FROM replica_owners o JOIN replicas r ON r.url = o.replica "
            "WHERE o.replica <> ? AND r.seen_at > ?",
            (self.replica, time.time() - self.lease_s),
        )
        out: dict[str, dict[str, int]] = {}
        for owner, replica, live in rows:
            out.setdefault(str(owner), {})[str(replica)] = int(live)
        return out

    def alive(self, replica: str) -> bool:
        row = self.db.row("SELECT seen_at FROM replicas WHERE url = ?", (replica,))
        return row is not None and time.time() - float(row[0]) < self.lease_s

    def home_of(self, session_id: str) -> tuple[str, int] | None:
        row = self.db.row("SELECT replica, epoch FROM homes WHERE session_id = ?", (session_id,))
        return (str(row[0]), int(row[1])) if row is not None else None

    def claim(self, session_id: str) -> Claim:
        """Hold the session here: free, already ours, or adopted from a dead home. HeldElsewhere when another
        live replica is its home (or won the race to adopt it)."""
        self.db.transaction(
            [("INSERT INTO homes (session_id, replica, epoch) VALUES (?, ?, 1) ON CONFLICT DO NOTHING",
              (session_id, self.replica))]
        )  # fmt: skip
        home = self.home_of(session_id)
        assert home is not None
        replica, epoch = home
        if replica == self.replica:
            return Claim(epoch)
        if replica and self.alive(replica):
            raise HeldElsewhere(replica)
        self.db.transaction(
            [
                (
                    "UPDATE homes SET replica = ?, epoch = ? WHERE session_id = ? AND replica = ? AND epoch = ?",
                    (self.replica, epoch + 1, session_id, replica, epoch),
                ),
                # Only if this replica won: the runs the dead home had going never end there.
                (
                    "UPDATE runs SET status = 'lost', ended_at = ? WHERE session_id = ? "
                    "AND status IN ('running', 'queued') "
                    "AND EXISTS (SELECT 1 FROM homes WHERE session_id = ? AND replica = ? AND epoch = ?)",
                    (time.time(), session_id, session_id, self.replica, epoch + 1),
                ),
            ]
        )
        now = self.home_of(session_id)
        if now == (self.replica, epoch + 1):
            return Claim(epoch + 1, adopted_from=replica or None)
        raise HeldElsewhere(now[0] if now is not None else replica)

    def lost(self, held: dict[str, int]) -> list[str]:
        """Of the sessions this replica holds (id -> epoch), those another replica adopted since."""
        if not held:
            return []
        ids = list(held)
        out = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self.db.rows(f"SELECT session_id, replica, epoch FROM homes WHERE session_id IN ({marks})", chunk)
            now = {str(r[0]): (str(r[1]), int(r[2])) for r in rows}
            out += [s for s in chunk if now.get(s) != (self.replica, held[s])]
        return out

    def release(self, session_ids: list[str]) -> None:
        """A graceful stop: these sessions are free for the next replica at once (no lease to wait out). The row
        stays, homeless, so the next claim still moves the epoch on (a copy read under the old one is stale)."""
        if session_ids:
            rows = [(s, self.replica) for s in session_ids]
            self.db.transaction([("UPDATE homes SET replica = '' WHERE session_id = ? AND replica = ?", rows)])
