"""Which session a call uses: the explicit id; else the connection's own (kept in the connection's state); else
the process default per owner (stdio: one client per process); else a new one.

It knows the registry's sessions and ownership; it knows nothing of containers, runs or MCP (the face passes the
connection's state as a plain dict).
"""

from __future__ import annotations

from typing import Any

from ..errors import BadInput, NotFound
from ..sessions import Registry, Session
from .context import EngineContext

CONNECTION_KEY = "ci.session_id"


class SessionChooser:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self._defaults: dict[str | None, str] = {}  # owner -> the process default session's id

    async def session_for(
        self,
        session_id: str | None,
        owner: str | None = None,
        connection_state: dict[str, Any] | None = None,
        use_default: bool = False,
    ) -> Session:
        """Which session a call uses: the explicit id; else the connection's own; else the process default
        (stdio: one client per process); else a new one. Held here first when replicas share the registry."""
        session = await self._choose(session_id, owner, connection_state, use_default)
        homes = self.ctx.homes
        return session if homes is None else await homes.hold(session)

    async def _choose(
        self, session_id: str | None, owner: str | None, connection_state: dict[str, Any] | None, use_default: bool
    ) -> Session:
        reg = self.ctx.reg
        if session_id is not None:
            if not isinstance(session_id, str) or not session_id:
                raise BadInput("session_id must be a non-empty string.")
            return await reg.get_session(session_id, owner)
        if connection_state is not None:
            session = await self._kept_or_new(reg, owner, connection_state.get(CONNECTION_KEY))
            connection_state[CONNECTION_KEY] = session.id
            return session
        if use_default:
            session = await self._kept_or_new(reg, owner, self._defaults.get(owner))
            self._defaults[owner] = session.id
            return session
        return await reg.create_session(owner)

    @staticmethod
    async def _kept_or_new(reg: Registry, owner: str | None, sid: str | None) -> Session:
        """The kept session if it still exists (and is the owner's), else a new one."""
        if sid is not None:
            try:
                return await reg.get_session(sid, owner)
            except NotFound:
                pass
        return await reg.create_session(owner)

    def forget(self, session: Session) -> None:
        """A closed session is no longer anyone's default."""
        for owner, sid in list(self._defaults.items()):
            if sid == session.id:
                del self._defaults[owner]
