"""The published output schemas: every tool advertises the flat form of its result model, and none at all to a
client that reads only `content` (the spec requires `structuredContent` whenever an `outputSchema` is declared).

Owns the one reach into the SDK's tool registry that publishing needs (mcp 2.3 has no public setter). The SDK keeps
validating results with the pydantic model itself; only the JSON in `tools/list` changes. The flattening is
`models.published_schema`; this module only applies it. Knows nothing of what the tools do.
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from mcp.types import ListToolsResult
from pydantic import BaseModel

from ..engine import Engine
from ..models import published_schema
from .clients import ClientProfile


def publish_flat_schemas(mcp: MCPServer[Engine]) -> None:
    """Replace each registered tool's derived output schema by the flat one of the model it returns."""
    for tool in mcp._tool_manager.list_tools():
        meta = getattr(tool, "fn_metadata", None)
        model = getattr(meta, "output_model", None)
        if meta is not None and isinstance(model, type) and issubclass(model, BaseModel):
            meta.output_schema = published_schema(model)


def tools_for_client(listed: ListToolsResult, p: ClientProfile) -> ListToolsResult:
    """`tools/list` as this client gets it: without output schemas when it reads only `content`."""
    if not p.content_only:
        return listed
    return listed.model_copy(update={"tools": [t.model_copy(update={"output_schema": None}) for t in listed.tools]})
