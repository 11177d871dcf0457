"""The MCP face: builds the MCPServer (tools, the file resource template, lifespan) over one Engine.

Thin on purpose: argument shapes and descriptions, session/owner resolution from the MCP connection, and the
mapping of engine results and errors onto MCP content. Everything else is the engine's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.types import (
    BlobResourceContents,
    CallToolResult,
    ContentBlock,
    EmbeddedResource,
    ImageContent,
    InputRequiredResult,
    ResourceLink,
    TextContent,
    TextResourceContents,
    ToolAnnotations,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import AnyUrl, BaseModel, Field

from . import __version__
from .artifacts import URI_TEMPLATE, is_text_mime
from .config import Settings
from .engine import Engine
from .errors import CIError, NotFound
from .models import CloseResult, DownloadResult, FileInfo, FileList, RunResult, UploadResult, dump, published_schema
from .sessions import Session

logger = logging.getLogger(__name__)

INSTRUCTIONS = """\
A Python code interpreter with a stateful sandbox per session. Call run_code to execute Python: variables,
imports and files persist between calls in the same session (pass back the session_id every result returns).
The working directory is /mnt/data; every file the code writes there comes back as a file with a resource URI,
and images are shown inline. Files stay downloadable (download_file) even after the container expires.
"""

RUN_CODE_DESCRIPTION = """\
Execute Python code in this session's sandboxed interpreter and return stdout, stderr, the repr of the last
expression (like a notebook cell), any error with its traceback, and every file the code created or changed.

- State persists between calls of the same session: pass the session_id from the previous result.
- The working directory is /mnt/data. Write output files there (plots, CSV, Excel...); each one is returned with
  a file_id and a resource URI. Open matplotlib figures are saved as PNG automatically and shown inline.
- files: host paths or file_ids of earlier files to copy into /mnt/data before the run.
- output_schema: a JSON Schema. The run's JSON result is validated against it and returned in `json` (or
  `json_error` lists each violation by path). Provide the result by printing it between the lines
  ===BEGIN_JSON=== and ===END_JSON=== (the last such block wins; works on every backend at no extra cost), or,
  on the local backend, as the value of the code's LAST EXPRESSION (e.g. end with `result`, a dict). On the
  openai backend, code that prints no block gets the JSON written by the model from the code's output.
- Each result says when the container expires (idle expiry); after that a new container starts (state_lost:
  true), input files are uploaded again, and earlier files remain downloadable.
- No network access inside the sandbox. timeout_s stops runaway code (interrupt first, then restart).
"""


def _owner_of(token: AccessToken | None) -> str | None:
    if token is None:
        return None
    return "token:" + hashlib.sha256(token.token.encode()).hexdigest()[:24]


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


class CodeInterpreterServer(MCPServer[Engine]):
    """Serves our file URIs with each file's own mime type and owner check (a template has one fixed type)."""

    async def read_resource(
        self, uri: AnyUrl | str, context: Context | None = None
    ) -> Iterable[ReadResourceContents] | InputRequiredResult:
        engine = _engine_from(context) if context is not None else None
        if engine is None or not str(uri).startswith("ci://sessions/"):
            return await super().read_resource(uri, context)
        try:
            data, mime, _info = await engine.read_resource(str(uri), _owner_of(get_access_token()))
        except NotFound:
            raise ResourceNotFoundError(f"Unknown resource: {uri}") from None
        except CIError as exc:
            raise ToolError(exc.user_text()) from None
        content: str | bytes = data
        if is_text_mime(mime):
            try:
                content = data.decode("utf-8")
            except UnicodeDecodeError:
                content = data
        return [ReadResourceContents(content=content, mime_type=mime)]


def _engine_from(ctx: Context | None) -> Engine | None:
    try:
        return ctx.request_context.lifespan_context  # type: ignore[union-attr,no-any-return]
    except Exception:
        return None


