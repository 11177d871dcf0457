"""The Backend protocol: the handful of async operations the engine needs from a place that runs code.

Nothing here knows MCP, sessions or the registry. A backend owns containers (a sandboxed worker, a hosted
container), runs code in them, lists and fetches their files, and puts files into them. The engine does
everything else: choosing containers, expiry policy, harvesting, structured-output validation, budgets.

Errors are raised as `code_interpreter_mcp.errors.CIError` subclasses; in particular a container that turns out
to be gone raises `ContainerExpired`, and the engine replaces it and runs again.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..errors import CIError

Progress = Callable[[float, float | None, str], Awaitable[None]]
"""progress(done, total, message): the engine forwards it to the client as a progress notification."""


async def no_progress(done: float, total: float | None, message: str) -> None:
    return None


@dataclass
class ContainerState:
    """What the backend knows of one container. For openai, times come from the API, not a local clock."""

    id: str
    backend: str
    created_at: float  # unix seconds
    last_active_at: float  # unix seconds
    expires_after_s: float
    status: str = "running"  # "running" while usable; anything else ("expired", "stopped", "deleted") is not
    isolation: str = "bubblewrap"  # "bubblewrap" | "none" | "remote"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def expires_at(self) -> float:
        return self.last_active_at + self.expires_after_s

    def usable(self, now: float | None = None) -> bool:
        return self.status == "running" and (now if now is not None else time.time()) < self.expires_at


@dataclass
class RemoteFile:
    """A file as the backend sees it inside a container."""

    path: str  # relative to the data folder (/mnt/data); absolute ("/tmp/x") when outside it
    bytes: int
    version: str  # changes whenever the content may have changed (mtime_ns+size, remote id+bytes, ...)
    source: Literal["user", "generated"] = "generated"
    created_at: float = 0.0
    remote_id: str | None = None  # the backend's own id (openai: cfile_...)
    skipped: str | None = None  # why it is listed but never fetched or served, e.g. "a symbolic link"


_generations = itertools.count(1)


class Listing(list[RemoteFile]):
    """A listing that says how it differs from the one its backend handed out before it, so that whoever holds
    that one can update its own view from the difference alone, not by comparing every file (a backend may as
    well return a plain list). `generation` names this listing, `base` the generation it was made from (None:
    none), `changes` maps every path whose entry differs from that listing's to its entry here (None: gone)."""

    def __init__(
        self, files: Iterable[RemoteFile], base: int | None = None, changes: dict[str, RemoteFile | None] | None = None
    ) -> None:
        super().__init__(files)
        self.generation = next(_generations)
        self.base = base
        self.changes = changes if changes is not None else {}


@dataclass(slots=True)
class FetchResult:
    bytes: int
    sha256: str
    written: bool = True  # False: the host kept these bytes already and nothing was written
    path: str = ""  # where the copy is on the host (fetch_files; fetch_file writes to the dest it is given)
    kept: bool = False  # True: the sink stores the copy already (`CopySink.keep`); nothing left to place


