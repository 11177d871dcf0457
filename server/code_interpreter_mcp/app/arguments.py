"""String arguments stay strings: the SDK's JSON pre-parsing of tool arguments, narrowed to where it helps.

The mcp SDK (`mcpserver/utilities/func_metadata.py`, `FuncMetadata.pre_parse_json`) runs `json.loads` on every
string argument whose annotation is not exactly `str`, to undo clients that send lists and objects as JSON text.
For `str | None` that turns the string "null" into None (a session id "null" ran in the default session), and
"true", "[1]" or "{}" into other types. This module owns the narrower rule: a string given for a parameter that
accepts strings is kept as it is; pre-parsing still serves parameters that take no string (`files`, a list;
`output_schema`, an object). Knows nothing of what any tool does.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata


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


class StringsStayStrings(FuncMetadata):
    """The SDK's argument metadata with pre-parsing skipped for string-accepting parameters."""

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
    )
