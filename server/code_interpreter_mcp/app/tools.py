"""The tools: one short function each, with its argument shapes and description, that calls the engine.

Owns the tool surface as clients see it in `tools/list` (names, titles, descriptions, argument schemas, hints).
Adding a tool is one function here under `@tool(...)`: resolve the session, call the engine, hand the result to
`content` (or return the model). Knows nothing of how results become content, nor of how the engine works.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import Field

from ..config import Settings
from ..engine import Engine
from ..models import CloseResult, DownloadResult, FileList, RunResult, UploadResult
from ..sessions import Session, new_id
from . import cancels, content, forward, tasks
from .arguments import keep_strings
from .auth import current_owner
from .clients import client_name, client_profile, protocol_version
from .context import engine_from, resolve_session

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
- Each result says when the container expires (idle expiry); after that a new container starts, input files are
  uploaded again, and earlier files remain downloadable. On the local backend the session's variables come back
  from their last snapshot (container.state_restored names them); elsewhere they are gone (state_lost: true).
- No network access inside the sandbox. timeout_s stops runaway code (interrupt first, then restart).
- packages: PEP 508 requirements to install first, e.g. ["tabulate", "scikit-learn>=1.5"] (a PEP 723
  `# /// script` block with `dependencies = [...]` at the top of the code works too). They are installed outside
  the sandbox (wheels from the server's configured index), cached and shared between sessions, so a set installed
  once costs nothing the next time; the session keeps them for later runs and for a new container. Naming a
  project again changes its constraint; variables survive adding packages. `packages` in the result lists each
  installed distribution and version. The server's policy may allow only some packages, or none.
- Long runs: the call waits up to wait_s (default 45 s) for the result. A run still going then returns
  status "running" with a run_id and the output so far, and keeps running in the background. Then call get_run
  with that run_id (it waits again, cheaply, and returns the full result, files included, once done); call
  cancel_run to stop it. wait_s=0 returns at once. Runs of one session go in order, like notebook cells: one
  sent while another runs waits its turn (status "queued" with position and waits_for past wait_s; get_run
  works the same). An error does not cancel the runs behind it.
- Notebook lines work: `!ls` (the sandbox's shell, output captured in order), `x = !cmd`, `%pip install NAME`
  or `!pip install NAME` on a line of its own (installed like packages), %who, %whos, %time, %timeit, %pwd,
  %cd, %env, %ls, %run, %%bash, %%writefile, `obj?` (the magics on the local backend; the openai backend runs
  `!cmd` lines). execution_count counts the cells (1, 2, 3, ...).
- env: variables for this run only; persist_env=true keeps them for the session.
"""

GET_RUN_DESCRIPTION = """\
Get the result of a run that run_code (or an earlier get_run) returned with status "running" or "queued": call
it whenever a result says so, with that run_id. It waits up to wait_s (default 45 s) for the run to end and returns
the same result as run_code would have (stdout, stderr, result, error, json, files...). If the run is still
going it returns status "running" again with the output so far: just call get_run again; waiting is cheap and
the run is not affected. A finished run's result stays available for the session's lifetime.
"""

CANCEL_RUN_DESCRIPTION = """\
Stop a run that is still going (status "running"; a "queued" one is taken out of the queue and never runs),
the way a timeout does: the code is interrupted
(KeyboardInterrupt), so the session's variables and imports are kept; only code that ignores the interrupt is
killed (its variables then come back from their last snapshot on the local backend, else the result says
state_lost). Returns the run's result with status "cancelled", its output and
the files it wrote so far.
"""

_ENV = (
    'Environment variables for this run only, e.g. {"FOO": "bar"} (os.environ and the shell commands it starts see '
    "them; afterwards the session's own are as they were). Names of the server's secrets are refused."
)
_PERSIST_ENV = "Keep env for this session's later runs too (a name given again takes its new value)."
_WAIT_S = "Seconds to wait for the result before returning status 'running' (default 45; 0: at once)."

