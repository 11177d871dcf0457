"""The file resources: the template that lists every session file's URI, and reading one with its own mime type.

Owns `resources/read` for our `ci://sessions/...` URIs: the owner check (a foreign or unknown URI is "not found",
never the data) and the file's own mime type, which a template cannot give (it has one fixed type). Knows nothing
of tools.
"""

from __future__ import annotations

from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError

from ..artifacts import URI_SCHEME, URI_TEMPLATE
from ..engine import Engine
from ..errors import CIError, NotFound
from .auth import current_owner
from .content import resource_contents
from .context import engine_from

_OUR_URIS = f"{URI_SCHEME}://sessions/"


def add_file_resources(mcp: MCPServer[Engine]) -> None:
    """Register the template clients list; reads of its URIs go through `read_file_resource`."""

    @mcp.resource(
        URI_TEMPLATE,
        name="container_file",
        title="A file from a code-interpreter session",
        description="A file harvested from a session's container (served with its own mime type).",
        mime_type="application/octet-stream",
    )
    async def container_file(session_id: str, file_id: str, name: str, ctx: Context) -> bytes:
        engine: Engine = ctx.request_context.lifespan_context
        data, _mime = await _read(engine, URI_TEMPLATE.format(session_id=session_id, file_id=file_id, name=name))
        return data


async def read_file_resource(uri: str, context: Context | None) -> list[ReadResourceContents] | None:
    """One of our files with its own mime type; None for URIs that are not ours (or outside a request), which
    the SDK's own resource handling then serves."""
    engine = engine_from(context) if context is not None else None
    if engine is None or not uri.startswith(_OUR_URIS):
        return None
    data, mime = await _read(engine, uri)
    return resource_contents(data, mime)


async def _read(engine: Engine, uri: str) -> tuple[bytes, str]:
    try:
        data, mime, _info = await engine.read_resource(uri, current_owner())
    except NotFound:
        raise ResourceNotFoundError(f"Unknown resource: {uri}") from None
    except CIError as exc:
        raise ToolError(exc.user_text()) from None
    return data, mime
