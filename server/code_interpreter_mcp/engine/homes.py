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
        self._claiming: dict[str, anyio.Lock] = {}
        self.back_since = 0.0  # monotonic time of the first beat on time after late ones
        ctx.reg.held_at = self.held_at
        self.last_beat = 0.0  # monotonic time of the last beat the database took
        self.caps: OwnerCaps | None = None  # with MAX_LIVE_CONTAINERS_PER_OWNER: owners' live workers counted

    @property
    def on_time(self) -> bool:
        return time.monotonic() - self.last_beat < self.leases.lease_s

    def held_at(self, session_id: str) -> tuple[str, int] | None:
        """(this replica, the epoch it holds the session at), None when it does not hold it."""
        epoch = self.held.get(session_id)
        return None if epoch is None else (self.leases.replica, epoch)

    async def hold(self, session: Session) -> Session:
        """The session, held here (see the module's docstring); the registry's fresh copy when adopted."""
        reg = self.ctx.reg
        if session.id in self.held and self.on_time and reg.sessions.get(session.id) is session:
            return session
        home = await self.claim(session.id)
        if home is not None:
            raise SessionElsewhere(f"Session {session.id} lives on the replica at {home}.")
        current = reg.sessions.get(session.id)
        return current if current is not None else await reg.get_session(session.id, session.owner)

    async def claim(self, session_id: str) -> str | None:
        """Hold the session here (free, ours, or adopted from a dead home), or the live replica that holds it.
        Claims of one session run one at a time, and an adoption drops this replica's old copy of the session,
        so that calls racing on it all read the one fresh copy (two copies would each start a container)."""
        lock = self._claiming.setdefault(session_id, anyio.Lock())
        try:
            async with lock:
                try:
                    claim = await anyio.to_thread.run_sync(self.leases.claim, session_id)
                except HeldElsewhere as exc:
                    return exc.home
                before = self.held.get(session_id)
                self.held[session_id] = claim.epoch
                if before != claim.epoch and not (before is None and claim.epoch == 1):
                    # Another replica had it since this copy was read (or it was adopted now): read it again.
                    logger.info("session %s adopted from %s (epoch %d)", session_id, claim.adopted_from, claim.epoch)
                    self.ctx.reg.sessions.pop(session_id, None)
                return None
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._claiming.pop(session_id, None)

    async def settled(self) -> bool:
        """Before taking a session from a home that looks dead: if this replica's own beats were late until a
        moment ago (the database was away), every replica's beat is old, the live ones' too; wait until they
        had a lease's time to beat again, so that a database outage moves no session. Whether it waited (then the
        home's beat is worth reading again)."""
        wait = self.back_since + self.leases.lease_s - time.monotonic()
        if wait > 0:
            await anyio.sleep(wait)
        return wait > 0

    async def beat(self) -> None:
        try:
            caps = self.caps
            late = self.last_beat > 0 and not self.on_time
            await anyio.to_thread.run_sync(self.leases.beat, caps.counts_here() if caps is not None else None)
            self.last_beat = time.monotonic()
            if late:
                self.back_since = self.last_beat
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
            reg.forget_pending(rec.state.id)
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
