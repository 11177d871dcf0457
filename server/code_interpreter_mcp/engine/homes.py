"""This replica's part in a group of replicas (`REPLICA_URL`): the sessions it is home to, held by leases in the
shared registry (`storage.leases`), kept alive by its beat, taken over from a dead home, and let go when another
replica adopted them meanwhile.

- `hold`: before a call uses a session. Free or already ours: held (after the first time, from memory, while this
  replica's beats are on time; the warm path asks the database nothing). A dead home's: adopted, the session read
  again from the registry (its files from the registry, its bytes from the shared store, its variables from its
  snapshot when its first container starts), the runs it had in flight marked lost. A live home's:
  `SessionElsewhere`, retryable, naming that replica.
- `beat`: every `LEASE_S / 3` (the housekeeping): this replica is alive; sessions adopted elsewhere are dropped
  here without a write (their containers stopped, the session forgotten in memory). Beats late past `LEASE_S`
  (the database unreachable, a paused process) make every lease here doubtful: each is claimed again at its next
  use.
- `release`: a graceful stop frees the sessions at once.
- With `MAX_LIVE_CONTAINERS_PER_OWNER`, each beat also counts the owners' live workers here and reads the other
  replicas' counts back (`owner_caps`).

Knows the registry, the backend's containers and the leases; nothing of MCP.
"""

from __future__ import annotations

import logging
import time

import anyio

from ..errors import CIError, SessionElsewhere
from ..sessions import Session
from ..storage.leases import HeldElsewhere, Leases
from .context import EngineContext
from .owner_caps import OwnerCaps

logger = logging.getLogger(__name__)


class Homes:
    def __init__(self, ctx: EngineContext, leases: Leases) -> None:
        self.ctx, self.leases = ctx, leases
        self.held: dict[str, int] = {}  # session id -> the epoch this replica holds it at
        self.last_beat = 0.0  # monotonic time of the last beat the database took
        self.caps: OwnerCaps | None = None  # with MAX_LIVE_CONTAINERS_PER_OWNER: owners' live workers counted

    @property
    def on_time(self) -> bool:
        return time.monotonic() - self.last_beat < self.leases.lease_s

    async def hold(self, session: Session) -> Session:
        """The session, held here (see the module's docstring); the registry's fresh copy when adopted."""
        if session.id in self.held and self.on_time:
            return session
        try:
            claim = await anyio.to_thread.run_sync(self.leases.claim, session.id)
        except HeldElsewhere as exc:
            raise SessionElsewhere(f"Session {session.id} lives on the replica at {exc.home}.") from None
        before = self.held.get(session.id)
        self.held[session.id] = claim.epoch
        if before == claim.epoch or (before is None and claim.epoch == 1):
            return session  # ours all along, or new: this copy is the registry's
        # Another replica had it since this copy was read (or it was adopted now): read it again.
        logger.info("session %s adopted from %s (epoch %d)", session.id, claim.adopted_from, claim.epoch)
        reg = self.ctx.reg
        reg.sessions.pop(session.id, None)
        return await reg.get_session(session.id, session.owner)

    async def beat(self) -> None:
        try:
            caps = self.caps
            await anyio.to_thread.run_sync(self.leases.beat, caps.counts_here() if caps is not None else None)
            self.last_beat = time.monotonic()
            if caps is not None:
                await anyio.to_thread.run_sync(caps.read_back)
            lost = await anyio.to_thread.run_sync(self.leases.lost, dict(self.held))
        except CIError as exc:
            logger.warning("replica beat failed: %s", exc.message)
            return
        for sid in lost:
            await self._drop(sid)

    async def _drop(self, session_id: str) -> None:
        """Another replica is the session's home now: its containers here stop, nothing is written."""
        self.held.pop(session_id, None)
        reg = self.ctx.reg
        reg.sessions.pop(session_id, None)
        logger.warning("session %s was adopted by another replica: dropped here", session_id)
        for rec in [r for r in reg.containers.values() if r.session_id == session_id]:
            reg.containers.pop(rec.state.id, None)
            try:
                await self.ctx.backend.destroy(rec.state)
            except Exception:
                logger.exception("could not stop container %s of a dropped session", rec.state.id)

    async def release(self) -> None:
        ids, self.held = list(self.held), {}
        try:
            await anyio.to_thread.run_sync(self.leases.release, ids)
        except CIError as exc:
            logger.warning("leases not released (they run out in %.0f s): %s", self.leases.lease_s, exc.message)