def _connection_state(ctx: Context) -> dict[str, Any] | None:
    """The per-connection dict of a stateful (legacy) connection; None when every request stands alone."""
    conn = getattr(ctx.session, "_connection", None)  # private in mcp 2.3: ctx.session is per-request
    if conn is None or conn.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return None
    if ctx.headers is not None and conn.session_id is None:
        return None  # stateless HTTP rebuilds the connection per request
    return conn.state  # type: ignore[no-any-return]


async def _session(ctx: Context, session_id: str | None) -> tuple[Engine, Session]:
    engine: Engine = ctx.request_context.lifespan_context
    owner = _owner_of(get_access_token())
    stdio = ctx.headers is None
    state = None if session_id is not None else _connection_state(ctx)
    session = await engine.session_for(session_id, owner, connection_state=state, use_default=stdio and state is None)
    return engine, session


def _fail(exc: BaseException) -> ToolError:
    if isinstance(exc, CIError):
        return ToolError(exc.user_text())
    logger.exception("internal error")
    return ToolError(
        "[internal_error] The server hit an unexpected error; details are in its log. "
        "Hint: try again; if it persists, report it with the log."
    )


def _summary(r: RunResult) -> str:
    lines = [
        f"status: {r.status} · {r.duration_ms:.0f} ms · session {r.session_id} · container {r.container_id}"
        + (f" (expires {r.container.expires_at:%Y-%m-%d %H:%M:%S}Z)" if r.container.expires_at else "")
    ]
    for w in r.warnings:
        lines.append(f"warning: {w}")
    if r.stdout:
        lines.append("stdout:\n" + _short(r.stdout))
    if r.stderr:
        lines.append("stderr:\n" + _short(r.stderr))
    if r.result is not None:
        lines.append("result: " + _short(r.result, 1000))
    if r.error is not None:
        tb = r.error.traceback or f"{r.error.type}: {r.error.message}"
        lines.append("error:\n" + _short(tb))
    if r.text:
        lines.append("model:\n" + _short(r.text))
    if r.json_ is not None:
        lines.append("json: valid (see structuredContent.json)")
    if r.json_error is not None:
        lines.append(
            "json_error: "
            + r.json_error.message
            + "".join(f"\n  {v.path}: {v.message}" for v in r.json_error.violations[:20])
        )
    for f in r.files:
        lines.append(f"file: {f.path} ({f.bytes} bytes, {f.mime_type}) id={f.file_id} uri={f.uri}")
    if r.truncated:
        lines.append("(output truncated to the result budget)")
    return "\n".join(lines)


def _short(text: str, limit: int = 4000) -> str:
    # The full (budgeted) text is in structuredContent; the summary keeps the end, where errors are.
    return text if len(text) <= limit else "…" + text[-limit:]


def _link(f: FileInfo) -> ResourceLink:
    return ResourceLink(
        name=f.name,
        uri=f.uri,
        mime_type=f.mime_type,
        size=f.bytes,
        description=f"{f.path} in the container ({f.source})",
    )


