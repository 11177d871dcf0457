"""Responses API calls: building the run and repair requests, and streaming them to a final response dict.

The stream is read as raw server-sent events (JSON dicts), not through the SDK's event models, so an odd
payload reaches `parsing.py` intact instead of failing (or half-parsing) inside the SDK. Stream events drive the
progress callback: model started, running code, interpreting, writing answer, done.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from openai import AsyncOpenAI

from ... import errors, structured
from ..base import ExecRequest, Progress
from .failures import Scrubber, map_exception, reported_failure

log = logging.getLogger(__name__)

TERMINAL_STATUSES = {"completed", "incomplete", "failed", "cancelled"}

RUN_INSTRUCTIONS = (
    "You are a code runner. Call the python tool (code_interpreter) exactly once, with the code in the user's "
    "message copied verbatim: do not change, fix, reformat, shorten or extend it, even if it looks wrong or "
    "fails, and do not run any other code. After the tool returns, link every file the code created or changed "
    "under /mnt/data as [name](sandbox:/mnt/data/name) and do not repeat the output."
)
PLAIN_ANSWER = " Reply briefly: one or two sentences about the outcome."
SINGLE_PASS_INSTRUCTIONS = (
    "Your final answer must be only the JSON result of the code (what it printed as JSON, or the value of its "
    "last expression), matching the response schema."
)
REPAIR_INSTRUCTIONS = (
    "You repair JSON. Rewrite the raw output below as JSON that matches the response schema, keeping its data; "
    "fix only what the listed problems require. Answer with the JSON only."
)
USER_INSTRUCTIONS_HEADER = "Additional instructions from the user (they never override running the code verbatim):"


def fenced(code: str) -> str:
    """The code in a ```python block whose fence is longer than any backtick run inside the code."""
    longest = max((len(m) for m in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}python\n{code}\n{fence}"


def run_input(code: str) -> str:
    return "Run this Python code with the python tool, exactly as written:\n\n" + fenced(code)


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    strict = structured.is_strict_compatible(schema)  # strict only when the API would accept the schema as is
    return {"type": "json_schema", "name": "result", "schema": schema, "strict": strict}


def run_request(model: str, container_id: str, request: ExecRequest) -> dict[str, Any]:
    """Keyword arguments of responses.create for one run (stream=True is added by `stream_final`)."""
    instructions = RUN_INSTRUCTIONS
    kwargs: dict[str, Any] = {}
    sreq = request.structured
    if sreq is None or (sreq.strategy == "two_pass_sentinel" and structured.code_prints_block(request.code)):
        instructions += PLAIN_ANSWER
    elif sreq.strategy == "two_pass_sentinel":
        instructions += " " + structured.sentinel_instructions(sreq.nonce, sreq.schema)
    else:
        instructions += "\n\n" + SINGLE_PASS_INSTRUCTIONS
        kwargs["text"] = {"format": json_schema_format(sreq.schema)}
    if request.instructions:
        instructions += f"\n\n{USER_INSTRUCTIONS_HEADER}\n{request.instructions}"
    return {
        "model": model,
        "instructions": instructions,
        "input": run_input(request.code),
        "tools": [{"type": "code_interpreter", "container": container_id}],
        "tool_choice": {"type": "code_interpreter"},
        "include": ["code_interpreter_call.outputs"],
        "max_tool_calls": 1,
        "parallel_tool_calls": False,
        **kwargs,
    }


def repair_request(model: str, schema: dict[str, Any], raw: str, problems: list[str]) -> dict[str, Any]:
    listed = "\n".join(f"- {p}" for p in problems) or "- (none listed)"
    return {
        "model": model,
        "instructions": REPAIR_INSTRUCTIONS,
        "input": f"Raw output:\n{raw}\n\nProblems:\n{listed}",
        "tools": [],
        "text": {"format": json_schema_format(schema)},
    }


class _ProgressReporter:
    """Maps stream events to progress(done, total, message), each stage once and never backwards."""

    STAGES = ("model started", "running code", "interpreting", "writing answer", "done")

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._reached = -1

    async def on_event(self, event: dict[str, Any]) -> None:
        etype = event.get("type")
        item = event.get("item") if isinstance(event.get("item"), dict) else {}
        stage = -1
        if etype == "response.created":
            stage = 0
        elif etype == "response.code_interpreter_call.in_progress" or (
            etype == "response.output_item.added" and item.get("type") == "code_interpreter_call"
        ):
            stage = 1
        elif etype == "response.code_interpreter_call.interpreting":
            stage = 2
        elif etype == "response.output_item.added" and item.get("type") == "message":
            stage = 3
        elif etype in ("response.completed", "response.incomplete", "response.failed"):
            stage = 4
        if stage > self._reached:
            self._reached = stage
            try:
                await self._progress(float(stage), float(len(self.STAGES) - 1), self.STAGES[stage])
            except Exception:  # a client that cannot take progress must not fail the run
                log.debug("progress callback failed", exc_info=True)


async def _sse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """Server-sent events to JSON dicts; an event without "type" takes its SSE event name."""
    event_name: str | None = None
    data: list[str] = []

    def parse() -> dict[str, Any] | None:
        raw = "\n".join(data)
        if not raw or raw.startswith("[DONE]"):
            return None
        try:
            obj = json.loads(raw)
        except ValueError:
            raise errors.ResponseMalformed("The response stream carried an event that is not JSON.") from None
        if not isinstance(obj, dict):
            raise errors.ResponseMalformed("The response stream carried an event that is not a JSON object.")
        if "type" not in obj and event_name:
            obj["type"] = event_name
        return obj

    async for line in lines:
        if line == "":
            event = parse()
            event_name, data = None, []
            if event is not None:
                yield event
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event_name = value
    event = parse()
    if event is not None:
        yield event


def _stream_error(event: dict[str, Any], scrub: Scrubber) -> errors.CIError:
    body = event.get("error") if isinstance(event.get("error"), dict) else event
    return reported_failure(body, scrub, "while the code ran", "the response stream reported an error")


async def stream_final(
    client: AsyncOpenAI,
    kwargs: dict[str, Any],
    progress: Progress,
    scrub: Scrubber,
    what: str,
    on_code_done: Callable[[], None] | None = None,
    on_output: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Make one streamed responses.create call; return the final response object as a raw dict.
    `on_code_done` is called when a code_interpreter_call item completes (the model may still be writing);
    `on_output` gets that call's logs then, the earliest the stream carries what the code printed."""
    reporter = _ProgressReporter(progress)
    final: dict[str, Any] | None = None
    items: dict[int, Any] = {}
    try:
        async with client.responses.with_streaming_response.create(**kwargs, stream=True) as resp:
            async for event in _sse_events(resp.iter_lines()):
                await reporter.on_event(event)
                etype = str(event.get("type", ""))
                if etype == "error" or (etype == "" and "error" in event):
                    raise _stream_error(event, scrub)
                snapshot = event.get("response")
                if isinstance(snapshot, dict) and snapshot.get("status") in TERMINAL_STATUSES:
                    final = snapshot
                if etype == "response.output_item.done" and isinstance(event.get("output_index"), int):
                    item = event.get("item")
                    items[event["output_index"]] = item
                    if on_output is not None and isinstance(item, dict) and item.get("type") == "code_interpreter_call":
                        for out in item.get("outputs") or []:
                            if isinstance(out, dict) and out.get("type") == "logs" and isinstance(out.get("logs"), str):
                                on_output("stdout", out["logs"])
                    if (
                        on_code_done is not None
                        and isinstance(item, dict)
                        and item.get("type") == "code_interpreter_call"
                        and item.get("status") == "completed"
                    ):
                        on_code_done()
                        on_code_done = None
    except errors.CIError:
        raise
    except Exception as exc:
        raise map_exception(exc, what, scrub) from None
    if final is None:
        raise errors.UpstreamUnavailable(
            f"The response stream ended before the response finished ({what}).",
            hint="The connection was probably cut; run again.",
        )
    if final.get("output") is None and items:  # some proxies send a terminal event without the output
        final["output"] = [items[i] for i in sorted(items)]
    return final
