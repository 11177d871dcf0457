"""The smaller fixes found with issue 7: the `json` property's explicit schema, progress without a fake total, a 401
that advertises no OAuth server, `--backend openai` without its extra, `doctor`'s warning about the analysis
libraries, and the example client configuration."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client

from code_interpreter_mcp import cli
from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.backends import create_backend
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.errors import BadInput
from tests.helpers import structured

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


async def test_json_property_schema_and_progress_total(tmp_path: Path) -> None:
    async with Client(build_server(Settings(data_dir=tmp_path / "d")), raise_exceptions=True) as c:
        run_code = next(t for t in (await c.list_tools()).tools if t.name == "run_code")
        assert run_code.output_schema is not None
        assert "null" in run_code.output_schema["properties"]["json"]["type"]
        seen: list[tuple[float, float | None, str | None]] = []

        async def cb(progress: float, total: float | None, message: str | None) -> None:
            seen.append((progress, total, message))

        r = await c.call_tool(
            "run_code", {"code": "import time; time.sleep(1.6)", "timeout_s": 30}, progress_callback=cb
        )
        assert structured(r)["status"] == "ok"
        assert seen and all(total is None for _, total, _ in seen)
        assert "of at most 30 s" in (seen[-1][2] or "")


@pytest.mark.slow
async def test_401_names_no_authorization_server(tmp_path: Path) -> None:
    from tests.test_e2e_http import http_server

    with http_server(tmp_path / "d", tokens="a-token-1234567890") as url:
        async with httpx2.AsyncClient() as raw:
            resp = await raw.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            assert resp.status_code == 401
            assert "resource_metadata" not in resp.headers.get("www-authenticate", "")
            base = url.rsplit("/mcp", 1)[0]
            for path in ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"):
                assert (await raw.get(base + path)).status_code == 404


def test_openai_backend_without_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [
        m for m in sys.modules if m == "openai" or m.startswith(("openai.", "code_interpreter_mcp.backends.openai"))
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "openai", None)  # as if the package were not installed
    with pytest.raises(BadInput) as err:
        create_backend(Settings(backend="openai"))
    assert "pip install 'code-interpreter-mcp[openai]'" in err.value.user_text()


async def test_doctor_warns_without_the_analysis_libraries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = cli.importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "pandas" else real(name, *args)

    monkeypatch.setattr(cli.importlib.util, "find_spec", find_spec)
    report = await cli._doctor(Settings(data_dir=tmp_path / "d"))
    assert any("pandas" in w and "[analysis]" in w for w in report["warnings"])


def test_example_config_uses_an_absolute_path() -> None:
    config = json.loads((ROOT / "claude_desktop_config.example.json").read_text())
    command = config["mcpServers"]["code-interpreter"]["command"]
    assert command.startswith("/") and "/ABSOLUTE/PATH/TO/" in command
    assert "/ABSOLUTE/PATH/TO/" in (ROOT / "README.md").read_text()
