"""A run's JSON result: where it comes from (the last expression, the marker block, the single-pass answer, one
repair call), its validation against the caller's schema, and the token usage of the model calls involved.

Extraction and validation run in the guard's processes (`structured.guard`), so neither the work nor jsonschema
itself ever reaches the event loop. This module knows the backend's outcome and capabilities; it knows nothing
of containers, files or MCP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..backends.base import Backend, ExecOutcome, StructuredRequest, Usage
from ..models import JsonError, StructuredInfo, TokenUsage, Violation

if TYPE_CHECKING:
    from ..structured.guard import Checked, Guard


@dataclass
class ResolvedJson:
    value: Any = None
    error: JsonError | None = None
    info: StructuredInfo | None = None
    usage: Usage = field(default_factory=Usage)  # of every model call of the run, repair included
    calls: int = 0


def token_usage(usage: Usage, model: bool) -> TokenUsage | None:
    if not model:
        return None
    return TokenUsage(
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, total_tokens=usage.total_tokens
    )


async def resolve_json(
    backend: Backend, outcome: ExecOutcome, sreq: StructuredRequest | None, code: str, guard: Guard
) -> ResolvedJson:
    """The run's JSON: extracted, validated locally, and repaired by one model call only when needed. Extraction
    and validation run in the guard's processes (time and size limits), never on the event loop."""
    usage = Usage()
    usage.add(outcome.usage)
    calls = outcome.model_calls
    if sreq is None:
        return ResolvedJson(usage=usage, calls=calls)
    from .. import structured

    model = backend.capabilities.model
    strategy: Any = sreq.strategy if model else "local"
    schema = sreq.schema
    if not model and outcome.last_value_json is not None and outcome.last_value_json != "null":
        path, checked = "last_expression", await guard.extract("text", (outcome.last_value_json,), schema)
    elif model and sreq.strategy == "single_pass":
        path, checked = "single_pass", await guard.extract("text", (outcome.single_pass_json or "",), schema)
    else:
        path = "sentinel"
        checked = await guard.extract("sources", (outcome.sentinel_sources, sreq.nonce if model else None), schema)
        if model and not checked.extracted.found and structured.code_prints_block(code):
            # The code prints its own plain block, so the model was not asked for one. Only then is a plain
            # block in the output taken: elsewhere it could be data that merely contains the markers.
            printed = await guard.extract("block", (outcome.stdout, None), schema)
            if printed.extracted.found or (printed.extracted.problem and not checked.extracted.problem):
                checked = printed

    def check(found: Checked, missing: str) -> tuple[list[Violation], list[str]]:
        if not found.extracted.found:
            return [], [found.extracted.problem or missing]
        return found.violations, [f"{v.path}: {v.message}" for v in found.violations]

    extracted = checked.extracted
    violations, problems = check(checked, "No JSON result was found.")
    value = extracted.value if not problems else None
    # A run that raised gets a repair only for a broken block it did print: with nothing to repair, a model
    # forced into the schema would invent the values.
    if (
        problems
        and model
        and sreq.strategy == "two_pass_sentinel"
        and outcome.status != "timeout"
        and (outcome.status == "ok" or extracted.raw is not None)
    ):
        repair = await backend.repair_json(sreq.schema, extracted.raw or outcome.text or outcome.stdout, problems)
        if repair is not None:
            calls += 1
            usage.add(repair.usage)
            path = "repair"
            repaired = checked = await guard.extract("text", (repair.text,), schema)
            violations, problems = check(repaired, "The repair call returned no JSON.")
            value = repaired.extracted.value if not problems else None
    info = StructuredInfo(strategy=strategy, path=path, model_calls=calls, usage=token_usage(usage, model))
    if not problems:
        return ResolvedJson(value, None, info, usage, calls)
    if violations:
        return ResolvedJson(None, structured.json_error_from(violations), info, usage, calls)
    if checked.limited:  # the guard's message carries its own hint; the one below would mislead
        return ResolvedJson(None, structured.json_error_from(problems[0]), info, usage, calls)
    hint = (
        "The model did not return the JSON block; print it between ===BEGIN_JSON=== and ===END_JSON==="
        if model
        else "End the code with an expression holding the result, or print it between ===BEGIN_JSON=== and "
        "===END_JSON==="
    )
    return ResolvedJson(None, structured.json_error_from(f"{problems[0]} {hint}."), info, usage, calls)
