"""Hostile arguments: strings stay strings, sizes are checked before work, every refusal is a clear error.

Each call goes to the real server (in-memory MCP client) while a second session's `1+1` is timed."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.app.arguments import StringsStayStrings, accepts_str
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import inputs
from tests.helpers import structured, text_of
from tests.hostile import LATENCY_BOUND_S, hostile_server

pytestmark = pytest.mark.anyio


def string_parameters() -> list[tuple[str, str]]:
    server = build_server(Settings(data_dir=Path("/nonexistent")))
    found = []
    for tool in server._tool_manager.list_tools():
        for name, field in tool.fn_metadata.arg_model.model_fields.items():
            if accepts_str(field.annotation):
                found.append((tool.name, field.alias or name))
    return found


@pytest.mark.parametrize(("tool", "param"), string_parameters())
def test_every_string_parameter_keeps_its_string(tool: str, param: str) -> None:
    server = build_server(Settings(data_dir=Path("/nonexistent")))
    meta = server._tool_manager.get_tool(tool).fn_metadata  # type: ignore[union-attr]
    assert isinstance(meta, StringsStayStrings)
    for text in ("null", "true", "12", "[1]", '{"a": 1}', '"quoted"'):
        assert meta.pre_parse_json({param: text})[param] == text


def test_pre_parsing_still_serves_lists_and_objects() -> None:
    server = build_server(Settings(data_dir=Path("/nonexistent")))
    meta = server._tool_manager.get_tool("run_code").fn_metadata  # type: ignore[union-attr]
    parsed = meta.pre_parse_json({"files": '["/a"]', "output_schema": '{"type": "object"}'})
    assert parsed == {"files": ["/a"], "output_schema": {"type": "object"}}


NULL_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("run_code", {"code": "1", "session_id": "null"}, "No session 'null'"),
    ("run_code", {"code": "1", "instructions": "null"}, "instructions were ignored"),
    ("run_code", {"code": "1", "json_strategy": "null"}, "json_strategy"),
    ("list_container_files", {"session_id": "null"}, "No session 'null'"),
    ("list_container_files", {"container_id": "null"}, "No container 'null'"),
    ("download_file", {"file": "null"}, "'null'"),
    ("download_file", {"file": "f.txt", "save_to": "null"}, "save_to 'null' must be an absolute"),
    ("upload_file", {"path": "null"}, "Host path 'null' must be absolute"),
    ("upload_file", {"name": "null", "content_base64": "aGk="}, "path: null"),
    ("upload_file", {"name": "x", "content_base64": "aGk=", "dest_path": "null"}, "path: null"),
    ("close_session", {"session_id": "null"}, "No session 'null'"),
]


@pytest.mark.parametrize(("tool", "args", "expected"), NULL_CALLS)
async def test_the_string_null_is_a_string_end_to_end(
    tmp_path: Path, tool: str, args: dict[str, Any], expected: str
) -> None:
    async with hostile_server(tmp_path) as h:
        await h.call("run_code", {"code": "open('f.txt', 'w').write('x')"})
        r, worst = await h.during(lambda: h.call(tool, args))
        shown = text_of(r)
        if tool == "upload_file" and not r.is_error:
            shown += f"\npath: {structured(r)['file']['path']}"
        assert expected in shown, shown
        assert worst < LATENCY_BOUND_S, worst
        await h.alive()


async def test_a_huge_base64_upload_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("decoded before its size was checked")

    async with hostile_server(tmp_path, max_file_bytes=1024 * 1024) as h:
        monkeypatch.setattr(inputs.base64, "b64decode", never)
        text = "A" * (4 * 1024 * 1024)  # 3 MiB once decoded
        r, worst = await h.during(lambda: h.call("upload_file", {"name": "big.bin", "content_base64": text}))
        assert r.is_error and "[file_too_large]" in text_of(r) and "3145728 bytes" in text_of(r)
        assert worst < LATENCY_BOUND_S, worst
        monkeypatch.undo()
        small = base64.b64encode(b"x" * 5000).decode()
        ok = structured(await h.call("upload_file", {"name": "ok.bin", "content_base64": small}))
        assert ok["file"]["bytes"] == 5000


HOSTILE_UPLOADS: list[tuple[dict[str, Any], str]] = [
    ({"name": "\udc80", "content_base64": "aGk="}, "[bad_input]"),
    ({"name": "é" * 200, "content_base64": "aGk="}, "[bad_input]"),
    ({"name": "x", "content_base64": "aGk=", "dest_path": "a/" * 3000 + "b"}, "[bad_input]"),
    ({"name": "x", "content_base64": "aGk=", "dest_path": "../x"}, "[path_refused]"),
    ({"name": "x", "content_base64": "aGk=", "dest_path": "/etc/passwd"}, "[path_refused]"),
    ({"name": "x", "content_base64": "aGk=", "dest_path": "a\x00b"}, "[path_refused]"),
    ({"name": "x", "content_base64": "!!!!"}, "[bad_input]"),
    ({"name": "x", "content_base64": "aGk=\n"}, "[bad_input]"),
    ({"path": "/proc/self/mem"}, "[path_refused]"),
    ({"path": "/tmp"}, "[path_refused]"),
    ({"path": "/tmp/" + "a" * 5000}, "[path_refused]"),
]


@pytest.mark.parametrize(("args", "expected"), HOSTILE_UPLOADS)
async def test_hostile_uploads_are_clear_errors(tmp_path: Path, args: dict[str, Any], expected: str) -> None:
    async with hostile_server(tmp_path) as h:
        r, worst = await h.during(lambda: h.call("upload_file", args))
        assert r.is_error and expected in text_of(r) and "internal_error" not in text_of(r), text_of(r)
        assert "Hint:" in text_of(r)
        assert worst < LATENCY_BOUND_S, worst
        await h.alive()


@pytest.mark.parametrize(
    "save_to", ["/tmp/" + "b" * 5000, "/proc/self/no-such-dir/x", "relative/x"], ids=["too-long", "proc", "relative"]
)
async def test_hostile_save_to_is_a_clear_error(tmp_path: Path, save_to: str) -> None:
    async with hostile_server(tmp_path) as h:
        await h.call("run_code", {"code": "open('f.txt', 'w').write('x')"})
        r, worst = await h.during(lambda: h.call("download_file", {"file": "f.txt", "save_to": save_to}))
        assert r.is_error and "internal_error" not in text_of(r) and "Hint:" in text_of(r), text_of(r)
        assert worst < LATENCY_BOUND_S, worst
