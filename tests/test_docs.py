"""The README's tool and settings tables say what the code does: every tool with every argument, every setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.config import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_every_setting_is_in_the_configuration_section() -> None:
    section = _section("Configuration")
    named = set(re.findall(r"`(?:CODE_INTERPRETER_)?([A-Z][A-Z0-9_]+)`", section))
    missing = [f for f in Settings.model_fields if f.upper() not in named and f.upper() not in section]
    assert not missing, f"settings without a row in the README's Configuration section: {missing}"


@pytest.mark.anyio
async def test_every_tool_and_argument_is_in_the_tools_table(tmp_path: Path) -> None:
    server = build_server(Settings(data_dir=tmp_path))
    table = {
        m.group(1): set(re.findall(r"[a-z_][a-z0-9_]*", m.group(2)))
        for m in re.finditer(r"^\| `([a-z_]+)\(([^)]*)\)`", _section("Tools"), re.MULTILINE)
    }
    tools = await server.list_tools()
    assert {t.name for t in tools} == set(table), "the README's tools table lists other tools than the server"
    for t in tools:
        args = set(t.input_schema.get("properties", {}))
        assert args == table[t.name], f"{t.name}: README says {sorted(table[t.name])}, the server takes {sorted(args)}"
