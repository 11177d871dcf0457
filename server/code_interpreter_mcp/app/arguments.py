"""Tool arguments as given: strings stay strings, and an argument the tool does not know is an error.

Unknown arguments: the SDK's argument model ignores names it does not declare, so `envs`, `cwd` or
`global_variables` (what callers used to other sandboxes send) would be dropped without a word and the run would
go on without them. Here any such name fails the call with `invalid_arguments`, naming it, the nearest known
argument (difflib) and the tool's arguments, as a tool error the model can read and correct.

Strings:
The mcp SDK (`mcpserver/utilities/func_metadata.py`, `FuncMetadata.pre_parse_json`) runs `json.loads` on every
string argument whose annotation is not exactly `str`, to undo clients that send lists and objects as JSON text.
For `str | None` that turns the string "null" into None (a session id "null" ran in the default session), and
"true", "[1]" or "{}" into other types. This module owns the narrower rule: a string given for a parameter that
accepts strings is kept as it is; pre-parsing still serves parameters that take no string (`files`, a list;
`output_schema`, an object). Knows nothing of what any tool does.
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError


def accepts_str(annotation: Any) -> bool:
    """Whether a value of this annotation may be a string (str, str | None, a Literal of strings...)."""
    if annotation is str:
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return accepts_str(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return any(accepts_str(arg) for arg in get_args(annotation))
    if origin is Literal:
        return any(isinstance(arg, str) for arg in get_args(annotation))
    return False


def unknown_arguments_message(tool: str, unknown: list[str], known: list[str]) -> str:
    """What the caller reads: each unknown name with the nearest known one, and the tool's arguments."""
    parts = []
    for name in unknown:
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        shown = repr(name[:60])
        parts.append(f"{shown} (did you mean {near[0]!r}?)" if near else shown)
    noun = "argument" if len(unknown) == 1 else "arguments"
    return (
        f"[invalid_arguments] {tool} has no {noun} {', '.join(parts)}; it was not run. "
        f"Its arguments: {', '.join(known)}."
    )


class StringsStayStrings(FuncMetadata):
    """The SDK's argument metadata with pre-parsing skipped for string-accepting parameters, and unknown
    arguments refused."""

    tool_name: str = ""

    def validate_arguments(self, arguments_to_validate: dict[str, Any]) -> dict[str, Any]:
        fields = self.arg_model.model_fields
        known = [f.alias or name for name, f in fields.items()]
        accepted = set(known) | set(fields)
        unknown = [k for k in arguments_to_validate if k not in accepted]
        if unknown:
            # A ValidationError is what the SDK reports as a tool error with its text (anything else it hides).
            message = unknown_arguments_message(self.tool_name, unknown, known)
            details: list[InitErrorDetails] = [
                {"type": PydanticCustomError("invalid_arguments", message), "loc": (unknown[0],), "input": None}
            ]
            raise ValidationError.from_exception_data(self.tool_name, details, hide_input=True)
        return super().validate_arguments(arguments_to_validate)

    def pre_parse_json(self, data: dict[str, Any]) -> dict[str, Any]:
        parsed = super().pre_parse_json(data)
        fields = self.arg_model.model_fields
        by_key = {**{f.alias: f for f in fields.values() if f.alias}, **fields}
        for key, value in data.items():
            field = by_key.get(key)
            if field is not None and isinstance(value, str) and accepts_str(field.annotation):
                parsed[key] = value
        return parsed


def keep_strings(mcp: MCPServer[Any], name: str) -> None:
    """Give the registered tool `name` the narrower pre-parsing rule."""
    tool = mcp._tool_manager.get_tool(name)  # the SDK offers no public handle on a registered tool's metadata
    if tool is None:
        raise KeyError(name)
    meta = tool.fn_metadata
    tool.fn_metadata = StringsStayStrings(
        arg_model=meta.arg_model,
        output_schema=meta.output_schema,
        output_model=meta.output_model,
        wrap_output=meta.wrap_output,
        tool_name=name,
    )