ToolFn = Callable[..., Awaitable[Any]]
F = TypeVar("F", bound=ToolFn)


@dataclass(frozen=True)
class _Tool:
    fn: ToolFn
    title: str
    description: str
    read_only: bool
    destructive: bool
    idempotent: bool


_TOOLS: list[_Tool] = []


def tool(
    title: str, description: str, *, read_only: bool = False, destructive: bool = False, idempotent: bool = False
) -> Callable[[F], F]:
    """Declare a tool; its function's name is the tool's name, its signature the argument schema, its return
    annotation the output schema."""

    def declare(fn: F) -> F:
        _TOOLS.append(_Tool(fn, title, description, read_only, destructive, idempotent))
        return fn

    return declare


def add_tools(mcp: MCPServer[Engine], settings: Settings) -> None:
    """Register every declared tool, in declaration order (the order of `tools/list`)."""
    open_world = settings.backend != "local"  # a remote backend talks to a service outside this machine
    for t in _TOOLS:
        hints = ToolAnnotations(
            read_only_hint=t.read_only,
            destructive_hint=t.destructive,
            idempotent_hint=t.idempotent,
            open_world_hint=open_world,
        )
        mcp.add_tool(_routed(t.fn), title=t.title, description=t.description, annotations=hints)
        keep_strings(mcp, t.fn.__name__)  # "null" given as a session id or file name stays that string


def _routed(fn: ToolFn) -> ToolFn:
    """The tool, or its call sent on to the session's home replica when that is another one (`forward`)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.get("ctx")
        engine = engine_from(ctx)
        if engine is None or engine.ctx.homes is None or ctx is None:
            return await fn(*args, **kwargs)
        arguments = {k: v for k, v in kwargs.items() if k != "ctx" and v is not None}
        try:
            home = await forward.target(engine, name, arguments)
        except Exception as exc:  # the registry did not answer: a retryable error, as from the tool itself
            raise content.tool_error(exc) from None
        if home is None:
            return await fn(*args, **kwargs)
        forwarder = forward.forwarder_of(engine)
        run_id = new_id("r_") if name == "run_code" else arguments.get("run_id") if name == "get_run" else None
        wait = tasks.task_wait(arguments.get("wait_s")) if name == "run_code" else None
        if wait is not None:
            arguments["wait_s"] = wait  # a call made as a task waits briefly
        bearer = forward.caller_token()
        try:
            wire = await forwarder.call(
                home, name, arguments, client_name(ctx.request_context), ctx.report_progress, bearer, run_id
            )
        except anyio.get_cancelled_exc_class():
            group = engine.runs.task_group
            if isinstance(run_id, str) and group is not None:  # the client stopped the call: the run too?
                group.start_soon(
                    forward.pass_cancel,
                    forwarder,
                    home,
                    run_id,
                    arguments.get("session_id"),
                    bearer,
                    _verdict(ctx, engine),
                )
            raise
        except Exception as exc:
            if isinstance(arguments.get("session_id"), str):
                forward.forget_home(arguments["session_id"])
            raise content.tool_error(exc) from None
        return CallToolResult.model_validate(wire)

    return call


@asynccontextmanager
async def _session(ctx: Context[Engine], session_id: str | None) -> AsyncIterator[tuple[Engine, Session]]:
    """The call's engine and session; any failure, here or in the block, reaches the caller as a ToolError."""
    try:
        yield await resolve_session(ctx, session_id)
    except Exception as exc:
        raise content.tool_error(exc) from None


