"""Who is calling: the operator's static bearer tokens on HTTP, and the owner of sessions each token stands for.

Owns token verification (constant time) and the mapping of a token onto an owner id. Knows nothing of tools,
content or the engine; stdio and in-memory connections never authenticate, so their owner is None.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

from ..config import Settings


class StaticTokenVerifier:
    """Bearer tokens from the operator's configuration; each distinct token is its own owner of sessions."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [t for t in tokens if t]

    async def verify_token(self, token: str) -> AccessToken | None:
        # Compare every token in constant time: how long a refusal takes must not tell how close a guess was.
        matched = [hmac.compare_digest(token.encode(), t.encode()) for t in self._tokens]
        if not any(matched):
            return None
        return AccessToken(token=token, client_id="static", scopes=[])


def owner_of(token: AccessToken | None) -> str | None:
    """The owner id of a token (a hash: the token itself is never stored), None without one."""
    if token is None:
        return None
    return "token:" + hashlib.sha256(token.token.encode()).hexdigest()[:24]


def current_owner() -> str | None:
    """The owner of the request being handled."""
    return owner_of(get_access_token())


def auth_options(settings: Settings) -> dict[str, Any]:
    """The MCPServer keyword arguments that turn on bearer auth: on HTTP with tokens configured, else none."""
    if settings.transport != "http" or settings.auth_token is None:
        return {}
    tokens = [t.strip() for t in settings.auth_token.get_secret_value().split(",")]
    # No resource_server_url: static tokens have no OAuth authorization server, and advertising one (protected
    # resource metadata naming `issuer_url`) sends clients such as mcp-remote into a registration that 404s.
    # The SDK requires an issuer_url all the same; nothing publishes it.
    base = f"http://{settings.host}:{settings.port}"
    return {
        "token_verifier": StaticTokenVerifier(tokens),
        "auth": AuthSettings(
            issuer_url=base, resource_server_url=None, required_scopes=[], validate_token_resource=False
        ),
    }
