"""The mapping of engine results and errors onto MCP content, per client: summaries, images, embedded files,
links, ToolError.

Owns what a client sees. For most clients: `structuredContent` plus a short human summary (never the same JSON
twice), an image block per inline image, and resource links as `CODE_INTERPRETER_RESOURCE_LINKS` says (default
`non_inline`: only files whose whole body is not already in the result). For clients that read only `content`
(`ClientProfile.content_only`, see `clients`): no `structuredContent`, and the text carries what the model needs
(status, ids, output, value, error, JSON, files) compactly. `resource_link` blocks go only to clients of 2025-06-18
or later; the others get each file's URI in the text (embedded resources exist in every version). Every result
stays within the budget: the engine shapes `structuredContent`, this module its text. Knows nothing of argument
shapes, sessions or how results are made.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any, TypeVar

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
from pydantic import BaseModel

from ..artifacts import is_text_mime
from ..engine import DownloadOutput, RunOutput
from ..engine.budget import clip, json_chars
from ..engine.outputs import CHART_DATA
from ..errors import CIError
from ..models import CloseResult, DownloadResult, FileInfo, FileList, JsonError, Output, RunResult, UploadResult, dump
from .clients import ClientProfile

logger = logging.getLogger(__name__)

SUMMARY_OUTPUTS = 10  # output lines in a summary (all of them are in `outputs`)
SUMMARY_FILES = 20  # file lines in a summary next to structuredContent (all of them are in `files`)

M = TypeVar("M", bound=BaseModel)


def hide_host_paths(model: M, allowed: bool) -> M:
    """A result for a caller who may not name host paths (HTTP by default) carries no host path either: each
    `FileInfo` in it loses `local_path`, which would disclose the server's data folder."""
    if allowed:
        return model
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, FileInfo):
            updates[name] = value.model_copy(update={"local_path": None})
        elif isinstance(value, list) and any(isinstance(item, FileInfo) for item in value):
            updates[name] = [
                item.model_copy(update={"local_path": None}) if isinstance(item, FileInfo) else item for item in value
            ]
    return model.model_copy(update=updates) if updates else model


def _dumped(r: RunResult) -> tuple[RunResult, dict[str, Any]]:
    """The result and its JSON; a value no JSON encoder takes (too deep) is dropped with a warning, so the run's
    stdout and files still reach the caller."""
    try:
        return r, dump(r)
    except (ValueError, RecursionError):
        r = r.model_copy(
            update={
                "json_": None,
                "json_error": JsonError(message="the JSON result could not be serialised (nested too deeply)"),
                "warnings": [*r.warnings, "the JSON result was dropped: it could not be serialised"],
            }
        )
        return r, dump(r)


def tool_error(exc: BaseException) -> ToolError:
    """A taxonomy error keeps its message and hint; anything else is logged and reported without details."""
    if isinstance(exc, CIError):
        return ToolError(exc.user_text())
    logger.exception("internal error")
    return ToolError(
        "[internal_error] The server hit an unexpected error; details are in its log. "
        "Hint: try again; if it persists, report it with the log."
    )


def run_result(out: RunOutput, p: ClientProfile) -> CallToolResult:
    """run_code: the text, the inline images, a link per file the client should get one for."""
    r = hide_host_paths(out.result, p.host_paths)
    whole = {img.file_id for img in out.images if not img.preview}
    links = [link(f) for f in r.files if p.link_for(f.file_id in whole)]
    images = [ImageContent(data=_b64(img.data), mime_type=img.mime_type) for img in out.images]
    r, structured = _dumped(r)
    text = full_run_text(r) if p.content_only else run_summary(r)
    return _result(p, text, [*images, *links], structured, is_error=r.status not in ("ok", "queued", "running"))


def download_result(out: DownloadOutput, p: ClientProfile) -> CallToolResult:
    """download_file: what was returned and how to get the rest, the body when inline, the link unless the whole
    file is inline."""
    r = hide_host_paths(out.result, p.host_paths)
    body = [_inline_body(r.file, out)] if r.inline and out.data is not None else []
    whole = r.inline and not r.truncated and not r.preview
    links = [link(r.file)] if p.link_for(whole) else []
    return _result(p, download_summary(r), [*body, *links], dump(r))


def file_list_result(r: FileList, p: ClientProfile) -> CallToolResult:
    r = hide_host_paths(r, p.host_paths)
    state = "gone: harvested copies"
    if r.container_alive:
        state = "alive" + (f", expires {r.expires_at:%Y-%m-%d %H:%M:%S}Z" if r.expires_at else "")
    lines = [
        f"{len(r.files)} of {r.total} files · session {r.session_id} · container {r.container_id or '-'} ({state})"
    ]
    files = r.files if p.content_only else r.files[:SUMMARY_FILES]
    lines.extend(file_line(f) for f in files)
    if len(files) < len(r.files):
        lines.append(f"… {len(r.files) - len(files)} more on this page (structuredContent.files)")
    if r.next_cursor:
        lines.append(f"more: list_container_files(cursor={r.next_cursor!r})")
    return _result(p, "\n".join(lines), [], dump(r))