@tool("Run Python code", RUN_CODE_DESCRIPTION)
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
    instructions: Annotated[str | None, Field(description="openai backend only: extra guidance to the model.")] = None,
    json_strategy: Annotated[
        Literal["two_pass_sentinel", "single_pass"] | None,
        Field(description="openai backend: how the JSON result is obtained."),
    ] = None,
    packages: Annotated[
        list[str] | None,
        Field(description='Requirements to install for this session first, e.g. ["tabulate", "scipy>=1.13"].'),
    ] = None,
    wait_s: Annotated[float | None, Field(description=_WAIT_S, ge=0)] = None,
    env: Annotated[dict[str, str] | None, Field(description=_ENV)] = None,
    persist_env: Annotated[bool, Field(description=_PERSIST_ENV)] = False,
) -> Annotated[CallToolResult, RunResult]:
    async with _session(ctx, session_id) as (engine, session):
        out = await engine.start_run(
            session,
            code,
            files=files,
            output_schema=output_schema,
            timeout_s=timeout_s,
            instructions=instructions,
            json_strategy=json_strategy,
            wait_s=tasks.task_wait(wait_s),
            progress=ctx.report_progress,
            abandoned=_verdict(ctx, engine),
            run_id=forward.forwarded_run_id(ctx.request_context.meta),
            packages=packages,
            env=env,
            persist_env=persist_env,
        )
    return content.run_result(out, client_profile(ctx, engine.settings))


def _verdict(ctx: Context[Engine], engine: Engine) -> Callable[[], Awaitable[bool]]:
    """Whether this call's run stops when the client cancels the call (`cancels`: its reason and CLIENT_CANCEL)."""
    settings, rc = engine.settings, ctx.request_context
    if forward.FORWARDED.get() == forward.TOOL and settings.client_cancel == "auto":
        return _kept  # the forwarding replica judges its caller's cancel, and passes a stop on as cancel_run
    aborts = cancels.aborts_cancel(protocol_version(rc), settings.transport)
    return cancels.REASONS.verdict_for(ctx.session, rc.request_id, settings.client_cancel, aborts)


async def _kept() -> bool:
    return False


RunId = Annotated[str, Field(description="The run_id of a result whose status was 'running'.")]
RunSession = Annotated[str | None, Field(description="The run's session (optional).")]


@asynccontextmanager
async def _engine(ctx: Context[Engine]) -> AsyncIterator[Engine]:
    """The call's engine, for calls that name a run rather than a session; failures become ToolErrors."""
    try:
        yield ctx.request_context.lifespan_context
    except Exception as exc:
        raise content.tool_error(exc) from None


@tool("Get a run's result", GET_RUN_DESCRIPTION, read_only=True, idempotent=True)
async def get_run(
    run_id: RunId,
    ctx: Context[Engine],
    session_id: RunSession = None,
    wait_s: Annotated[float | None, Field(description=_WAIT_S, ge=0)] = None,
) -> Annotated[CallToolResult, RunResult]:
    async with _engine(ctx) as engine:
        wait = engine.settings.default_wait_s if wait_s is None else wait_s
        verdict = _verdict(ctx, engine)
        out = await engine.get_run(run_id, current_owner(), session_id, wait, ctx.report_progress, verdict)
    return content.run_result(out, client_profile(ctx, engine.settings))


@tool("Cancel a run", CANCEL_RUN_DESCRIPTION, destructive=True, idempotent=True)
async def cancel_run(
    run_id: RunId, ctx: Context[Engine], session_id: RunSession = None
) -> Annotated[CallToolResult, RunResult]:
    async with _engine(ctx) as engine:
        out = await engine.cancel_run(run_id, current_owner(), session_id)
    return content.run_result(out, client_profile(ctx, engine.settings))


