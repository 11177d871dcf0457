"""The behaviours of the OpenAI API emulator that tests switch on and off.

A `Behaviour` is a plain mutable object: tests hold it (`emulator.behaviour.latency_s = 0.2`), the loopback
server takes it as JSON (`POST /_emulator/behaviour`, `--behaviour`, `CI_EMULATOR_BEHAVIOUR`), and the emulator
reads it on every request, so a change applies to the next call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

# Endpoint kinds that faults and call counters use.
KINDS = (
    "containers.create",
    "containers.retrieve",
    "containers.list",
    "containers.delete",
    "files.create",
    "files.list",
    "files.retrieve",
    "files.content",
    "files.delete",
    "uploads.create",
    "responses",
)

OutputMode = Literal[
    "normal",  # a code_interpreter_call that really runs the code, then a message
    "empty",  # status completed, output []
    "not_a_list",  # output is an object, not a list (the SDK's strict models reject this)
    "nested_content",  # the message content is a list nested in a list
    "no_tool_call",  # only a message: the model never ran the code
    "call_failed",  # the code_interpreter_call has status "failed" (the code is not run)
    "incomplete",  # the code runs, then the response stops with status incomplete (max_output_tokens)
    "incomplete_before_call",  # status incomplete before any tool call
    "failed",  # response.failed with error.code server_error
    "cancelled",  # status cancelled
    "stream_error",  # an `error` event in the middle of the stream
    "repeat_call",  # the model runs the code twice (two code_interpreter_call items)
]


@dataclass
class Fault:
    """Make the Nth call of an endpoint kind fail, counting from when the fault was installed (1-based).

    mode "status": answer `status` with an OpenAI error body (and Retry-After for 429/503 when set).
    mode "drop": (files.content, responses) start the body, then drop the connection after `drop_after_bytes`.
    """

    kind: str
    status: int = 500
    on_call: int = 1
    times: int = 1
    mode: Literal["status", "drop"] = "status"
    retry_after: str | None = "0.01"
    message: str | None = None
    drop_after_bytes: int = 1
    seen: int = 0  # calls of this kind since the fault was installed

    def fires(self, kind: str) -> bool:
        """Count one call of `kind`; True when this call must fail."""
        if self.kind not in (kind, "*"):
            return False
        self.seen += 1
        return self.on_call <= self.seen < self.on_call + self.times


@dataclass
class Behaviour:
    """Everything configurable. Defaults imitate the real API."""

    # Latency injected before answering: every API call, and (instead) every file content download.
    latency_s: float = 0.0
    download_latency_s: float = 0.0
    # Time the model takes to write its answer after the code ran (real models take seconds).
    answer_delay_s: float = 0.0
    # container_file_citation annotations: "auto" = present on plain text, dropped under text.format (as the real
    # API does); "always"; "never" (links in the text but annotations: [], as seen in public traces).
    annotations: Literal["auto", "always", "never"] = "auto"
    # The citation's filename: the file's name, or its cfile id with the extension (the docs example does that).
    citation_filename: Literal["name", "file_id"] = "name"
    # Where uploads land: /mnt/data/<name>, or /mnt/data/<hash>-<name> (the official example shows the latter).
    upload_paths: Literal["plain", "hashed"] = "plain"
    # Idle seconds after which a container expires (None: only the container's own expires_after minutes).
    idle_expiry_s: float | None = None
    # What GET /containers/{id} answers for an expired container: 200 with status "expired", or 400.
    expired_retrieve: Literal["status", "error"] = "status"
    # Page size cap for list endpoints (the API allows 100; small by default so tests see several pages).
    page_size_cap: int = 3
    output_mode: OutputMode = "normal"
    alter_code: str | None = None  # a line the model appends to the code before running it
    model_text: str | None = None  # scripted message text (sandbox links in it are still cited)
    sentinel_json: str | None = None  # scripted JSON text for the marker block / the single-pass answer
    repair_text: str | None = None  # scripted answer of a repair call (text.format, no tools)
    require_include: bool = True  # outputs (logs) only when include has code_interpreter_call.outputs
    api_key: str | None = None  # when set, any other key gets 401 (whose message echoes the key, like the API)
    echo_key_in_errors: bool = False  # adversarial: put the caller's key in every error message
    chunk_size: int = 256 * 1024  # download body chunk size
    exec_timeout_s: float = 120.0
    faults: list[Fault] = field(default_factory=list)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a JSON-like partial update (faults as a list of dicts replaces the list)."""
        names = {f.name for f in fields(self)}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"unknown behaviour {key!r}")
            if key == "faults":
                value = [v if isinstance(v, Fault) else Fault(**v) for v in value]
            setattr(self, key, value)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Behaviour:
        behaviour = cls()
        behaviour.update(data or {})
        return behaviour