def upload_result(r: UploadResult, p: ClientProfile) -> CallToolResult:
    r = hide_host_paths(r, p.host_paths)
    text = f"uploaded to session {r.session_id} · container {r.container_id}\n{file_line(r.file)}"
    return _result(p, text, [], dump(r))


def close_result(r: CloseResult, p: ClientProfile) -> CallToolResult:
    text = f"session {r.session_id} closed · {r.containers_stopped} container(s) stopped · " + (
        "harvested files kept" if r.files_kept else "harvested files deleted"
    )
    return _result(p, text, [], dump(r))


def _result(
    p: ClientProfile, text: str, blocks: list[ContentBlock], data: dict[str, Any], is_error: bool = False
) -> CallToolResult:
    """The text first, within what the budget leaves it; `structuredContent` unless the client reads only text."""
    used = sum(_chars(b) for b in blocks) + (0 if p.content_only else json_chars(data))
    room = max(500, p.budget - used) if p.content_only else max(500, min(p.summary_room, p.budget - used))
    text, _ = clip(text, room)
    # structuredContent stays for the SDK to validate against the tool's model; `for_client` drops it after.
    return CallToolResult(content=[TextContent(text=text), *blocks], structured_content=data, is_error=is_error)


def for_client(result: CallToolResult, p: ClientProfile) -> CallToolResult:
    """The validated result as this client gets it: without structuredContent when it reads only text (its tools
    are listed without outputSchema, so the spec asks for none)."""
    if p.content_only and result.structured_content is not None:
        return result.model_copy(update={"structured_content": None})
    return result


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
    return ResourceLink(name=f.name, uri=f.uri, mime_type=f.mime_type, size=f.bytes)


def file_line(f: FileInfo) -> str:
    return f"file: {f.path} ({f.bytes} bytes, {f.mime_type}) id={f.file_id} uri={f.uri}"


def _status_line(r: RunResult) -> str:
    return (
        f"status: {r.status} · {r.duration_ms:.0f} ms · session {r.session_id} · container {r.container_id}"
        + (f" (expires {r.container.expires_at:%Y-%m-%d %H:%M:%S}Z)" if r.container.expires_at else "")
        + (" · state_lost" if r.container.state_lost else "")
    )


def packages_line(r: RunResult) -> str:
    p = r.packages
    assert p is not None
    dists = ", ".join(f"{d.name} {d.version}" for d in p.distributions[:20])
    more = f" and {len(p.distributions) - 20} more" if len(p.distributions) > 20 else ""
    how = "already installed" if p.reused else f"installed in {p.seconds:.1f} s"
    return f"packages: {dists}{more} ({how})"


def _error_text(r: RunResult, limit: int | None) -> list[str]:
    if r.error is None:
        return []
    head = f"error: {r.error.type}: {r.error.message}"
    tb = r.error.traceback
    if not tb:
        return [head]
    return [head, "traceback:\n" + (tb if limit is None else _tail(tb, limit))]


def output_line(o: Output, limit: int | None) -> str:
    """An output as the model reads it: a chart's summary, a table's markdown, else its plain text."""
    plain = str(o.data.get("text/plain", ""))
    md = o.data.get("text/markdown")
    if o.chart is not None or CHART_DATA in plain:  # a figure, its chart data left out for the budget
        return f"chart {o.path}: {plain}"
    body = md if isinstance(md, str) else plain
    body = body if limit is None else _tail(body, limit)
    where = f" (file {o.path})" if o.path else ""
    return f"{o.kind}{where}:" + ("\n" if "\n" in body else " ") + body


def _shows_result(r: RunResult) -> bool:
    """The last value is an output of its own (markdown for a DataFrame): its repr line would say it twice."""
    return any(o.kind == "result" for o in r.outputs)


def _interleaved(r: RunResult) -> list[str]:
    """stdout with each output at the place it was shown (`stdout_at`); outputs with no place come after."""
    lines, printed = [], 0
    placed = sorted((o for o in r.outputs if o.stdout_at is not None), key=lambda o: o.stdout_at or 0)
    for o in placed:
        at = min(max(o.stdout_at or 0, printed), len(r.stdout))
        if at > printed:
            lines.append(("stdout:\n" if printed == 0 else "") + r.stdout[printed:at].rstrip("\n"))
            printed = at
        lines.append(output_line(o, None))
    if printed < len(r.stdout):
        lines.append(("stdout:\n" if printed == 0 else "") + r.stdout[printed:])
    lines.extend(output_line(o, None) for o in r.outputs if o.stdout_at is None)
    return lines


