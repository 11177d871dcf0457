"""What the MCP connection says about a call: the engine serving it, and which session it uses.

Owns reading the request context (the lifespan's engine, the stateful connection's own state, stdio or HTTP) and
turning it, with the caller's `session_id` and token owner, into an engine session. Facts about the client that
other parts of the face need later (its negotiated protocol version, for content shaping) are read here too.
Knows nothing of tools or content.
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import Context
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from ..engine import Engine
from ..sessions import Session
from .auth import current_owner


def engine_from(ctx: Context | None) -> Engine | None:
    """The engine the lifespan started, or None outside a request (no request context yet)."""
    try:
        return ctx.request_context.lifespan_context  # type: ignore[union-attr,no-any-return]
    except Exception:
        return None


def connection_state(ctx: Context) -> dict[str, Any] | None:
    """The per-connection dict of a stateful (legacy) connection; None when every request stands alone."""
    conn = getattr(ctx.session, "_connection", None)  # private in mcp 2.3: ctx.session is per-request
    if conn is None or conn.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return None
    if ctx.headers is not None and conn.session_id is None:
        return None  # stateless HTTP rebuilds the connection per request
    return conn.state  # type: ignore[no-any-return]


async def resolve_session(ctx: Context[Engine], session_id: str | None) -> tuple[Engine, Session]:
    """The engine and the session a tool call uses: the explicit id, else the connection's own session, else
    (stdio, one client per process) the default one, else a new one."""
    engine: Engine = ctx.request_context.lifespan_context
    stdio = ctx.headers is None
    state = None if session_id is not None else connection_state(ctx)
    session = await engine.session_for(
        session_id, current_owner(), connection_state=state, use_default=stdio and state is None
    )
    return engine, session
