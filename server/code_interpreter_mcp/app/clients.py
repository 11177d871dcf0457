"""Who the client is, as far as its results' shape goes: the protocol version it speaks, the name it gives, and
from them the `ClientProfile` that `content` and the tool listing follow.

The name comes from `clientInfo` at `initialize` (2025-11-25 and earlier) or from the request's `_meta`
(`io.modelcontextprotocol/clientInfo`, 2026-07-28), both read by the SDK into `client_params`.

Clients that drop `content` when `structuredContent` is present (the model gets `JSON.stringify(structuredContent)`
only, so no image and no summary reaches it), checked against their own trackers:
- `claude-code` (Claude Code): anthropics/claude-code #54737 (images dropped), #55677 and #79944 (text dropped;
  still so in 2.1.280, with or without an `outputSchema`);
- `codex-mcp-client` (OpenAI Codex) and `opencode`: opencode's PR #32074 prefers `structuredContent` over
  `content` "to match Codex", and its maintainers confirm that both do (anomalyco/opencode PR #32868).
Not in the list: VS Code (it reads `content`; microsoft/vscode #254329 asks for `structuredContent` support) and
GitHub Copilot CLI (exposes both since github/copilot-cli #3258; #4515). Those get both, as does everyone else.

`CODE_INTERPRETER_RESULT_SHAPE` overrides the detection: `both` | `content_only` | `auto` (the list above, plus
every client older than 2025-06-18, which has no `structuredContent` at all). `resource_link` blocks exist from
2025-06-18 on; `CODE_INTERPRETER_RESOURCE_LINKS` chooses which files get them. Knows nothing of tools or results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mcp_types import CLIENT_INFO_META_KEY

from ..config import Settings
from ..engine.budget import budget_chars, summary_room

DROPS_CONTENT = frozenset({"claude-code", "codex-mcp-client", "opencode"})
STRUCTURED_SINCE = "2025-06-18"  # structuredContent, outputSchema and resource_link all arrived then


@dataclass(frozen=True)
class ClientProfile:
    name: str | None
    protocol_version: str | None
    content_only: bool  # the text carries the whole result: no structuredContent, no outputSchema
    links: bool  # resource_link blocks are understood (and not turned off)
    link_mode: str  # all | non_inline | none
    budget: int  # characters of text + structuredContent
    summary_room: int  # characters of the summary next to structuredContent
    stdio: bool
    host_paths: bool = True  # results may carry host paths (`local_path`): only to callers allowed to name them

    def link_for(self, inline: bool) -> bool:
        """Does a file get a resource_link block? Not when its whole body is already inline, unless asked."""
        return self.links and (self.link_mode == "all" or (self.link_mode == "non_inline" and not inline))


def client_name(rc: Any) -> str | None:
    """The name the client gave: from the handshake or the 2026 envelope, else from the raw `_meta`."""
    params = getattr(getattr(rc, "session", None), "client_params", None)
    info = getattr(params, "client_info", None)
    if info is not None and getattr(info, "name", None):
        return str(info.name)
    meta = getattr(rc, "meta", None)
    raw = meta.get(CLIENT_INFO_META_KEY) if isinstance(meta, dict) else None
    return str(raw["name"]) if isinstance(raw, dict) and isinstance(raw.get("name"), str) else None


def protocol_version(rc: Any) -> str | None:
    version = getattr(rc, "protocol_version", None) or getattr(getattr(rc, "session", None), "protocol_version", None)
    return version if isinstance(version, str) else None


_KNOWN: dict[tuple[int, str | None, str | None], tuple[Settings, ClientProfile]] = {}
KNOWN_PROFILES = 256  # distinct (settings, client name, version) kept; client names are the caller's to choose


def profile_for(settings: Settings, name: str | None, version: str | None) -> ClientProfile:
    """The profile of one client, worked out once per (settings, name, version): every call asks for it."""
    key = (id(settings), name, version)
    known = _KNOWN.get(key)
    if known is not None and known[0] is settings:
        return known[1]
    profile = _profile_for(settings, name, version)
    if len(_KNOWN) >= KNOWN_PROFILES:
        _KNOWN.clear()
    _KNOWN[key] = (settings, profile)
    return profile


def _profile_for(settings: Settings, name: str | None, version: str | None) -> ClientProfile:
    modern = version is None or version >= STRUCTURED_SINCE  # dated versions compare as strings
    shape = settings.result_shape
    if shape == "auto":
        content_only = not modern or (name or "").strip().lower() in DROPS_CONTENT
    else:
        content_only = shape == "content_only"
    return ClientProfile(
        name=name,
        protocol_version=version,
        content_only=content_only,
        links=modern and settings.resource_links != "none",
        link_mode=settings.resource_links,
        budget=budget_chars(settings),
        summary_room=summary_room(settings),
        stdio=settings.transport == "stdio",
        host_paths=settings.host_paths_allowed,
    )


def client_profile(ctx: Any, settings: Settings) -> ClientProfile:
    """The profile of the client behind a request (a tool's `Context` or a low-level request context)."""
    rc = getattr(ctx, "request_context", ctx)
    return profile_for(settings, client_name(rc), protocol_version(rc))
