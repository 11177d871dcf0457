"""The per-owner cap on live workers (`MAX_LIVE_CONTAINERS_PER_OWNER`) across replicas: each replica counts its
owners' live workers in the shared registry at every beat (`Leases.beat`), reads the other live replicas' counts
back, and when an owner's cap is reached with workers elsewhere, asks those replicas (signed, over HTTP: the
app's `replica_call`) to stop idle ones of the owner. Each replica keeps its own live cap.

Counts are as of the last beat (`LEASE_S / 3`), so an owner starting sessions through several replicas within one
beat can pass its cap for that long; the next start anywhere sees the counts and makes room again.

Knows the leases, the backend's owner counts and the owner keys; nothing of HTTP or MCP.
"""

from __future__ import annotations

import logging
from typing import Any

from ..storage.blobs import owner_key
from ..storage.leases import Leases
from .context import EngineContext

logger = logging.getLogger(__name__)

MAX_ASKED = 1000  # workers one request may ask another replica to stop


class OwnerCaps:
    def __init__(self, ctx: EngineContext, leases: Leases) -> None:
        self.ctx, self.leases = ctx, leases
        self.elsewhere: dict[str, dict[str, int]] = {}  # owner key -> {replica: live workers there}

    def counts_here(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        live_owners = getattr(self.ctx.backend, "live_owners", None)
        for owner, n in (live_owners() if live_owners is not None else {}).items():
            key = owner_key(owner)
            counts[key] = counts.get(key, 0) + n
        return counts

    def read_back(self) -> None:
        """After a beat (in a worker thread): the other replicas' counts."""
        self.elsewhere = self.leases.owners_elsewhere()

    def live_elsewhere(self, owner: str | None) -> int:
        return sum(self.elsewhere.get(owner_key(owner), {}).values())

    async def evict_elsewhere(self, owner: str | None, n: int) -> int:
        """Ask the replicas with the most of the owner's workers to stop idle ones, until `n` are stopped."""
        call = self.ctx.replica_call
        key = owner_key(owner)
        theirs = self.elsewhere.get(key, {})
        stopped = 0
        for replica, live in sorted(theirs.items(), key=lambda kv: -kv[1]):
            if stopped >= n or call is None:
                break
            try:
                answer = await call(replica, "stop-idle", {"owner": key, "count": min(live, n - stopped)})
                got = int(answer.get("stopped", 0))
            except Exception as exc:  # that replica did not answer: its workers count until its lease runs out
                logger.warning("replica %s did not stop idle workers: %s", replica, exc)
                continue
            theirs[replica] = max(0, live - got)
            stopped += got
        return stopped

    async def stop_idle(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Another replica's request: stop up to `count` idle workers of the owner `owner` (a key) here."""
        key = str(payload.get("owner", ""))
        try:
            count = max(0, min(int(payload.get("count", 0)), MAX_ASKED))
        except (TypeError, ValueError):
            count = 0
        stop = getattr(self.ctx.backend, "stop_idle_of", None)
        if stop is None or not count:
            return {"stopped": 0}
        cap = self.ctx.settings.max_live_containers_per_owner
        setting = f"CODE_INTERPRETER_MAX_LIVE_CONTAINERS_PER_OWNER={cap}, counted over the replicas"
        stopped = await stop(lambda owner: owner_key(owner) == key, count, setting)
        return {"stopped": int(stopped)}
