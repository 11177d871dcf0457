"""Every inbound JSON-RPC text gets an answer: the screen both transports (`stdio`, `http_screen`) run first.

The mcp 2.3 SDK drops what it cannot parse: on stdio an undecodable or invalid line becomes an exception on the
read stream that the dispatcher logs and forgets (`shared/jsonrpc_dispatcher.py`, `_dispatch`), so the client
waits forever; over HTTP an invalid request is answered -32602 without its id, a message nested deeper than
pydantic-core's recursion limit (about 200 levels) is a parse error, and an object id makes a request pass as a
notification (202, no answer). This module owns the verdict on one text: a valid message to hand on, the
JSON-RPC error to answer (-32700 parse error for text that is not JSON, -32600 invalid request for JSON that is
not a request we take, with the request's id when it has a usable one), or nothing for a malformed response
(a response is never answered). Knows nothing of streams, HTTP or tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from mcp_types import INVALID_REQUEST, PARSE_ERROR, ErrorData, JSONRPCError
from pydantic import ValidationError

from ..structured.guard import MAX_JSON_DEPTH, json_depth

# Past this the SDK's own parser refuses a message; the envelope (request, params, arguments) is three levels.
MAX_MESSAGE_DEPTH = MAX_JSON_DEPTH + 8


@dataclass
class Verdict:
    """`message` to dispatch, or `error` to answer; both None: drop silently (a malformed response)."""

    message: types.JSONRPCMessage | None = None
    error: JSONRPCError | None = None


def error_reply(code: int, message: str, request_id: Any = None) -> JSONRPCError:
    usable = isinstance(request_id, str | int) and not isinstance(request_id, bool)
    return JSONRPCError(jsonrpc="2.0", id=request_id if usable else None, error=ErrorData(code=code, message=message))


def screen(raw: str | bytes) -> Verdict:
    """The verdict on one JSON-RPC text (a stdio line or an HTTP body)."""
    try:
        message = types.jsonrpc_message_adapter.validate_json(raw, by_name=False)
    except ValidationError as exc:
        return Verdict(error=_diagnose(raw, exc))
    needle: Any = b'"id"' if isinstance(raw, bytes) else '"id"'
    if isinstance(message, types.JSONRPCNotification) and needle in raw:
        # An id pydantic could not take (an object, a float) silently turns a request into a notification.
        parsed = json.loads(raw)
        if isinstance(parsed, dict) and "id" in parsed:
            return Verdict(error=error_reply(INVALID_REQUEST, "Invalid Request: id must be a string or an integer"))
    return Verdict(message=message)


def _diagnose(raw: str | bytes, exc: ValidationError) -> JSONRPCError | None:
    try:
        parsed = json.loads(raw)
    except RecursionError:
        return error_reply(INVALID_REQUEST, f"Invalid Request: nested too deeply (the limit is {MAX_MESSAGE_DEPTH})")
    except UnicodeDecodeError:
        return error_reply(PARSE_ERROR, "Parse error: the message is not valid UTF-8")
    except ValueError as err:
        return error_reply(PARSE_ERROR, f"Parse error: {err}")
    if isinstance(parsed, list):
        what = "an empty batch" if not parsed else "batches are not supported by MCP; send one message at a time"
        return error_reply(INVALID_REQUEST, f"Invalid Request: {what}")
    if not isinstance(parsed, dict):
        return error_reply(INVALID_REQUEST, "Invalid Request: a message must be a JSON object")
    request_id = parsed.get("id")
    depth = json_depth(parsed)
    if depth > MAX_MESSAGE_DEPTH:
        too_deep = f"Invalid Request: nested {depth} levels deep; the limit is {MAX_MESSAGE_DEPTH}"
        return error_reply(INVALID_REQUEST, too_deep, request_id)
    if "method" not in parsed and ("result" in parsed or "error" in parsed):
        return None  # a broken response: JSON-RPC never answers a response
    return error_reply(INVALID_REQUEST, f"Invalid Request: {_first_problem(parsed, exc)}", request_id)


def _first_problem(parsed: dict[str, Any], exc: ValidationError) -> str:
    if parsed.get("jsonrpc") != "2.0":
        return 'jsonrpc must be "2.0"'
    if not isinstance(parsed.get("method"), str):
        return "method must be a string"
    if "params" in parsed and not isinstance(parsed["params"], dict):
        return "params must be an object"
    if "id" in parsed and not (isinstance(parsed["id"], str | int) and not isinstance(parsed["id"], bool)):
        return "id must be a string or an integer"
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"][1:]) or "message"
    return f"{where}: {first['msg']}"[:300]
