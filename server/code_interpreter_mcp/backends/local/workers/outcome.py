"""What a run on the local backend reports: a worker's answer, its death, or its kill, as an `ExecOutcome`.

Pure mapping, no I/O: the worker's answer is untrusted (user code shares its process), so every field is checked
and capped here. When a run is stopped, and what that does to the worker, is runs.py's and pool.py's.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from ...base import ExecError, ExecOutcome
from .process import Printed

LOST_SUFFIX = "Variables and imports are lost; files in /mnt/data are kept."
RESTORED_SUFFIX = "Its variables came back from their last snapshot (container.state_restored); files are kept."
COMES_BACK = "The session's last snapshot of its variables is loaded before its next run."
UNSAFE_WARNING = (
    "UNSANDBOXED: this run had no isolation (unsafe_no_sandbox): the code could read and write the server's files "
    "and reach the network."
)


def text(value: Any, cap: int) -> str:
    if not isinstance(value, str):
        return "" if value is None else str(value)[:cap]
    return value if len(value) <= cap else value[:cap]


def from_answer(resp: dict[str, Any], structured: bool, cap: int) -> ExecOutcome:
    """Turn the worker's answer into an ExecOutcome."""
    stdout = text(resp.get("stdout"), cap)
    stderr = text(resp.get("stderr"), cap)
    status = resp.get("status") if resp.get("status") in ("ok", "error") else "error"
    err = resp.get("error")
    error = None
    if isinstance(err, dict):
        error = ExecError(
            type=text(err.get("type"), 200) or "Error",
            message=text(err.get("message"), cap),
            traceback=text(err.get("traceback"), cap) if err.get("traceback") is not None else None,
        )
    elif status == "error":
        error = ExecError("Error", "The run failed without details.")
    result = resp.get("result")
    last_json = resp.get("last_value_json") if structured else None
    sentinel = resp.get("sentinel") if structured else None
    raw_warnings = resp.get("warnings")
    warnings = (
        [text(w, 1000) for w in raw_warnings if isinstance(w, str)][:20] if isinstance(raw_warnings, list) else []
    )
    sources: list[str] = []
    if structured:
        sources = [sentinel] if isinstance(sentinel, str) and sentinel else [stdout]
    return ExecOutcome(
        status=status,  # type: ignore[arg-type]
        stdout=stdout,
        stderr=stderr,
        result_repr=text(result, cap) if isinstance(result, str) else None,
        error=error,
        truncated=resp.get("truncated") is True,
        last_value_json=last_json if isinstance(last_json, str) else None,
        sentinel_sources=sources,
        warnings=warnings,
        outputs=_outputs(resp.get("outputs")),
    )


MAX_OUTPUTS = 50  # the worker keeps as many
MAX_CHART_CHARS = 16_000  # the worker bounds each chart to 12,000; more means it did not
MAX_PART_CHARS = 110_000  # one inline MIME part: the worker inlines at most 100,000
MAX_TABLE_CHARS = 200_000  # 50 rows of 50 cells of at most 200 characters, and their labels
_KINDS = ("display", "result")


def _outputs(raw: object) -> list[dict[str, Any]]:
    """The worker's outputs, checked (user code shares its process): known keys of known types within their
    sizes; a part, table or chart that breaks the rules is left out, the output stays."""
    out: list[dict[str, Any]] = []
    for item in raw[:MAX_OUTPUTS] if isinstance(raw, list) else []:
        if not isinstance(item, dict) or item.get("kind") not in _KINDS:
            continue
        data = item.get("data") if isinstance(item.get("data"), dict) else {}
        parts = {"text/plain": text(data.get("text/plain"), 5000)}
        for mime, value in data.items():
            if isinstance(mime, str) and mime != "text/plain" and len(mime) <= 100 and _size(value) <= MAX_PART_CHARS:
                parts[mime] = value
        checked: dict[str, Any] = {"kind": item["kind"], "data": parts}
        if isinstance(item.get("path"), str):
            checked["path"] = item["path"][:500]
        at = item.get("stdout_at")
        if isinstance(at, int) and not isinstance(at, bool) and at >= 0:
            checked["stdout_at"] = at
        if isinstance(item.get("table"), dict) and _size(item["table"]) <= MAX_TABLE_CHARS:
            checked["table"] = item["table"]
        if isinstance(item.get("chart"), dict) and _size(item["chart"]) <= MAX_CHART_CHARS:
            checked["chart"] = item["chart"]
            checked["summary"] = text(item.get("summary"), 500)
        out.append(checked)
    return out


def _size(value: object) -> int:
    """Characters of the value's JSON; past every cap when it has none."""
    try:
        return len(json.dumps(value, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return 1 << 62


def timed_out(outcome: ExecOutcome, timeout_s: float) -> None:
    """The run was interrupted at its time limit and stopped: its answer becomes a timeout, state kept."""
    outcome.status = "timeout"
    tb = outcome.error.traceback if outcome.error else None
    outcome.error = ExecError(
        "TimeoutError",
        f"The run exceeded its {timeout_s:g} s time limit and was interrupted; variables and imports are kept.",
        tb,
    )


def ignored_timeout(timeout_s: float) -> ExecError:
    return ExecError(
        "TimeoutError",
        f"The run exceeded its {timeout_s:g} s time limit and did not stop when interrupted, so the worker "
        f"was restarted. {LOST_SUFFIX}",
    )


def ignored_quota(error: ExecError) -> ExecError:
    """A quota interrupt the code ignored."""
    error.message += f" It ignored the interrupt, so the worker was restarted. {LOST_SUFFIX}"
    return error


def kept_writing(error: ExecError, margin_mb: int) -> ExecError:
    """A quota breach the code kept writing past (by the hard margin): the sandbox was killed."""
    error.message += f" It kept writing ({margin_mb} MiB past the quota), so the worker was stopped. {LOST_SUFFIX}"
    return error


def over_memory(memory_mb: int) -> ExecError:
    """The container's processes together held more than memory_mb (the RSS check where no cgroup exists)."""
    return ExecError(
        "MemoryError",
        f"The container's processes together used more than memory_mb={memory_mb} MiB, so the worker was "
        f"stopped. {LOST_SUFFIX}",
    )


def worker_died(printed: Printed, reason: str, *, cpu_seconds: int, destroyed: bool) -> ExecOutcome:
    if "CPU-time" in reason:
        reason += f" (cpu_seconds={cpu_seconds})"
    if destroyed:
        reason = "the container was deleted while the code ran"
    return lost(printed, "error", ExecError("WorkerDied", f"The Python worker died: {reason}. {LOST_SUFFIX}"))


def lost(printed: Printed, status: Literal["error", "timeout"], error: ExecError) -> ExecOutcome:
    """A run that cost the worker its state."""
    return ExecOutcome(
        status=status,
        stdout=printed.stdout,
        stderr=printed.stderr,
        truncated=printed.truncated,
        error=error,
        state_lost=True,
    )
