"""Pydantic models of the tool contract: what each tool takes and returns (its published outputSchema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RunStatus = Literal["ok", "error", "timeout", "queued", "running", "cancelled", "lost"]
FileSource = Literal["user", "generated"]
Isolation = Literal["bubblewrap", "none", "remote"]
Strategy = Literal["two_pass_sentinel", "single_pass"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileInfo(_Model):
    file_id: str = Field(description="Stable id of this version of the file; pass it to download_file.")
    path: str = Field(description="Path relative to the container's data folder (/mnt/data).")
    name: str = Field(description="The file's base name.")
    bytes: int
    mime_type: str
    sha256: str | None = Field(default=None, description="SHA-256 of the harvested bytes.")
    source: FileSource = Field(description="'user' for uploaded inputs, 'generated' for files the code made.")
    created_at: datetime
    uri: str = Field(description="MCP resource URI; resources/read returns the bytes.")
    local_path: str | None = Field(default=None, description="Where the harvested copy lies on the server's host.")


class ErrorInfo(_Model):
    type: str = Field(description="Exception class name, e.g. ZeroDivisionError.")
    message: str
    traceback: str | None = None


class SkippedName(_Model):
    name: str
    reason: str


class StateRestored(_Model):
    from_run: int | None = Field(
        default=None, description="execution_count of the run whose namespace this is (in its container)"
    )
    saved_at: datetime | None = Field(default=None, description="When that snapshot was written (UTC).")
    restored: list[str] = Field(default_factory=list, description="Names that came back, values equal to before.")
    skipped: list[SkippedName] = Field(
        default_factory=list, description="Names that did not come back, each with why (open files, generators...)."
    )
    seconds: float = Field(default=0.0, description="Time the new worker took to load them.")


class ContainerInfo(_Model):
    id: str
    expires_at: datetime | None = Field(description="When the container expires if left idle (UTC).")
    state_lost: bool = Field(
        default=False,
        description="True when an earlier container expired or was restarted: variables and imports are gone "
        "(files made earlier are still downloadable).",
    )
    state_restored: StateRestored | None = Field(
        default=None,
        description="Set when this container is new (expiry, eviction, a crash, a server restart) and the session's "
        "variables were loaded from its last snapshot before this run.",
    )
    isolation: Isolation = "bubblewrap"


class Violation(_Model):
    path: str = Field(description="JSON path of the offending value, e.g. $.items[2].price")
    message: str


class JsonError(_Model):
    message: str
    violations: list[Violation] = Field(default_factory=list)


class TokenUsage(_Model):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


class StructuredInfo(_Model):
    strategy: Strategy | Literal["local"]
    path: Literal["last_expression", "sentinel", "repair", "single_pass", "none"] = Field(
        description="Where the JSON came from."
    )
    model_calls: int = 0
    usage: TokenUsage | None = None


class MoreFiles(_Model):
    count: int = Field(description="Files of this run not listed in `files`.")
    bytes: int = Field(description="Their total size.")
    hint: str


class Distribution(_Model):
    name: str = Field(description="Canonical project name, e.g. scikit-learn.")
    version: str


class PackagesInfo(_Model):
    requirements: list[str] = Field(
        description="What the session asked for (packages arguments and PEP 723 blocks; the latest per name)."
    )
    distributions: list[Distribution] = Field(description="Every distribution installed for them, resolved.")
    reused: bool = Field(
        description="True when nothing was installed for this run: the set was in use already or installed "
        "before (by any session; sets are cached and shared)."
    )
    seconds: float = Field(description="Time spent resolving and installing for this run.")


class TableData(_Model):
    columns: list[str]
    rows: list[list[Any]] = Field(description="The first rows (at most 50), one list of cells per row.")
    index: list[Any] | None = Field(default=None, description="The row labels of those rows.")
    shape: list[int] = Field(description="[rows, columns] of the whole table.")
    truncated: bool = Field(default=False, description="True when the table has more rows or columns than shown.")


class Output(_Model):
    kind: Literal["display", "result"] = Field(
        default="display",
        description="What the run showed, in order: display() calls, figures, plt.show(), PIL show(); 'result' "
        "is the last expression's value when it has more to show than its repr.",
    )
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="MIME type -> content (text/plain always; text/html, text/markdown, text/latex, image/svg+xml, "
        "application/json when they fit). Images and parts too large to inline are files (file_id).",
    )
    file_id: str | None = Field(default=None, description="The file holding this output's bytes, e.g. a figure's PNG.")
    path: str | None = Field(default=None, description="That file's path in /mnt/data.")
    stdout_at: int | None = Field(
        default=None,
        description="Characters of stdout printed before this output (prints and displays interleave at it); "
        "null: after all of it.",
    )
    table: TableData | None = Field(default=None, description="A DataFrame's first rows as data.")
    chart: dict[str, Any] | None = Field(
        default=None,
        description="For a matplotlib figure, what it shows, read from its artists: type (line, scatter, bar, "
        "histogram, pie, box, subplots), title and per axes its labels, scales, tick labels and elements (series "
        "with points, bars with heights, bins and counts, wedges with angles, boxes with their five numbers).",
    )


class RunResult(_Model):
    session_id: str = Field(description="Pass back as session_id to keep using this session's state and files.")
    container_id: str
    backend: str
    status: RunStatus
    stdout: str = ""
    stderr: str = ""
    result: str | None = Field(default=None, description="repr() of the code's last expression, if any.")
    error: ErrorInfo | None = None
    json_: Any = Field(
        default=None,
        alias="json",
        description="The validated JSON result (when output_schema).",
        # Any JSON value, said explicitly: an empty schema reads as a missing type to strict checkers (Inspector),
        # and one branch per type maps onto single-`type` dialects (Gemini's OpenAPI subset), unlike a type array.
        json_schema_extra={"anyOf": [{"type": t} for t in ("null", "object", "array", "string", "number", "boolean")]},
    )
    json_error: JsonError | None = None
    files: list[FileInfo] = Field(default_factory=list, description="Files created or changed by this run.")
    outputs: list[Output] = Field(
        default_factory=list, description="What the run showed, in order: each figure with its image file and data."
    )
    more_files: MoreFiles | None = Field(default=None, description="The files past the list cap, counted.")
    container: ContainerInfo
    truncated: bool = Field(default=False, description="True when stdout/stderr/text were cut to the budget.")
    warnings: list[str] = Field(default_factory=list)
    text: str | None = Field(default=None, description="The model's own text (openai backend).")
    structured: StructuredInfo | None = None
    usage: TokenUsage | None = Field(default=None, description="Model tokens used by this run (openai backend).")
    model_calls: int = 0
    duration_ms: float = 0.0
    run_id: str | None = Field(
        default=None, description="The run's handle: while status is 'running', pass it to get_run or cancel_run."
    )
    elapsed_s: float | None = Field(default=None, description="Seconds since the run started (while running).")
    position: int | None = Field(
        default=None, description="While queued: its place in the session's queue (1 = runs next)."
    )
    waits_for: str | None = Field(default=None, description="While queued: the run_id of the run just ahead of it.")
    packages: PackagesInfo | None = Field(
        default=None, description="The session's installed packages, first on sys.path (when it asked for any)."
    )
    execution_count: int | None = Field(
        default=None,
        description="The cell's number in its container, as Jupyter counts them (1, 2, 3, ...; a new container "
        "starts again at 1); null while the run is still going.",
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)


class FileList(_Model):
    session_id: str
    container_id: str | None
    expires_at: datetime | None
    container_alive: bool = Field(
        description="False when the container expired or was closed; files listed are the harvested copies."
    )
    files: list[FileInfo]
    total: int = Field(default=0, description="Files matching, over all pages.")
    next_cursor: str | None = Field(default=None, description="Pass as cursor for the next page; null at the end.")
    as_of_run: str | None = Field(
        default=None, description="The run whose harvest this reflects (the session's last finished run)."
    )
    run_in_progress: str | None = Field(
        default=None, description="The run_id of a run going now: files it writes appear once it ends."
    )


class DownloadResult(_Model):
    file: FileInfo
    saved_to: str | None = Field(default=None, description="Host path the file was saved to, if it was.")
    inline: bool = Field(description="True when the bytes (from offset) are in this result's content.")
    offset: int = Field(default=0, description="First byte of the inline part.")
    next_offset: int | None = Field(default=None, description="Pass as offset for the next part; null at the end.")
    truncated: bool = Field(default=False, description="True when only part of the file is inline.")
    preview: bool = Field(default=False, description="True when the inline image is a downscaled preview.")
    hint: str | None = None
    as_of_run: str | None = Field(
        default=None, description="The run whose harvest this reflects (the session's last finished run)."
    )
    run_in_progress: str | None = Field(
        default=None, description="The run_id of a run going now: files it writes appear once it ends."
    )


class UploadResult(_Model):
    session_id: str
    container_id: str
    file: FileInfo


class CloseResult(_Model):
    session_id: str
    closed: bool
    containers_stopped: int
    files_kept: bool = Field(description="Harvested files stay on the host unless delete_files was asked.")


# Keywords that constrain only instances of their own type, so that `{type: [T, "null"], ...}` means exactly
# `anyOf [{type: null}, {type: T, ...}]`. `enum`, `const` and the combinators are not among them.
_TYPED_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "description",
        "default",
    }
)


def _as_type_list(node: dict[str, Any]) -> dict[str, Any] | None:
    """`anyOf` of plain typed branches as one schema with a `type` list, or None when that would change its
    meaning: bare `{type: T}` branches, plus at most one branch with keywords of its own type."""
    branches = node["anyOf"]
    if not all(
        isinstance(b, dict) and isinstance(b.get("type"), str) and b.keys() <= _TYPED_KEYWORDS for b in branches
    ):
        return None
    types = [b["type"] for b in branches]
    rich = [b for b in branches if len(b) > 1]
    if len(set(types)) != len(types) or len(rich) > 1:
        return None
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    extra = {k: v for k, v in (rich[0] if rich else {}).items() if k != "type"}
    if extra.keys() & outer.keys():
        return None
    return {"type": types, **extra, **outer}


def published_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema as published in `outputSchema`: definitions inlined, titles dropped, and a nullable
    field as `type: [T, "null"]` rather than `anyOf [{type: T}, {type: null}]`. The same constraints, but no `$ref`
    to resolve and no failed branch to build an error for: the stock Python client validates every result with
    jsonschema, and a branch that fails costs it an exception object (a warm `run_code` result took 230 us to
    validate with `anyOf`, 4x less with type lists; `bench/bench_mcp.py`)."""
    schema = model.model_json_schema(by_alias=True)
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(x) for x in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return walk({**defs[node["$ref"].rsplit("/", 1)[-1]], **extra})
        # A "title" keyword is a string; a property that happens to be named "title" is a schema and stays.
        out = {k: walk(v) for k, v in node.items() if not (k == "title" and isinstance(v, str))}
        if "anyOf" in out:
            out["anyOf"] = sorted(out["anyOf"], key=lambda branch: branch != {"type": "null"})
            out = _as_type_list(out) or out
        return out

    return walk(schema)  # type: ignore[no-any-return]


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict with aliases (RunResult.json_ -> 'json')."""
    return model.model_dump(mode="json", by_alias=True)