@tool(
    "List container files",
    "List the files in the session's container (/mnt/data) with their file_ids, sizes, types and "
    "resource URIs, sorted by path, a page at a time (limit; pass next_cursor back as cursor for the next page), "
    "optionally only those matching a glob pattern. When the container has expired, lists the harvested "
    "copies, which stay downloadable. all_containers=true lists every file the session ever produced or uploaded.",
    read_only=True,
    idempotent=True,
)
async def list_container_files(
    ctx: Context[Engine],
    session_id: str | None = None,
    container_id: Annotated[
        str | None, Field(description="One of this session's containers; default: the current one.")
    ] = None,
    all_containers: bool = False,
    pattern: Annotated[
        str | None, Field(description="Glob on the path (a pattern without '/' also matches the name): '*.csv'.")
    ] = None,
    limit: Annotated[int, Field(description="Files per page.", ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Field(description="next_cursor of the previous page.")] = None,
) -> Annotated[CallToolResult, FileList]:
    async with _session(ctx, session_id) as (engine, session):
        out = await engine.list_files(session, container_id, all_containers, pattern, limit, cursor)
    return content.file_list_result(out, client_profile(ctx, engine.settings))


@tool(
    "Download a file",
    "Get a file the code made (or an upload) by file_id, resource URI or path in /mnt/data. Text comes back "
    "inline as far as the result budget allows, from byte offset; the result says truncated and next_offset "
    "(pass it as offset for the next part; null at the end). Images come back as images (a downscaled preview "
    "when large, with the full file linked). Other binary files inline only when small (base64), else as a "
    "link and, on stdio, the harvested copy's host path; offset/max_bytes fetch any part of them. save_to "
    "copies the file to the server's host (a directory or a file path). Works after the container expired. "
    "Symlinks and paths outside /mnt/data are refused.",
    idempotent=True,
)
async def download_file(
    file: Annotated[str, Field(description="file_id, resource URI, or path relative to /mnt/data.")],
    ctx: Context[Engine],
    session_id: str | None = None,
    container_id: str | None = None,
    save_to: Annotated[str | None, Field(description="Absolute host directory or file path to save to.")] = None,
    overwrite: bool = False,
    offset: Annotated[int, Field(description="First byte to return (next_offset of the previous part).", ge=0)] = 0,
    max_bytes: Annotated[
        int | None, Field(description="At most this many bytes (still within the budget).", ge=1)
    ] = None,
) -> Annotated[CallToolResult, DownloadResult]:
    async with _session(ctx, session_id) as (engine, session):
        out = await engine.download(session, file, container_id, save_to, overwrite, offset, max_bytes)
    return content.download_result(out, client_profile(ctx, engine.settings))


@tool(
    "Upload a file",
    "Put a file into the session's container (/mnt/data): either a host path, or name plus "
    "content_base64. dest_path sets the path inside /mnt/data (default: the name). Uploads are re-uploaded "
    "automatically if the container expires.",
)
async def upload_file(
    ctx: Context[Engine],
    path: Annotated[str | None, Field(description="Absolute path of a file on the server's host.")] = None,
    name: Annotated[str | None, Field(description="File name (required with content_base64).")] = None,
    content_base64: Annotated[str | None, Field(description="The file's bytes, base64-encoded.")] = None,
    dest_path: Annotated[str | None, Field(description="Path inside /mnt/data.")] = None,
    session_id: str | None = None,
    env: Annotated[
        dict[str, str] | None, Field(description="Environment variables to keep for the session's runs.")
    ] = None,
    persist_env: Annotated[bool, Field(description="Must be true with env: upload_file runs no code.")] = False,
) -> Annotated[CallToolResult, UploadResult]:
    async with _session(ctx, session_id) as (engine, session):
        out = await engine.upload(
            session,
            path=path,
            name=name,
            content_base64=content_base64,
            dest_path=dest_path,
            env=env,
            persist_env=persist_env,
        )
    return content.upload_result(out, client_profile(ctx, engine.settings))


@tool(
    "Close a session",
    "Stop and delete the session's containers now (nothing left running or billing). Harvested "
    "files stay on the host unless delete_files=true.",
    destructive=True,
    idempotent=True,
)
async def close_session(
    ctx: Context[Engine],
    session_id: str | None = None,
    delete_files: bool = False,
) -> Annotated[CallToolResult, CloseResult]:
    async with _session(ctx, session_id) as (engine, session):
        out = await engine.close_session(session, delete_files)
    return content.close_result(out, client_profile(ctx, engine.settings))
