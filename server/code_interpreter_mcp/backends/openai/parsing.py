"""Robust parsing of a final Responses API object (a raw dict) into an ExecOutcome.

Every odd shape becomes either a clear CIError or an "error" outcome, never a crash or a silent empty result:
an `output` that is not a list, empty output, message content nested in lists, status incomplete / failed /
cancelled, a failed code_interpreter_call, no code_interpreter_call at all, a traceback in the logs.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import replace
from typing import Any

from ... import errors
from ..base import ContainerState, ExecError, ExecOutcome, ExecRequest, RemoteFile, Usage
from .failures import Scrubber, reported_failure

DATA_PREFIX = "/mnt/data/"
SANDBOX_PREFIX = "sandbox:" + DATA_PREFIX
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TB_HEADER_RE = re.compile(r"^(?:[A-Za-z_][\w.]*[ \t]+)?Traceback \(most recent call last\):?[ \t]*$", re.MULTILINE)
_IPY_RULE_RE = re.compile(r"^-{10,}\s*$")
_EXC_LINE_RE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")
_LIKELY_EXC_RE = re.compile(r"(Error|Exception|Exit|Interrupt|Warning|Iteration)$")
_LINK_RE = re.compile(r"\[([^\]]*)\]\((sandbox:/mnt/data/[^)\s]+)\)")


def to_relative(api_path: str) -> str:
    """A container path as the Backend protocol wants it: relative to /mnt/data, absolute when outside."""
    if api_path.startswith(DATA_PREFIX):
        return api_path[len(DATA_PREFIX) :]
    return api_path


def normalise_code(code: str) -> str:
    lines = [line.rstrip() for line in code.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def parse_traceback(logs: str) -> tuple[str, ExecError] | None:
    """(output before the traceback, the error) when the logs END with a Python traceback (plain or IPython
    style); None otherwise. A traceback printed by code that then carried on is output, not an error."""
    text = _ANSI_RE.sub("", logs)
    lines = text.rstrip().splitlines()
    if not lines:
        return None
    last = lines[-1]
    match = _EXC_LINE_RE.match(last)
    if match is None or last.startswith((" ", "\t")):
        return None
    headers = list(_TB_HEADER_RE.finditer(text))
    if headers:
        start = headers[-1].start()
        before = text[:start]
        rule_lines = before.rstrip("\n").rsplit("\n", 1)
        if rule_lines and _IPY_RULE_RE.match(rule_lines[-1]):  # IPython puts a rule line above its header
            start = len(before.rstrip("\n")) - len(rule_lines[-1])
    elif match.group(1) in ("SyntaxError", "IndentationError", "TabError"):
        file_lines = [m.start() for m in re.finditer(r"^\s*File \"", text, re.MULTILINE)]
        if not file_lines:
            return None
        start = file_lines[-1]
    else:
        return None
    name, message = match.group(1), (match.group(2) or "").strip()
    if match.group(2) is None and not _LIKELY_EXC_RE.search(name):
        return None
    return text[:start], ExecError(type=name.rsplit(".", 1)[-1], message=message, traceback=text[start:].rstrip())


def _parts(content: Any) -> list[dict[str, Any]]:
    """Flatten message content: parts may come nested in lists, or as bare strings."""
    if isinstance(content, str):
        return [{"type": "output_text", "text": content, "annotations": []}]
    if isinstance(content, dict):
        return [content]
    if isinstance(content, list):
        out: list[dict[str, Any]] = []
        for part in content:
            out.extend(_parts(part))
        return out
    return []


def _part_text(part: dict[str, Any]) -> str | None:
    text = part.get("text")
    if isinstance(text, dict):  # {"value": ...} as some compatible servers send
        text = text.get("value")
    return text if isinstance(text, str) else None


def _cited_path(text: str, annotation: dict[str, Any]) -> str:
    """Best effort: the link the annotation spans, else the link labelled with its filename, else the name."""
    start, end = annotation.get("start_index"), annotation.get("end_index")
    if isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text):
        span = text[start:end]
        if span.startswith(SANDBOX_PREFIX):
            return span[len(SANDBOX_PREFIX) :]
    filename = str(annotation.get("filename") or "")
    for label, link in _LINK_RE.findall(text):
        if label == filename or link.endswith("/" + filename):
            return link[len(SANDBOX_PREFIX) :]
    return filename


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None

    def num(key: str) -> int:
        value = raw.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    usage = Usage(num("input_tokens"), num("output_tokens"), num("total_tokens"))
    if not usage.total_tokens:
        usage.total_tokens = usage.input_tokens + usage.output_tokens
    return usage


def _raise_for_terminal_status(final: dict[str, Any], scrub: Scrubber) -> None:
    status = final.get("status")
    if status == "failed":
        error = final.get("error") if isinstance(final.get("error"), dict) else {}
        raise reported_failure(error, scrub, "during the run", "no reason given")
    if status == "cancelled":
        raise errors.BackendError("The response was cancelled before it finished.", hint="Run again.")


def _incomplete_reason(final: dict[str, Any]) -> str:
    details = final.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    return str(reason or "no reason given")


def parse_run(final: dict[str, Any], request: ExecRequest, container: ContainerState, scrub: Scrubber) -> ExecOutcome:
    """The outcome of one run from its final response object."""
    _raise_for_terminal_status(final, scrub)
    incomplete = final.get("status") == "incomplete"
    output = final.get("output")
    if not isinstance(output, list):
        raise errors.ResponseMalformed(
            f"The response's output is {type(output).__name__}, not a list, so the run cannot be read."
        )
    if not output:
        if incomplete:
            raise errors.BackendError(
                f"The response stopped ({_incomplete_reason(final)}) before the model ran the code.",
                hint="Run again; if it keeps happening, shorten the code or the instructions.",
            )
        raise errors.ResponseMalformed("The response has an empty output: the model returned nothing.")

    calls = [i for i in output if isinstance(i, dict) and i.get("type") == "code_interpreter_call"]
    messages = [i for i in output if isinstance(i, dict) and i.get("type") == "message"]
    warnings: list[str] = []
    if len(calls) + len(messages) < len(output):
        kinds = {str(i.get("type")) if isinstance(i, dict) else type(i).__name__ for i in output}
        odd = sorted(kinds - {"message", "code_interpreter_call", "reasoning"})
        if odd:
            warnings.append(f"Ignored output items of unexpected type: {', '.join(odd)}.")

    texts: list[str] = []
    cited: dict[str, RemoteFile] = {}
    for message in messages:
        for part in _parts(message.get("content")):
            if part.get("type") == "refusal":
                texts.append(str(part.get("refusal") or ""))
                warnings.append("The model refused part of the request.")
                continue
            text = _part_text(part)
            if text is None:
                continue
            texts.append(text)
            annotations = part.get("annotations")
            for annotation in annotations if isinstance(annotations, list) else []:
                if not isinstance(annotation, dict) or annotation.get("type") != "container_file_citation":
                    continue
                file_id = annotation.get("file_id")
                if not isinstance(file_id, str) or not file_id or file_id in cited:
                    continue
                if annotation.get("container_id") not in (None, container.id):
                    warnings.append(f"A citation names another container ({annotation.get('container_id')}).")
                    continue
                cited[file_id] = RemoteFile(
                    path=to_relative(_cited_path(text, annotation)),
                    bytes=0,  # unknown until the file list says; fetch_file checks the streamed size
                    version=f"{file_id}:",
                    source="generated",
                    remote_id=file_id,
                )
    text = "\n\n".join(t for t in texts if t) or None

    if not calls:
        if incomplete:
            raise errors.BackendError(
                f"The response stopped ({_incomplete_reason(final)}) before the model ran the code.",
                hint="Run again; if it keeps happening, shorten the code or the instructions.",
            )
        raise errors.ResponseMalformed(
            "The model answered without calling the python tool, so the code did not run.",
            hint="Run again; if it keeps happening, check that the model supports the code_interpreter tool.",
        )

    logs: list[str] = []
    codes: list[str] = []
    call_error: ExecError | None = None
    for call in calls:
        code = call.get("code")
        if isinstance(code, str):
            codes.append(code)
        outputs = call.get("outputs")
        if outputs is None:
            warnings.append("The API returned no outputs for the code_interpreter call, so stdout is empty.")
        images = 0
        for out in outputs if isinstance(outputs, list) else []:
            if isinstance(out, dict) and out.get("type") == "logs" and isinstance(out.get("logs"), str):
                logs.append(out["logs"])
            elif isinstance(out, dict) and out.get("type") == "image":
                images += 1
        if images:
            warnings.append(f"{images} image output(s) of the call are not returned inline; saved files are.")
        status = call.get("status")
        if status != "completed" and call_error is None:
            call_error = ExecError(
                type="CodeInterpreterCallFailed",
                message=f"The code_interpreter call ended with status {status!r}; the code may not have run.",
            )
        if call.get("container_id") not in (None, container.id):
            warnings.append(f"The code ran in another container ({call.get('container_id')}).")
    if len(calls) > 1:
        warnings.append(f"The model ran code {len(calls)} times instead of once; stdout holds every run.")

    stdout = "".join(logs)
    error = call_error
    parsed = parse_traceback(stdout)
    if parsed is not None:
        stdout, tb_error = parsed
        error = error or tb_error
        if call_error is not None:
            call_error.traceback = tb_error.traceback

    executed = "\n\n".join(codes) if codes else None
    if executed is None:
        warnings.append("The API did not say which code ran.")
    elif normalise_code(codes[0]) != normalise_code(request.code):
        diff = list(
            difflib.unified_diff(
                normalise_code(request.code).splitlines(), normalise_code(codes[0]).splitlines(), lineterm="", n=0
            )
        )
        changed = sum(1 for d in diff if d[:1] in "+-" and not d.startswith(("+++", "---")))
        if changed:
            warnings.append(
                f"The model changed the code before running it ({changed} line(s) differ); "
                "executed_code shows what actually ran."
            )
    if incomplete:
        warnings.append(
            f"The response was cut short ({_incomplete_reason(final)}): the code ran, but the model's answer "
            "may be incomplete."
        )

    outcome = ExecOutcome(
        status="error" if error is not None else "ok",
        stdout=stdout,
        error=error,
        text=text,
        cited_files=list(cited.values()),
        executed_code=executed,
        warnings=warnings,
        usage=_usage(final.get("usage")),
        model_calls=1,
        container=_container_after(final, container),
    )
    structured = request.structured
    if structured is not None and structured.strategy == "two_pass_sentinel":
        outcome.sentinel_sources = [text or "", stdout]
    elif structured is not None:
        outcome.single_pass_json = text
    return outcome


def _container_after(final: dict[str, Any], container: ContainerState) -> ContainerState:
    """The container was active when the API finished the response: move last_active_at to the API's time."""
    stamps = [final.get(k) for k in ("completed_at", "created_at")]
    api_time = next((float(s) for s in stamps if isinstance(s, int | float) and not isinstance(s, bool)), None)
    if api_time is None or api_time <= container.last_active_at:
        return replace(container, status="running")
    return replace(container, last_active_at=api_time, status="running")


def parse_repair(final: dict[str, Any], scrub: Scrubber) -> tuple[str, Usage | None]:
    """The text of a repair call (structured output, no tools)."""
    _raise_for_terminal_status(final, scrub)
    output = final.get("output")
    if not isinstance(output, list):
        raise errors.ResponseMalformed(f"The repair response's output is {type(output).__name__}, not a list.")
    texts = [
        t
        for item in output
        if isinstance(item, dict) and item.get("type") == "message"
        for part in _parts(item.get("content"))
        if (t := _part_text(part))
    ]
    if not texts:
        raise errors.ResponseMalformed("The repair response has no text.")
    return "".join(texts), _usage(final.get("usage"))
