"""Every tool and its error paths through a real in-memory MCP client, on the real local backend."""

from __future__ import annotations

import base64
import itertools
import json
import os
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.types import EmbeddedResource, ImageContent, ResourceLink

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.models import DownloadResult, FileList, RunResult
from tests.helpers import structured, text_of

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", default_timeout_s=20, reaper_interval_s=0.2)


@pytest.fixture
async def client(settings: Settings):
    async with Client(build_server(settings), raise_exceptions=True) as c:
        yield c


async def run(client: Client, code: str, **kw: Any) -> dict[str, Any]:
    r = await client.call_tool("run_code", {"code": code, **kw})
    return structured(r)


async def test_tools_are_listed_with_schemas_and_annotations(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {
        "run_code",
        "get_run",
        "cancel_run",
        "list_container_files",
        "download_file",
        "upload_file",
        "close_session",
    }
    assert tools["run_code"].output_schema == RunResult.model_json_schema(by_alias=True) or (
        tools["run_code"].output_schema and "container" in tools["run_code"].output_schema["properties"]
    )
    assert "===BEGIN_JSON===" in (tools["run_code"].description or "")
    assert tools["list_container_files"].annotations.read_only_hint is True
    assert tools["close_session"].annotations.destructive_hint is True
    for t in tools.values():
        assert t.description and t.input_schema["type"] == "object"
        assert t.output_schema is not None
    templates = (await client.list_resource_templates()).resource_templates
    assert any(t.uri_template.startswith("ci://sessions/") for t in templates)


async def test_state_persists_and_result_shape(client: Client) -> None:
    first = await run(client, "import math\nx = 21\nprint('hello'); x * 2")
    RunResult.model_validate(first)
    assert first["status"] == "ok"
    assert first["stdout"] == "hello\n"
    assert first["result"] == "42"
    assert first["session_id"].startswith("s_") and len(first["session_id"]) == 34
    assert first["container"]["expires_at"] is not None
    assert first["container"]["state_lost"] is False
    again = await run(client, "x + 1, math.pi > 3", session_id=first["session_id"])
    assert again["result"] == "(22, True)"
    assert again["container_id"] == first["container_id"]


async def test_exception_returns_structured_error(client: Client) -> None:
    r = await client.call_tool("run_code", {"code": "def f():\n    return 1/0\nf()"})
    s = structured(r)
    assert r.is_error is True
    assert s["status"] == "error"
    assert s["error"]["type"] == "ZeroDivisionError"
    assert "f()" in s["error"]["traceback"] and "worker" not in s["error"]["traceback"]
    assert "ZeroDivisionError" in text_of(r)
    syntax = await run(client, "def broken(:\n  pass")
    assert syntax["status"] == "error" and syntax["error"]["type"] == "SyntaxError"


async def test_files_images_resources_and_download(client: Client, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    code = (
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [3, 1, 2])\n"
        "open('table.csv', 'w').write('a,b\\n1,2\\n')\n"
        "import os; os.makedirs('out', exist_ok=True); open('out/blob.bin', 'wb').write(bytes(range(256)))\n"
    )
    r = await client.call_tool("run_code", {"code": code})
    s = structured(r)
    assert s["status"] == "ok", s
    paths = {f["path"]: f for f in s["files"]}
    assert "table.csv" in paths and "out/blob.bin" in paths
    pngs = [p for p in paths if p.endswith(".png")]
    assert len(pngs) == 1, paths
    assert paths["table.csv"]["mime_type"] == "text/csv"
    assert paths[pngs[0]]["mime_type"] == "image/png"
    assert any(isinstance(c, ImageContent) and c.mime_type == "image/png" for c in r.content)
    links = [c for c in r.content if isinstance(c, ResourceLink)]
    # The inlined image is not linked as well (RESOURCE_LINKS=non_inline).
    assert {link.uri for link in links} == {f["uri"] for f in s["files"] if not f["path"].endswith(".png")}

    csv = paths["table.csv"]
    read = await client.read_resource(csv["uri"])
    assert read.contents[0].text == "a,b\n1,2\n"
    assert read.contents[0].mime_type == "text/csv"
    blob = await client.read_resource(paths["out/blob.bin"]["uri"])
    assert base64.b64decode(blob.contents[0].blob) == bytes(range(256))

    d = await client.call_tool("download_file", {"file": csv["file_id"], "session_id": s["session_id"]})
    DownloadResult.model_validate(structured(d))
    assert structured(d)["inline"] is True
    assert any(isinstance(c, EmbeddedResource) and c.resource.text == "a,b\n1,2\n" for c in d.content)

    by_path = await client.call_tool("download_file", {"file": "/mnt/data/out/blob.bin"})
    assert structured(by_path)["file"]["sha256"] == paths["out/blob.bin"]["sha256"]

    target = tmp_path / "saved"
    target.mkdir()
    saved = structured(await client.call_tool("download_file", {"file": pngs[0], "save_to": str(target)}))
    assert saved["saved_to"] == str(target / Path(pngs[0]).name)
    assert (target / Path(pngs[0]).name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = await client.call_tool("download_file", {"file": pngs[0], "save_to": str(target)})
    assert again.is_error and "already exists" in text_of(again)

    listing = FileList.model_validate(structured(await client.call_tool("list_container_files", {})))
    assert listing.container_alive and {f.path for f in listing.files} >= {"table.csv", "out/blob.bin"}


async def test_changed_file_gets_new_version(client: Client) -> None:
    a = await run(client, "open('n.txt','w').write('one')")
    b = await run(client, "open('n.txt','w').write('two!')")
    c = await run(client, "1")
    assert [f["path"] for f in a["files"]] == ["n.txt"]
    assert [f["path"] for f in b["files"]] == ["n.txt"]
    assert a["files"][0]["file_id"] != b["files"][0]["file_id"]
    assert c["files"] == []
    old = await client.read_resource(a["files"][0]["uri"])
    assert old.contents[0].text == "one"


async def test_upload_base64_and_host_path(client: Client, tmp_path: Path) -> None:
    up = structured(
        await client.call_tool(
            "upload_file", {"name": "in.txt", "content_base64": base64.b64encode(b"payload").decode()}
        )
    )
    assert up["file"]["source"] == "user" and up["file"]["path"] == "in.txt"
    s = await run(client, "open('/mnt/data/in.txt').read()", session_id=up["session_id"])
    assert s["result"] == "'payload'"
    host = tmp_path / "host.csv"
    host.write_text("x\n1\n")
    s2 = await run(client, "open('host.csv').read()", files=[str(host)])
    assert s2["result"] == "'x\\n1\\n'"
    bad = await client.call_tool("upload_file", {"name": "x", "content_base64": "!!notb64"})
    assert bad.is_error and "base64" in text_of(bad)
    both = await client.call_tool("upload_file", {"path": str(host), "content_base64": "AA==", "name": "x"})
    assert both.is_error and "either" in text_of(both)


async def test_hostile_arguments_get_clear_errors(client: Client) -> None:
    wrong_type = await client.call_tool("run_code", {"code": 123})
    assert wrong_type.is_error
    foreign = await client.call_tool("run_code", {"code": "1", "session_id": "s_" + "0" * 32})
    assert foreign.is_error and "session_not_found" in text_of(foreign)
    junk = await client.call_tool("list_container_files", {"session_id": "../../etc"})
    assert junk.is_error and "session_not_found" in text_of(junk)
    schema = await client.call_tool("run_code", {"code": "1", "output_schema": {"type": "no-such-type"}})
    assert schema.is_error and "invalid_schema" in text_of(schema)
    neg = await client.call_tool("run_code", {"code": "1", "timeout_s": -1})
    assert neg.is_error
    trav = await client.call_tool("download_file", {"file": "../../etc/passwd"})
    assert trav.is_error and "path_refused" in text_of(trav)
    absolute = await client.call_tool("download_file", {"file": "/etc/passwd"})
    assert absolute.is_error and "path_refused" in text_of(absolute)
    missing = await client.call_tool("download_file", {"file": "f_" + "1" * 24})
    assert missing.is_error and "not_found" in text_of(missing)
    relative = await client.call_tool("upload_file", {"path": "relative.txt"})
    assert relative.is_error and "absolute" in text_of(relative)
    # The server is still fine afterwards.
    assert (await run(client, "2+2"))["result"] == "4"


async def test_symlink_to_host_file_is_never_served(client: Client) -> None:
    s = await run(
        client,
        "import os\nos.symlink('/etc/passwd', 'link')\nos.symlink('/root', 'dirlink')\n"
        "open('ok.txt','w').write('fine')",
    )
    assert [f["path"] for f in s["files"]] == ["ok.txt"]
    r = await client.call_tool("download_file", {"file": "link"})
    assert r.is_error
    r2 = await client.call_tool("download_file", {"file": "dirlink/.bashrc"})
    assert r2.is_error


async def test_structured_output_local_two_ways(client: Client) -> None:
    schema = {
        "type": "object",
        "properties": {"total": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["total"],
    }
    last = await run(client, "data = {'total': 6, 'tags': ['a']}\ndata", output_schema=schema)
    assert last["json"] == {"total": 6, "tags": ["a"]} and last["json_error"] is None
    assert last["structured"]["path"] == "last_expression"
    printed = await run(
        client,
        "import json\nprint('noise')\nprint('===BEGIN_JSON===')\n"
        "print(json.dumps({'total': 7}))\nprint('===END_JSON===')",
        output_schema=schema,
    )
    assert printed["json"] == {"total": 7} and printed["structured"]["path"] == "sentinel"
    bad = await run(client, "{'total': 'many', 'tags': [1]}", output_schema=schema)
    assert bad["json"] is None
    paths = {v["path"] for v in bad["json_error"]["violations"]}
    assert paths == {"$.total", "$.tags[0]"}
    assert bad["status"] == "ok"
    missing = await run(client, "x = 1", output_schema=schema)
    assert missing["json"] is None and "BEGIN_JSON" in missing["json_error"]["message"]


async def test_timeout_keeps_state_and_reports(client: Client) -> None:
    await run(client, "kept = 'yes'")
    t = await run(client, "while True: pass", timeout_s=1)
    assert t["status"] == "timeout"
    assert t["container"]["state_lost"] is False
    assert (await run(client, "kept"))["result"] == "'yes'"


async def test_progress_on_long_runs(client: Client) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def cb(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    r = await client.call_tool("run_code", {"code": "import time; time.sleep(2.6); 'done'"}, progress_callback=cb)
    assert structured(r)["result"] == "'done'"
    assert len(seen) >= 2
    assert all(b[0] > a[0] for a, b in itertools.pairwise(seen))
    quick: list[Any] = []
    await client.call_tool("run_code", {"code": "1"}, progress_callback=lambda *a: quick.append(a))
    assert quick == []


async def test_a_cancelled_request_leaves_the_run_going(client: Client, settings: Settings) -> None:
    # Clients cancel the request on their own timeout too: the run is the server's, stopped only by cancel_run.
    first = await run(client, "import os; os.getcwd()")
    marker = "after.txt"
    with anyio.move_on_after(1.0):
        await client.call_tool("run_code", {"code": f"import time; time.sleep(3); open('{marker}','w').write('x')"})
    await anyio.sleep(3.0)
    after = await run(client, "import os; sorted(os.listdir('.'))", session_id=first["session_id"])
    assert marker in after["result"]


async def test_close_session_then_foreign(client: Client) -> None:
    s = await run(client, "open('keep.txt','w').write('k')")
    closed = structured(await client.call_tool("close_session", {"session_id": s["session_id"]}))
    assert closed["closed"] and closed["containers_stopped"] == 1 and closed["files_kept"]
    gone = await client.call_tool("run_code", {"code": "1", "session_id": s["session_id"]})
    assert gone.is_error and "session_not_found" in text_of(gone)
    assert Path(s["files"][0]["local_path"]).read_text() == "k"
    fresh = await run(client, "1")
    assert fresh["session_id"] != s["session_id"]


async def test_huge_output_is_truncated(client: Client) -> None:
    s = await run(client, "print('x' * 5_000_000)")
    assert s["truncated"] is True
    assert len(s["stdout"]) < 200_000


async def test_expiry_replaces_container_and_keeps_files(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", expiry_minutes=0.02, reaper_interval_s=0.2)
    async with Client(build_server(settings), raise_exceptions=True) as client:
        up = structured(
            await client.call_tool(
                "upload_file", {"name": "in.txt", "content_base64": base64.b64encode(b"input").decode()}
            )
        )
        s = await run(client, "v = 1\nopen('made.txt','w').write('made')", session_id=up["session_id"])
        await anyio.sleep(2.0)  # past the 1.2 s idle expiry; the reaper stops the container
        listing = structured(await client.call_tool("list_container_files", {"session_id": s["session_id"]}))
        assert listing["container_alive"] is False
        assert {f["path"] for f in listing["files"]} >= {"in.txt", "made.txt"}
        again = await run(client, "open('in.txt').read(), 'v' in globals()", session_id=s["session_id"])
        assert again["container"]["state_lost"] is False  # a new container, the variables from the snapshot
        assert again["container"]["state_restored"]["restored"] == ["v"]
        assert again["container_id"] != s["container_id"]
        assert again["result"] == "('input', True)"
        d = await client.call_tool("download_file", {"file": s["files"][0]["file_id"], "session_id": s["session_id"]})
        assert any(isinstance(c, EmbeddedResource) and c.resource.text == "made" for c in d.content)


async def test_restart_keeps_sessions_and_files(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d")
    async with Client(build_server(settings), raise_exceptions=True) as client:
        s = await run(client, "open('r.txt','w').write('survives')")
    async with Client(build_server(settings), raise_exceptions=True) as client:
        uri = s["files"][0]["uri"]
        assert (await client.read_resource(uri)).contents[0].text == "survives"
        again = await run(
            client,
            "open('r.txt').read() if __import__('os').path.exists('r.txt') else None",
            session_id=s["session_id"],
        )
        assert again["container"]["state_lost"] is True
        listing = structured(
            await client.call_tool("list_container_files", {"session_id": s["session_id"], "all_containers": True})
        )
        assert "r.txt" in {f["path"] for f in listing["files"]}


async def test_legacy_connection_has_its_own_session(settings: Settings) -> None:
    server = build_server(settings)
    async with Client(server, mode="legacy") as a:
        first = await run(a, "y = 5")
        second = await run(a, "y")
        assert second["result"] == "5" and second["session_id"] == first["session_id"]


async def test_api_key_not_visible_in_sandbox(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-should-not-leak-1234")
    async with Client(build_server(settings)) as client:
        s = await run(client, "import os; sorted(os.environ.items())")
        assert "sk-test-secret" not in s["result"]
        s2 = await run(client, "open('/proc/1/environ','rb').read()")
        assert "sk-test-secret" not in json.dumps(s2)
    assert "OPENAI_API_KEY" in os.environ


async def test_large_file_is_saved_not_inlined(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", inline_binary_max_bytes=1000, inline_image_max_bytes=0)
    async with Client(build_server(settings), raise_exceptions=True) as client:
        s = await run(client, "open('big.bin','wb').write(b'z' * 5000)", instructions="ignored here")
        assert any("instructions were ignored" in w for w in s["warnings"])
        d = await client.call_tool("download_file", {"file": "big.bin"})
        out = structured(d)
        assert out["inline"] is False and out["saved_to"] == s["files"][0]["local_path"]
        assert not any(isinstance(c, EmbeddedResource) for c in d.content)
        assert any(isinstance(c, ResourceLink) for c in d.content)
        assert Path(out["saved_to"]).read_bytes() == b"z" * 5000


async def test_no_sandbox_means_no_code_unless_the_operator_opts_in(tmp_path: Path) -> None:
    refused = Settings(data_dir=tmp_path / "a", bwrap_path="/nonexistent/bwrap")
    async with Client(build_server(refused), raise_exceptions=True) as client:
        assert len((await client.list_tools()).tools) == 7  # the server still starts and answers
        r = await client.call_tool("run_code", {"code": "open('/etc/hostname').read()"})
        assert r.is_error and "sandbox_unavailable" in text_of(r) and "Hint:" in text_of(r)
        assert "unsafe-no-sandbox" in text_of(r)
    opted_in = Settings(data_dir=tmp_path / "b", bwrap_path="/nonexistent/bwrap", unsafe_no_sandbox=True)
    async with Client(build_server(opted_in), raise_exceptions=True) as client:
        s = await run(client, "1+1")
        assert s["result"] == "2" and s["container"]["isolation"] == "none"
        assert any("UNSAFE" in w.upper() or "UNSANDBOXED" in w.upper() for w in s["warnings"])
        again = await run(client, "2+2")
        assert any("UNSAFE" in w.upper() or "UNSANDBOXED" in w.upper() for w in again["warnings"])
