"""The mapping of engine results and errors onto MCP content: summaries, images, embedded files, links, ToolError.

Owns what a client sees besides `structuredContent`: a short text summary (never the same JSON twice), an image
block for each inline image, a resource link for each file, inline file bodies, and the one way an exception
becomes a `ToolError`. Shaping content per client (which content types a negotiated protocol version gets, for
clients that drop `content`) belongs here. Knows nothing of argument shapes, sessions or how results are made.
"""

from __future__ import annotations

import base64
import logging

from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import (
    BlobResourceContents,
    CallToolResult,
    ContentBlock,
    EmbeddedResource,
    ImageContent,
    ResourceLink,
    TextContent,
    TextResourceContents,
)

from ..artifacts import is_text_mime
from ..engine import DownloadOutput, RunOutput
from ..errors import CIError
from ..models import FileInfo, RunResult, dump

logger = logging.getLogger(__name__)


def tool_error(exc: BaseException) -> ToolError:
    """A taxonomy error keeps its message and hint; anything else is logged and reported without details."""
    if isinstance(exc, CIError):
        return ToolError(exc.user_text())
    logger.exception("internal error")
    return ToolError(
        "[internal_error] The server hit an unexpected error; details are in its log. "
        "Hint: try again; if it persists, report it with the log."
    )


def run_result(out: RunOutput) -> CallToolResult:
    """run_code: the summary, the inline images, a link per file; an error result unless the run was ok."""
    r = out.result
    content: list[ContentBlock] = [TextContent(text=run_summary(r))]
    content.extend(ImageContent(data=_b64(img.data), mime_type=img.mime_type) for img in out.images)
    content.extend(link(f) for f in r.files)
    return CallToolResult(content=content, structured_content=dump(r), is_error=r.status not in ("ok", "running"))


def download_result(out: DownloadOutput) -> CallToolResult:
    """download_file: a one-line summary, the body when inline (image, text, or blob), and the file's link."""
    r = out.result
    f = r.file
    summary = f"{f.path}: {f.bytes} bytes, {f.mime_type}, sha256 {f.sha256}"
    if r.saved_to:
        summary += f"\nsaved to {r.saved_to}"
    content: list[ContentBlock] = [TextContent(text=summary)]
    if out.data is not None:
        content.append(_inline_file(f, out.data))
    content.append(link(f))
    return CallToolResult(content=content, structured_content=dump(r))


def resource_contents(data: bytes, mime: str) -> list[ReadResourceContents]:
    """resources/read: text types as text when they decode as UTF-8, everything else as bytes (a blob)."""
    content: str | bytes = data
    if is_text_mime(mime):
        try:
            content = data.decode("utf-8")
        except UnicodeDecodeError:
            content = data
    return [ReadResourceContents(content=content, mime_type=mime)]


def link(f: FileInfo) -> ResourceLink:
    return ResourceLink(
        name=f.name,
        uri=f.uri,
        mime_type=f.mime_type,
        size=f.bytes,
        description=f"{f.path} in the container ({f.source})",
    )


def run_summary(r: RunResult) -> str:
    lines = [
        f"status: {r.status} · {r.duration_ms:.0f} ms · session {r.session_id} · container {r.container_id}"
        + (f" (expires {r.container.expires_at:%Y-%m-%d %H:%M:%S}Z)" if r.container.expires_at else "")
    ]
    if r.status == "running":
        lines.append(f"run_id: {r.run_id} (still running after {r.elapsed_s or 0:.0f} s: call get_run to wait for it)")
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


def _inline_file(f: FileInfo, data: bytes) -> ContentBlock:
    # SVG is markup: it travels as an embedded text resource, not as an image block.
    if f.mime_type.startswith("image/") and f.mime_type != "image/svg+xml":
        return ImageContent(data=_b64(data), mime_type=f.mime_type)
    if is_text_mime(f.mime_type):
        try:
            return EmbeddedResource(
                resource=TextResourceContents(uri=f.uri, mime_type=f.mime_type, text=data.decode("utf-8"))
            )
        except UnicodeDecodeError:
            pass  # a text type whose bytes are not UTF-8 travels as a blob
    return EmbeddedResource(resource=BlobResourceContents(uri=f.uri, mime_type=f.mime_type, blob=_b64(data)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