def run_summary(r: RunResult) -> str:
    """The short human summary next to structuredContent: leads with what happened; the rest is in the JSON."""
    lines = [_status_line(r), *_error_text(r, 2000)]
    if r.status == "running":
        lines.append(f"run_id: {r.run_id} (still running after {r.elapsed_s or 0:.0f} s: call get_run to wait for it)")
    lines.extend(f"warning: {w}" for w in r.warnings[:5])
    if r.packages is not None:
        lines.append(packages_line(r))
    if r.stdout:
        lines.append("stdout (end):\n" + _tail(r.stdout, 2000))
    if r.stderr:
        lines.append("stderr (end):\n" + _tail(r.stderr, 1000))
    if r.result is not None and not _shows_result(r):
        lines.append("result: " + _tail(r.result, 500))
    if r.text:
        lines.append("model:\n" + _tail(r.text, 1500))
    if r.json_ is not None:
        lines.append("json: valid (see structuredContent.json)")
    lines.extend(_json_error_lines(r))
    lines.extend(output_line(o, 1500) for o in r.outputs[:SUMMARY_OUTPUTS])
    if len(r.outputs) > SUMMARY_OUTPUTS:
        lines.append(f"… {len(r.outputs) - SUMMARY_OUTPUTS} more outputs in structuredContent.outputs")
    lines.extend(file_line(f) for f in r.files[:SUMMARY_FILES])
    if len(r.files) > SUMMARY_FILES:
        lines.append(f"… {len(r.files) - SUMMARY_FILES} more files in structuredContent.files")
    if r.more_files is not None:
        lines.append(r.more_files.hint)
    if r.truncated:
        lines.append("(output truncated to the result budget)")
    return "\n".join(lines)


def full_run_text(r: RunResult) -> str:
    """The whole result as text, for clients that never see structuredContent."""
    lines = [_status_line(r), *_error_text(r, None)]
    lines.extend(f"warning: {w}" for w in r.warnings)
    if r.packages is not None:
        lines.append(packages_line(r))
    lines.extend(_interleaved(r))
    if r.stderr:
        lines.append("stderr:\n" + r.stderr)
    if r.result is not None and not _shows_result(r):
        lines.append("result: " + r.result)
    if r.text:
        lines.append("model:\n" + r.text)
    if r.json_ is not None:
        lines.append("json: " + json.dumps(r.json_, ensure_ascii=False, separators=(",", ":"), default=str))
    lines.extend(_json_error_lines(r))
    lines.extend(file_line(f) for f in r.files)
    if r.more_files is not None:
        lines.append(f"{r.more_files.hint} ({r.more_files.bytes} bytes in all)")
    if r.truncated:
        lines.append("(output truncated to the result budget)")
    return "\n".join(lines)


def _json_error_lines(r: RunResult) -> list[str]:
    if r.json_error is None:
        return []
    return [
        "json_error: "
        + r.json_error.message
        + "".join(f"\n  {v.path}: {v.message}" for v in r.json_error.violations[:20])
    ]


def download_summary(r: DownloadResult) -> str:
    f = r.file
    lines = [file_line(f) + (f" sha256={f.sha256}" if f.sha256 else "")]
    if r.inline:
        end = r.next_offset if r.next_offset is not None else f.bytes
        lines.append(
            "inline: downscaled preview"
            if r.preview
            else f"inline: bytes {r.offset}-{end} of {f.bytes}"
            + (f" · next_offset={r.next_offset}" if r.next_offset else "")
        )
    else:
        lines.append("not inline")
    if r.saved_to:
        lines.append(f"on the host: {r.saved_to}")
    if r.hint:
        lines.append(r.hint)
    return "\n".join(lines)


def _tail(text: str, limit: int) -> str:
    # The full (budgeted) text is in structuredContent; the summary keeps the end, where errors are.
    return text if len(text) <= limit else "…" + text[-limit:]


def _chars(block: ContentBlock) -> int:
    """What a block costs in the budget: images have their own caps; text counts as the model reads it."""
    if isinstance(block, ImageContent):
        return 0
    if isinstance(block, TextContent):
        return len(block.text)
    if isinstance(block, EmbeddedResource):
        res = block.resource
        return len(str(res.uri)) + (len(res.text) if isinstance(res, TextResourceContents) else len(res.blob))
    return json_chars(block.model_dump(mode="json", by_alias=True, exclude_none=True))


def _inline_body(f: FileInfo, out: DownloadOutput) -> ContentBlock:
    data = out.data or b""
    mime = out.mime_type or f.mime_type
    if out.text is not None:
        return EmbeddedResource(resource=TextResourceContents(uri=f.uri, mime_type=mime, text=out.text))
    # SVG is markup: it travels as text above or as a blob, never as an image block.
    if mime.startswith("image/") and mime != "image/svg+xml":
        return ImageContent(data=_b64(data), mime_type=mime)
    return EmbeddedResource(resource=BlobResourceContents(uri=f.uri, mime_type=mime, blob=_b64(data)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
