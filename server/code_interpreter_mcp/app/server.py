"""The MCP server: one MCPServer over one Engine, assembled from the face's parts.

Owns the server object (name, instructions, lifespan that starts and stops the engine, auth options, log level)
and the order of assembly: tools, file resources, published schemas. Protocol extensions (MCP tasks over the
engine's runs) are additive `Extension`s, each in its own module, passed to the server here; both transports
run behind the JSON-RPC screen (`stdio`, `http_screen`). Knows nothing of any
one tool's arguments or content.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import (
    CallToolResult,
    InputRequiredResult,
    ListToolsResult,
    PaginatedRequestParams,
    ServerCapabilities,
    ServerTasksCapability,
    ToolExecution,
)
from mcp.types import Tool as MCPTool
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import AnyUrl
from starlette.applications import Starlette
from starlette.middleware import Middleware

from .. import __version__
from ..config import Settings
from ..engine import Engine
from . import cancels
from .auth import auth_options
from .clients import client_profile
from .content import for_client
from .forward import FORWARDED, TOOL, ForwardScreen, forwarder_of
from .http_screen import JsonRpcScreen
from .oversize import message_limit
from .passthrough import PassThrough
from .resources import add_file_resources, read_file_resource
from .schemas import publish_flat_schemas, tools_for_client
from .stdio import stdio_streams
from .tasks import TASK_TOOLS, RunTasks, legacy_capabilities
from .tools import add_tools
from .view import negotiated, view_extension, with_view

INSTRUCTIONS = """\
A Python code interpreter with a stateful sandbox per session. Call run_code to execute Python: variables,
imports and files persist between calls in the same session (pass back the session_id every result returns).
The working directory is /mnt/data; every file the code writes there comes back as a file with a resource URI,
and images are shown inline. Files stay downloadable (download_file) even after the container expires.
"""

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class CodeInterpreterServer(MCPServer[Engine]):
    """Serves our file URIs with each file's own mime type and owner check (a template has one fixed type), and
    lists tools and shapes results for the client asking (see `clients`)."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ci_settings = settings  # MCPServer has a `settings` of its own
        self.view_served = False  # set when the app view's extension is in (see `view`)
        self.engine: Engine | None = None  # the running engine, for the replicas' own calls

    async def _handle_list_tools(
        self, ctx: ServerRequestContext[Engine], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        listed = tools_for_client(await super()._handle_list_tools(ctx, params), client_profile(ctx, self.ci_settings))
        return with_view(listed) if self.view_served and negotiated(ctx) else listed

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Engine, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        result = await super().call_tool(name, arguments, context)
        if isinstance(result, CallToolResult) and context is not None and FORWARDED.get() != TOOL:
            return for_client(result, client_profile(context, self.ci_settings))
        return result

    async def read_resource(
        self, uri: AnyUrl | str, context: Context | None = None
    ) -> Iterable[ReadResourceContents] | InputRequiredResult:
        ours = await read_file_resource(str(uri), context)
        return ours if ours is not None else await super().read_resource(uri, context)

    async def run_stdio_async(self) -> None:
        """stdio through our transport, which answers every malformed line (the SDK's drops them)."""
        limit = message_limit(self.ci_settings, "stdio")
        async with stdio_streams(limit=limit, spill_dir=self.ci_settings.data_dir) as (read_stream, write_stream):
            lowlevel = self._lowlevel_server
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())

    def streamable_http_app(self, **kwargs: Any) -> Starlette:
        """The SDK's app behind the JSON-RPC screen, which answers every malformed POST per the spec."""
        limit = message_limit(self.ci_settings, "http")
        if "max_request_body_size" in kwargs:
            limit = replace(limit, max_bytes=kwargs["max_request_body_size"])
        # The SDK's own cap is the same: only the screen meets an over-limit body, and answers it with its id.
        app = super().streamable_http_app(**{**kwargs, "max_request_body_size": limit.max_bytes})
        path = kwargs.get("streamable_http_path", "/mcp")
        app.add_middleware(JsonRpcScreen, path=path, limit=limit)
        secret = self.ci_settings.cluster_secret
        if secret is not None:  # replicas: innermost, inside the SDK's authentication (`passthrough`)
            app.user_middleware.append(Middleware(PassThrough, engine_of=lambda: self.engine, path=path))
        app.add_middleware(
            ForwardScreen,
            secret=secret.get_secret_value() if secret else None,
            max_bytes=limit.max_bytes,
            internal=self._replica_call,
        )
        return app

    async def _replica_call(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Another replica's own call (verified by the screen): the engine's answer."""
        engine = self.engine
        caps = engine.ctx.homes.caps if engine is not None and engine.ctx.homes is not None else None
        if name == "stop-idle" and caps is not None:
            return await caps.stop_idle(payload)
        raise ValueError(f"no replica call {name!r} here")

    async def list_tools(self) -> list[MCPTool]:
        tools = await super().list_tools()
        for t in tools:
            if t.name in TASK_TOOLS:  # 2025-11-25 clients read it; the later era drops the field
                t.execution = ToolExecution(task_support="optional")
        return tools


def _advertise_legacy_tasks(mcp: MCPServer[Engine]) -> None:
    """Add the 2025-11-25 `tasks` capability to the handshake's capabilities (the SDK derives them from its
    handlers, and tasks are an extension there); the modern era advertises the extension instead."""
    low = mcp._lowlevel_server
    derive = low.get_capabilities

    def get_capabilities(*args: Any, **kwargs: Any) -> ServerCapabilities:
        caps = derive(*args, **kwargs)
        if kwargs.get("protocol_version") not in MODERN_PROTOCOL_VERSIONS:
            caps.tasks = ServerTasksCapability.model_validate(legacy_capabilities())
        return caps

    low.get_capabilities = get_capabilities  # type: ignore[method-assign]


def build_server(settings: Settings, engine: Engine | None = None) -> CodeInterpreterServer:
    """The MCPServer for these settings. `engine` may be passed by tests; it is started by the lifespan."""

    @asynccontextmanager
    async def lifespan(server: MCPServer[Engine]) -> AsyncIterator[Engine]:
        eng = engine if engine is not None else Engine(settings)
        if settings.cluster_secret is not None:
            eng.ctx.replica_call = forwarder_of(eng).internal
        async with eng.running():
            if isinstance(server, CodeInterpreterServer):
                server.engine = eng
            yield eng

    level = settings.log_level.upper()
    tasks = RunTasks()
    view = view_extension(settings)
    mcp = CodeInterpreterServer(
        settings,
        name="code-interpreter-mcp",
        title="Code Interpreter",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        log_level=level if level in _LOG_LEVELS else "WARNING",  # type: ignore[arg-type]
        extensions=[tasks] if view is None else [tasks, view],
        middleware=[cancels.REASONS.middleware, tasks.middleware],
        **auth_options(settings),
    )
    mcp.view_served = view is not None
    _advertise_legacy_tasks(mcp)
    add_tools(mcp, settings)
    add_file_resources(mcp)
    publish_flat_schemas(mcp)
    return mcp