class CopySink(Protocol):
    """Where a harvest's copies go on the host (the engine's store of one owner), asked from the worker thread
    that copies. Both may raise a `CIError` (StorageQuota: new bytes do not fit), which is that file's result."""

    def keep(self, data: bytes | bytearray, sha256: str, path: str) -> tuple[str, bool]:
        """Store the whole bytes of a small file (`path` in the container, for messages): (the host path of the
        stored copy, whether anything was written: identical bytes are stored once)."""
        ...

    def new_path(self) -> str:
        """A new host path (its folder may be missing) for a copy the backend writes itself."""
        ...


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the protocol's methods; the engine reads these instead of the backend's name."""

    # A model runs the code (openai): sentinel markers carry the run's nonce, `repair_json` can make a second
    # structured pass, and token usage is reported.
    model: bool
    # `execute` calls `ExecRequest.code_done` when the code finished but the answer is still being written, so
    # the container can be listed (and its files fetched) before `execute` returns.
    signals_code_done: bool
    # `execute` calls `ExecRequest.on_output` with what the code prints while it runs (live output).
    streams_output: bool = False
    # `ExecRequest.package_paths` are made importable (installed package sets); without it a run that asks for
    # packages is refused, and `preinstalled` names what the backend's own image already has.
    packages: bool = False
    preinstalled: str = ""
    # `ExecRequest.env` is set for the run (and put back after it); without it a run given env is refused.
    env: bool = False


@dataclass
class StructuredRequest:
    schema: dict[str, Any]
    nonce: str  # per-run random; markers are ===BEGIN_JSON <nonce>=== ... ===END_JSON <nonce>===
    strategy: Literal["two_pass_sentinel", "single_pass"] = "two_pass_sentinel"


@dataclass
class ExecRequest:
    code: str
    timeout_s: float
    instructions: str | None = None  # openai only: extra guidance to the model
    structured: StructuredRequest | None = None
    run_number: int = 1  # 1-based count of runs in this container (used to name saved figures)
    # Called once when the code has finished but the backend's answer is not complete yet (openai: the model
    # still writes its reply), so the engine can list and fetch files meanwhile. Set only for a backend whose
    # capabilities say `signals_code_done`.
    code_done: Callable[[], None] | None = None
    # Called with ("stdout" | "stderr", text) as the code prints, for a backend whose capabilities say
    # `streams_output`; the engine shows it live. It must not block: it only buffers.
    on_output: Callable[[str, str], None] | None = None
    # Installed package sets (host folders) to put first on the run's sys.path, for a backend whose capabilities
    # say `packages`. Every run names the session's sets; the worker adds new ones and drops the rest.
    package_paths: list[Path] = field(default_factory=list)
    # Environment variables for this run only (the session's kept ones and the run's own), for a backend whose
    # capabilities say `env`; checked by the engine (engine.envs: no server secret is ever among them).
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ExecError:
    type: str
    message: str
    traceback: str | None = None


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0

    def add(self, other: Usage | None) -> None:
        if other is not None:
            self.input_tokens += other.input_tokens
            self.output_tokens += other.output_tokens
            self.total_tokens += other.total_tokens


@dataclass
class ExecOutcome:
    status: Literal["ok", "error", "timeout", "cancelled"]
    stdout: str = ""
    stderr: str = ""
    result_repr: str | None = None  # repr() of the last expression (local), Jupyter-like
    error: ExecError | None = None
    truncated: bool = False
    state_lost: bool = False  # the worker/container was restarted during this run: variables are gone
    state_restored: dict[str, Any] | None = None  # a new worker loaded the session's snapshot before this run
    # What the run showed, in order (checked): {"kind", "data": {mime: part}, "path"?: a file in /mnt/data,
    # "stdout_at"?: characters of stdout before it, "table"?: a DataFrame's rows, "summary"/"chart"?: a figure's}
    outputs: list[dict[str, Any]] = field(default_factory=list)
    last_value_json: str | None = None  # local + structured: json.dumps(last expression) when serialisable
    text: str | None = None  # the model's text (openai); sandbox: links are left for the engine to rewrite
    sentinel_sources: list[str] = field(default_factory=list)  # texts to search for JSON marker blocks
    single_pass_json: str | None = None  # openai single_pass: the structured-output text
    cited_files: list[RemoteFile] = field(default_factory=list)  # known early (annotations): fetch at once
    executed_code: str | None = None
    warnings: list[str] = field(default_factory=list)
    usage: Usage | None = None
    model_calls: int = 0
    container: ContainerState | None = None  # fresh state from the backend after the run, when it has one


@dataclass
class RepairOutcome:
    text: str  # the repaired JSON text (to be validated again by the engine)
    usage: Usage | None = None


@dataclass
class Neighbours:
    """The other replicas' share of the per-owner cap on live workers (`MAX_LIVE_CONTAINERS_PER_OWNER`), set by
    the engine when replicas share a registry: how many live workers an owner has elsewhere (as last counted), and
    a way to have up to `n` of its idle ones stopped there (how many were)."""

    live_elsewhere: Callable[[str | None], int]
    evict_elsewhere: Callable[[str | None, int], Awaitable[int]]


@runtime_checkable
class Backend(Protocol):
    name: str
    isolation: str
    capabilities: Capabilities

    async def start(self) -> None:
        """Probe and prepare (e.g. the sandbox probe). Raise SandboxUnavailable/BackendError if unusable."""

    async def aclose(self) -> None:
        """Stop everything this backend started (workers; containers it created, if configured)."""

    async def save_state(self) -> None:
        """At a graceful stop, before any container is retired: save what a later worker restores (the local
        backend's namespace snapshots). Bounded in time; never raises."""

    async def create_container(
        self, session_id: str, expires_after_s: float, owner: str | None = None
    ) -> ContainerState:
        """A new container for the session; `owner` (the auth subject) is for per-owner caps on live workers.
        CapacityError when no worker can be had now."""
        ...

    async def refresh(self, container: ContainerState) -> ContainerState:
        """Current status and activity times (openai: from the API). Never raises for an expired container:
        returns it with status != "running". A container this process does not know (a row left by an earlier
        process whose worker is gone) comes back with status "stopped"."""
        ...

    async def execute(self, container: ContainerState, request: ExecRequest, progress: Progress) -> ExecOutcome:
        """Run code. Cancellation of the calling task must stop the run (interrupt, then kill)."""
        ...

    async def list_files(self, container: ContainerState) -> list[RemoteFile]:
        """Every regular file in the container's data folder (all pages). Symlinks are never listed."""
        ...

    async def fetch_file(self, container: ContainerState, file: RemoteFile, dest: Path, max_bytes: int) -> FetchResult:
        """Stream one file to `dest` on the host (constant memory). FileTooLarge over max_bytes,
        PathRefused for symlinks/escapes, DownloadFailed after retries."""
        ...

    async def fetch_files(
        self, container: ContainerState, files: list[RemoteFile], max_bytes: int, sink: CopySink
    ) -> list[FetchResult | CIError]:
        """Copy several files (a harvest's batch) into `sink`: each one's result (`path` says where its copy
        is) or its error, in order, so one refused file never costs the others. Many small files are cheap here
        (local: one worker thread). A backend that has a small file's bytes whole before writing them hands them
        to `sink.keep` (the result says `kept`); any other copy goes to a `sink.new_path()`."""
        ...

    async def put_file(self, container: ContainerState, src: Path, dest_path: str) -> RemoteFile:
        """Copy a host file into the container's data folder at dest_path (relative)."""
        ...

    async def destroy(self, container: ContainerState) -> None:
        """Stop and delete the container. Idempotent."""
        ...

    async def repair_json(self, schema: dict[str, Any], raw: str, problems: list[str]) -> RepairOutcome | None:
        """One model call that turns `raw` into JSON matching `schema`; None when the backend has no model."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for `doctor` and logs (isolation, limits, endpoint without secrets)."""
        ...
