"""End to end: packages through the real server over stdio (`code-interpreter-mcp serve` as a subprocess, the real
MCP client), installing from a folder of wheels the test builds; and `doctor` reporting the package settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def env_for(wheels: Path) -> dict[str, str]:
    return {"PYTHONUNBUFFERED": "1", "CODE_INTERPRETER_PACKAGE_FIND_LINKS": str(wheels)}


async def test_packages_over_stdio_survive_a_server_restart(tmp_path: Path, wheels: Path, sandbox_ok: None) -> None:
    data = tmp_path / "d"
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "code_interpreter_mcp", "serve", "--data-dir", str(data)],
        env=env_for(wheels),
    )
    async with Client(params) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
        assert "packages" in tools["run_code"].input_schema["properties"]
        r = await c.call_tool(
            "run_code", {"code": "import beta, alpha\n(beta.VERSION, alpha.VERSION)", "packages": ["beta"]}
        )
        s = r.structured_content
        assert s is not None and s["status"] == "ok", r.content
        assert s["result"] == "('1.0', '2.0')"
        assert {d["name"] for d in s["packages"]["distributions"]} == {"alpha", "beta"}
    # A new server process: the session's packages come from the registry, the set from the shared cache.
    async with Client(params) as c:
        again = await c.call_tool("run_code", {"code": "import beta\nbeta.VERSION", "session_id": s["session_id"]})
        a = again.structured_content
        assert a is not None and a["result"] == "'1.0'", again.content
        assert a["packages"]["reused"] is True
        # A new worker: its variables came back from the snapshot the shutdown wrote, or (snapshot not yet
        # written when the process ended) are said lost; either way the package imports.
        restored = a["container"]["state_restored"]
        assert a["container"]["state_lost"] is True or (restored is not None and "beta" in restored["restored"])


def test_doctor_shows_policy_index_and_cache(tmp_path: Path, wheels: Path, sandbox_ok: None) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "code_interpreter_mcp", "doctor", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env_for(wheels), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    report = json.loads(out.stdout)["packages"]
    assert report["policy"] == "any"
    assert str(wheels) in json.dumps(report["index"])
    assert report["cache"]["dir"] == str(tmp_path / "d" / "packages")
    assert report["isolation"] == "bubblewrap"
