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
from tests.helpers import structured, text_of

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


async def test_json_property_schema_and_progress_total(tmp_path: Path) -> None:
    async with Client(build_server(Settings(data_dir=tmp_path / "d")), raise_exceptions=True) as c:
        run_code = next(t for t in (await c.list_tools()).tools if t.name == "run_code")
        assert run_code.output_schema is not None
        types = run_code.output_schema["properties"]["json"]["type"]
        assert set(types) == {"null", "object", "array", "string", "number", "boolean"}
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


async def test_symlinks_are_reported_and_refused(tmp_path: Path) -> None:
    async with Client(build_server(Settings(data_dir=tmp_path / "d")), raise_exceptions=True) as c:
        code = "import os\nos.symlink('/etc/passwd', 'link.txt')\nopen('ok.txt', 'w').write('fine')"
        s = structured(await c.call_tool("run_code", {"code": code}))
        assert [f["path"] for f in s["files"]] == ["ok.txt"]
        assert any("link.txt" in w and "symbolic link" in w for w in s["warnings"])
        again = structured(await c.call_tool("run_code", {"code": "1"}))
        assert again["warnings"] == []  # said once, when it appeared
        r = await c.call_tool("download_file", {"file": "link.txt"})
        assert r.is_error and "path_refused" in text_of(r) and "symbolic link" in text_of(r)
        missing = await c.call_tool("download_file", {"file": "nothing.txt"})
        assert missing.is_error and "file_not_found" in text_of(missing)


async def test_timeout_and_failed_schema_texts(tmp_path: Path) -> None:
    async with Client(build_server(Settings(data_dir=tmp_path / "d", interrupt_grace_s=1)), raise_exceptions=True) as c:
        r = await c.call_tool("run_code", {"code": "import time\nx = 1\ntime.sleep(30)", "timeout_s": 1.5})
        s = structured(r)
        assert s["status"] == "timeout"
        text = text_of(r)
        assert text.splitlines()[1].startswith("error: TimeoutError: The run exceeded its 1.5 s time limit")
        assert "variables and imports are kept" in text
        assert "KeyboardInterrupt" not in text and "worker" not in s["error"]["traceback"]
        assert "time.sleep(30)" in s["error"]["traceback"]
        failed = structured(await c.call_tool("run_code", {"code": "1/0", "output_schema": {"type": "object"}}))
        assert "the run did not finish" in failed["json_error"]["message"]
        assert "End the code with an expression" not in failed["json_error"]["message"]
        missing = structured(await c.call_tool("run_code", {"code": "import no_such_module_here"}))
        assert any("pip install no_such_module_here" in w for w in missing["warnings"])
