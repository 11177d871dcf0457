"""End to end over stdio (the real server, the real MCP client): notebook lines, execution_count, env and
unknown arguments; `!pip install` of a locally served wheel through the packages mechanism."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from tests.helpers import text_of

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
SECRET = "sk-cells-test-0123456789"


def params(data: Path, **env: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "code_interpreter_mcp", "serve", "--data-dir", str(data)],
        env={"PYTHONUNBUFFERED": "1", "OPENAI_API_KEY": SECRET, **env},
    )


async def run(c: Client, **args: Any) -> dict[str, Any]:
    r = await c.call_tool("run_code", args)
    assert r.structured_content is not None, r.content
    return r.structured_content


async def test_cells_env_and_arguments(tmp_path: Path) -> None:
    async with Client(params(tmp_path / "d")) as c:
        one = await run(c, code="a = 1\n!echo hi")
        assert one["status"] == "ok" and one["stdout"] == "hi\n" and one["execution_count"] == 1
        two = await run(c, code="%who")
        assert two["stdout"].split() == ["a"] and two["execution_count"] == 2
        three = await run(c, code="    b = a + 1\n    b")
        assert three["result"] == "2" and three["execution_count"] == 3
        bad = await run(c, code="%load_ext autoreload")
        assert bad["status"] == "error" and bad["error"]["type"] == "UsageError"

        seen = await run(c, code="import os\n!echo $FOO\nos.environ['FOO']", env={"FOO": "bar"})
        assert seen["stdout"] == "bar\n" and seen["result"] == "'bar'"
        gone = await run(c, code="repr(os.environ.get('FOO'))")
        assert gone["result"] == "'None'"
        assert SECRET not in (await run(c, code="!env"))["stdout"]

        await run(c, code="1", env={"KEEP": "yes"}, persist_env=True)
        assert (await run(c, code="os.environ.get('KEEP')"))["result"] == "'yes'"
        up = await c.call_tool("upload_file", {"name": "x.txt", "content_base64": "aGk=", "env": {"UP": "1"}})
        assert up.is_error and "persist_env" in text_of(up)
        up = await c.call_tool(
            "upload_file", {"name": "x.txt", "content_base64": "aGk=", "env": {"UP": "1"}, "persist_env": True}
        )
        assert not up.is_error, up.content
        assert (await run(c, code="os.environ.get('UP')"))["result"] == "'1'"

        for env in ({"OPENAI_API_KEY": "mine"}, {"X": SECRET}):
            r = await c.call_tool("run_code", {"code": "1", "env": env})
            assert r.is_error and "never reaches the sandbox" in text_of(r) and SECRET not in text_of(r)

        r = await c.call_tool("run_code", {"code": "1", "envs": {"FOO": "bar"}})
        assert r.is_error and "invalid_arguments" in text_of(r) and "'envs' (did you mean 'env'?)" in text_of(r)
        r = await c.call_tool("list_container_files", {"cwd": "/mnt/data"})
        assert r.is_error and "'cwd'" in text_of(r)
        r = await c.call_tool("run_code", {"code": "1", "global_variables": {"x": 1}})
        assert r.is_error and "'global_variables'" in text_of(r)


async def test_pip_line_installs_a_served_wheel(tmp_path: Path, wheels: Path, sandbox_ok: None) -> None:
    async with Client(params(tmp_path / "d", CODE_INTERPRETER_PACKAGE_FIND_LINKS=str(wheels))) as c:
        r = await run(c, code="!pip install -q beta\nimport beta\nbeta.VERSION")
        assert r["status"] == "ok" and r["result"] == "'1.0'", r
        assert {d["name"] for d in r["packages"]["distributions"]} == {"alpha", "beta"}
        refused = await c.call_tool("run_code", {"code": "%pip install --index-url https://x.example/simple beta"})
        assert refused.is_error and "--index-url" in text_of(refused)


async def test_openai_backend_runs_bang_lines_and_counts_cells(emu: Any, tmp_path: Path) -> None:
    from tests.helpers import emulator_client

    async with emulator_client(emu, tmp_path) as c:
        first = await run(c, code="x = 2\n!echo hi")
        assert first["status"] == "ok" and "hi" in first["stdout"] and first["execution_count"] == 1
        second = await run(c, code="lines = !printf 'a\\nb'\nprint(lines, x)")
        assert "['a', 'b'] 2" in second["stdout"] and second["execution_count"] == 2
        r = await c.call_tool("run_code", {"code": "1", "env": {"FOO": "bar"}})
        assert r.is_error and "cannot set environment variables" in text_of(r)
