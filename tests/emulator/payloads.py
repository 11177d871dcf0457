"""Wire objects of the emulated API, shaped field by field after the openai SDK's models (strict-valid)."""

from __future__ import annotations

import time
from typing import Any

from .sandbox import FileRec

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    429: "requests",
}
DEFAULT_MESSAGES = {
    400: "Bad request.",
    401: "Incorrect API key provided.",
    403: "You are not allowed to do this.",
    404: "Not found.",
    408: "Request timed out.",
    429: "Rate limit reached for requests. Please try again later.",
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The engine is currently overloaded, please try again later.",
}
EXPIRED = "Container is expired."


def error_body(status: int, message: str | None = None, code: str | None = None) -> dict[str, Any]:
    if code is None and status == 429:
        code = "rate_limit_exceeded"
    return {
        "error": {
            "message": message or DEFAULT_MESSAGES.get(status, "Error."),
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": None,
            "code": code,
        }
    }


def file_wire(rec: FileRec, container_id: str) -> dict[str, Any]:
    return {
        "id": rec.id,
        "object": "container.file",
        "created_at": int(rec.created_at),
        "bytes": rec.bytes,
        "container_id": container_id,
        "path": rec.path,
        "source": rec.source,
    }


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def response(
    request: dict[str, Any],
    response_id: str,
    created_at: int,
    status: str,
    output: Any,
    *,
    usage_obj: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
) -> dict[str, Any]:
    text_cfg = request.get("text") if isinstance(request.get("text"), dict) else {}
    fmt = text_cfg.get("format") or {"type": "text"}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "max_tool_calls": request.get("max_tool_calls"),
        "model": request.get("model") or "gpt-emulator",
        "output": output,
        "parallel_tool_calls": bool(request.get("parallel_tool_calls", True)),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": bool(request.get("store", True)),
        "temperature": 1.0,
        "text": {"format": fmt, "verbosity": "medium"},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage_obj,
        "user": None,
        "metadata": {},
    }


def ci_item(item_id: str, container_id: str, code: str, status: str, outputs: list[dict[str, Any]] | None) -> dict:
    return {
        "id": item_id,
        "type": "code_interpreter_call",
        "status": status,
        "code": code,
        "container_id": container_id,
        "outputs": outputs,
    }


def text_part(text: str, annotations: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": annotations, "logprobs": []}


def message_item(item_id: str, status: str, content: list[Any]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def citation(container_id: str, file_id: str, filename: str, start: int, end: int) -> dict[str, Any]:
    return {
        "type": "container_file_citation",
        "container_id": container_id,
        "file_id": file_id,
        "filename": filename,
        "start_index": start,
        "end_index": end,
    }