def build_server(settings: Settings, engine: Engine | None = None) -> CodeInterpreterServer:
    """The MCPServer for these settings. `engine` may be passed by tests; it is started by the lifespan."""

    @asynccontextmanager
    async def lifespan(server: MCPServer[Engine]) -> AsyncIterator[Engine]:
        eng = engine if engine is not None else Engine(settings)
        async with eng.running():
            yield eng

    auth_kwargs: dict[str, Any] = {}
    if settings.transport == "http" and settings.auth_token is not None:
        tokens = [t.strip() for t in settings.auth_token.get_secret_value().split(",")]
        base = f"http://{settings.host}:{settings.port}"
        auth_kwargs = {
            "token_verifier": StaticTokenVerifier(tokens),
            "auth": AuthSettings(
                issuer_url=base, resource_server_url=f"{base}/mcp", required_scopes=[], validate_token_resource=False
            ),
        }

    mcp = CodeInterpreterServer(
        name="code-interpreter-mcp",
        title="Code Interpreter",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        log_level=settings.log_level.upper()
        if settings.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        else "WARNING",  # type: ignore[arg-type]
        **auth_kwargs,
    )
    open_world = settings.backend != "local"

    @mcp.tool(
        title="Run Python code",
        description=RUN_CODE_DESCRIPTION,
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=open_world
        ),
    )
    async def run_code(
        code: Annotated[str, Field(description="Python source to execute (a notebook cell).")],
        ctx: Context[Engine],
        session_id: Annotated[
            str | None, Field(description="Session to run in; omit to use this client's session (or start one).")
        ] = None,
        files: Annotated[
            list[str] | None, Field(description="Host paths or file_ids to copy into /mnt/data before the run.")
        ] = None,
        output_schema: Annotated[
            dict[str, Any] | None,
            Field(description="JSON Schema the run's JSON result must match (see the tool description)."),
        ] = None,
        timeout_s: Annotated[float | None, Field(description="Wall-clock limit in seconds.", gt=0)] = None,
        instructions: Annotated[
            str | None, Field(description="openai backend only: extra guidance to the model.")
        ] = None,
        json_strategy: Annotated[
            Literal["two_pass_sentinel", "single_pass"] | None,
            Field(description="openai backend: how the JSON result is obtained."),
        ] = None,
    ) -> Annotated[CallToolResult, RunResult]:
        try:
            engine, session = await _session(ctx, session_id)

            async def progress(done: float, total: float | None, message: str) -> None:
                await ctx.report_progress(done, total, message)

            out = await engine.run_code(
                session,
                code,
                files=files,
                output_schema=output_schema,
                timeout_s=timeout_s,
                instructions=instructions,
                json_strategy=json_strategy,
                progress=progress,
            )
        except Exception as exc:
            raise _fail(exc) from None
        r = out.result
        content: list[ContentBlock] = [TextContent(text=_summary(r))]
        for img in out.images:
            content.append(ImageContent(data=base64.b64encode(img.data).decode(), mime_type=img.mime_type))
        content.extend(_link(f) for f in r.files)
        return CallToolResult(content=content, structured_content=dump(r), is_error=r.status != "ok")

    @mcp.tool(
        title="List container files",
        description="List the files in the session's container (/mnt/data) with their file_ids, sizes, types and "
        "resource URIs. When the container has expired, lists the harvested copies, which stay downloadable. "
        "all_containers=true lists every file the session ever produced or uploaded.",
        annotations=ToolAnnotations(
            read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=open_world
        ),
    )
    async def list_container_files(
        ctx: Context[Engine],
        session_id: str | None = None,
        container_id: Annotated[
            str | None, Field(description="One of this session's containers; default: the current one.")
        ] = None,
        all_containers: bool = False,
    ) -> FileList:
        try:
            engine, session = await _session(ctx, session_id)
            return await engine.list_files(session, container_id, all_containers)
        except Exception as exc:
            raise _fail(exc) from None

    @mcp.tool(
        title="Download a file",
        description="Get a file the code made (or an upload) by file_id, resource URI or path in /mnt/data. "
        "Small files come back inline (images as images, text as text); larger ones, or when save_to is given, "
        "are saved on the server's host (save_to: a directory or a file path) and the path is returned. Works "
        "after the container expired. Symlinks and paths outside /mnt/data are refused.",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=open_world
        ),
    )
    async def download_file(
        file: Annotated[str, Field(description="file_id, resource URI, or path relative to /mnt/data.")],
        ctx: Context[Engine],
        session_id: str | None = None,
        container_id: str | None = None,
        save_to: Annotated[str | None, Field(description="Absolute host directory or file path to save to.")] = None,
        overwrite: bool = False,
    ) -> Annotated[CallToolResult, DownloadResult]:
        try:
            engine, session = await _session(ctx, session_id)
            out = await engine.download(session, file, container_id, save_to, overwrite)
        except Exception as exc:
            raise _fail(exc) from None
        r = out.result
        f = r.file
        content: list[ContentBlock] = []
        if out.data is not None:
            if f.mime_type.startswith("image/") and f.mime_type != "image/svg+xml":
                content.append(ImageContent(data=base64.b64encode(out.data).decode(), mime_type=f.mime_type))
            elif is_text_mime(f.mime_type):
                try:
                    text = out.data.decode("utf-8")
                    content.append(
                        EmbeddedResource(resource=TextResourceContents(uri=f.uri, mime_type=f.mime_type, text=text))
                    )
                except UnicodeDecodeError:
                    content.append(
                        EmbeddedResource(
                            resource=BlobResourceContents(
                                uri=f.uri, mime_type=f.mime_type, blob=base64.b64encode(out.data).decode()
                            )
                        )
                    )
            else:
                content.append(
                    EmbeddedResource(
                        resource=BlobResourceContents(
                            uri=f.uri, mime_type=f.mime_type, blob=base64.b64encode(out.data).decode()
                        )
                    )
                )
        summary = f"{f.path}: {f.bytes} bytes, {f.mime_type}, sha256 {f.sha256}"
        if r.saved_to:
            summary += f"\nsaved to {r.saved_to}"
        content.insert(0, TextContent(text=summary))
        content.append(_link(f))
        return CallToolResult(content=content, structured_content=dump(r))

    @mcp.tool(
        title="Upload a file",
        description="Put a file into the session's container (/mnt/data): either a host path, or name plus "
        "content_base64. dest_path sets the path inside /mnt/data (default: the name). Uploads are re-uploaded "
        "automatically if the container expires.",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=open_world
        ),
    )
    async def upload_file(
        ctx: Context[Engine],
        path: Annotated[str | None, Field(description="Absolute path of a file on the server's host.")] = None,
        name: Annotated[str | None, Field(description="File name (required with content_base64).")] = None,
        content_base64: Annotated[str | None, Field(description="The file's bytes, base64-encoded.")] = None,
        dest_path: Annotated[str | None, Field(description="Path inside /mnt/data.")] = None,
        session_id: str | None = None,
    ) -> UploadResult:
        try:
            engine, session = await _session(ctx, session_id)
            return await engine.upload(
                session, path=path, name=name, content_base64=content_base64, dest_path=dest_path
            )
        except Exception as exc:
            raise _fail(exc) from None

    @mcp.tool(
        title="Close a session",
        description="Stop and delete the session's containers now (nothing left running or billing). Harvested "
        "files stay on the host unless delete_files=true.",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=open_world
        ),
    )
    async def close_session(
        ctx: Context[Engine],
        session_id: str | None = None,
        delete_files: bool = False,
    ) -> CloseResult:
        try:
            engine, session = await _session(ctx, session_id)
            return await engine.close_session(session, delete_files)
        except Exception as exc:
            raise _fail(exc) from None

    @mcp.resource(
        URI_TEMPLATE,
        name="container_file",
        title="A file from a code-interpreter session",
        description="A file harvested from a session's container (served with its own mime type).",
        mime_type="application/octet-stream",
    )
    async def container_file(session_id: str, file_id: str, name: str, ctx: Context) -> bytes:
        engine: Engine = ctx.request_context.lifespan_context
        try:
            data, _mime, _info = await engine.read_resource(
                URI_TEMPLATE.format(session_id=session_id, file_id=file_id, name=name), _owner_of(get_access_token())
            )
        except NotFound:
            raise ResourceNotFoundError("Unknown resource") from None
        return data

    _publish_flat_schemas(
        mcp,
        {
            "run_code": RunResult,
            "list_container_files": FileList,
            "download_file": DownloadResult,
            "upload_file": UploadResult,
            "close_session": CloseResult,
        },
    )
    return mcp


def _publish_flat_schemas(mcp: MCPServer[Engine], models: dict[str, type[BaseModel]]) -> None:
    """Advertise the flat form of each output schema (see models.published_schema). The SDK keeps validating
    results with the pydantic model itself; only the published JSON changes."""
    for name, model in models.items():
        tool = mcp._tool_manager.get_tool(name)  # no public setter in mcp 2.3
        if tool is not None and getattr(tool, "fn_metadata", None) is not None:
            tool.fn_metadata.output_schema = published_schema(model)
