"""Acceptance of the openai backend through a real MCP client, against the OpenAI API emulator.

In-memory: `Client(build_server(settings, engine))` with an Engine whose backend is OpenAIBackend on the in-process
emulator. End to end: `python -m code_interpreter_mcp serve` over stdio, pointed at `python -m tests.emulator`
through OPENAI_BASE_URL, driven by the real MCP stdio client. The emulator really runs the code, so logs, files,
sizes and hashes are real and are compared with the emulator's own container folder.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, ClientSession, StdioServerParameters, stdio_client
from mcp.types import CallToolResult, EmbeddedResource, ResourceLink

from tests.emulator import Emulator, EmulatorProcess
from tests.helpers import emulator_client, text_of
from tests.helpers import structured as sc

pytestmark = pytest.mark.anyio

SECRET = "plum-SECRET-k3y-7781"  # not sk- shaped: scrubbing must not rely on the key's usual look
TOOL_ERROR_RE = re.compile(r"\[(?P<code>[a-z_]+)\] .+ Hint: .+", re.DOTALL)


@pytest.fixture
async def client(emu: Emulator, tmp_path: Path) -> AsyncIterator[Client]:
    async with emulator_client(emu, tmp_path) as c:
        yield c


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def run(client: Client, code: str, **kw: Any) -> dict[str, Any]:
    r = await client.call_tool("run_code", {"code": code, **kw})
    assert not r.is_error, text_of(r)
    return sc(r)


def assert_matches_emulator(emu: Emulator, result: dict[str, Any]) -> None:
    """Every harvested file has the bytes and sha256 of the file in the emulator's container folder."""
    root = emu.container_dir(result["container_id"])
    for f in result["files"]:
        remote = (root / f["path"]).read_bytes()
        local = Path(f["local_path"]).read_bytes()
        assert local == remote and f["bytes"] == len(remote) and f["sha256"] == sha(remote), f["path"]


# ----- runs and files --------------------------------------------------------------------------------------------


async def test_stdout_files_uncited_files_and_rewritten_links(emu: Emulator, client: Client) -> None:
    # The model links only report.csv; blob.bin (300 kB, streamed in chunks) and deep/notes.txt are never cited.
    emu.behaviour.model_text = "Done. See [report](sandbox:/mnt/data/report.csv) and nothing else."
    code = (
        "import os\nos.makedirs('/mnt/data/deep', exist_ok=True)\n"
        "open('/mnt/data/report.csv', 'w').write('a,b\\n1,2\\n')\n"
        "open('/mnt/data/blob.bin', 'wb').write(bytes(range(256)) * 1200)\n"
        "open('/mnt/data/deep/notes.txt', 'w').write('never cited')\n"
        "print('made', len(os.listdir('/mnt/data')))"
    )
    r = await client.call_tool("run_code", {"code": code})
    s = sc(r)
    assert not r.is_error and s["status"] == "ok" and s["backend"] == "openai"
    assert s["stdout"] == "made 3\n" and s["warnings"] == []
    assert s["container"]["isolation"] == "remote" and s["container"]["expires_at"] is not None
    files = {f["path"]: f for f in s["files"]}
    assert set(files) == {"report.csv", "blob.bin", "deep/notes.txt"}
    assert files["blob.bin"]["bytes"] == 256 * 1200 and files["blob.bin"]["sha256"] == sha(bytes(range(256)) * 1200)
    assert {f["source"] for f in files.values()} == {"generated"}
    assert_matches_emulator(emu, s)
    # The sandbox: link is rewritten to the file's resource URI, which resources/read serves.
    assert "sandbox:" not in s["text"] and f"[report]({files['report.csv']['uri']})" in s["text"]
    links = {c.uri for c in r.content if isinstance(c, ResourceLink)}
    assert links == {f["uri"] for f in s["files"]}
    read = await client.read_resource(files["deep/notes.txt"]["uri"])
    assert read.contents[0].text == "never cited"
    # Usage and model calls of a plain run.
    assert s["model_calls"] == 1 and s["usage"]["total_tokens"] > 0 and s["structured"] is None
    # State persists in the same remote container.
    again = await run(client, "x = 41\nprint(x + 1)", session_id=s["session_id"])
    assert again["stdout"] == "42\n" and again["container_id"] == s["container_id"] and again["files"] == []


async def test_files_are_harvested_while_the_model_writes_its_answer(emu: Emulator, client: Client) -> None:
    await client.call_tool("run_code", {"code": "print('warm')"})
    emu.behaviour.annotations = "never"  # nothing cited: only the listing finds the files
    emu.behaviour.answer_delay_s = 1.0
    before = len(emu.requests)
    code = "for i in range(3):\n    open(f'/mnt/data/early{i}.txt', 'w').write('x' * (i + 1))\n"
    s = sc(await client.call_tool("run_code", {"code": code}))
    assert sorted(f["path"] for f in s["files"]) == ["early0.txt", "early1.txt", "early2.txt"]
    new = emu.requests[before:]
    started = next(r.at for r in new if r.kind == "responses")
    listed = [r.at for r in new if r.kind == "files.list"]
    downloads = [r.at for r in new if r.kind == "files.content"]
    assert listed and len(downloads) == 3
    # The listing and the downloads began while the model was still writing (the answer takes 1 s after the
    # code ran), not after the response ended; and nothing was listed twice.
    assert len(listed) == 1 and max(downloads) - started < 0.8, (started, listed, downloads)


async def test_files_live_then_after_expiry_and_recovery(emu: Emulator, client: Client) -> None:
    up = sc(
        await client.call_tool(
            "upload_file", {"name": "in.txt", "content_base64": base64.b64encode(b"input bytes").decode()}
        )
    )
    sid, first_cid = up["session_id"], up["container_id"]
    s = await run(
        client,
        "v = 1\nopen('/mnt/data/made.txt', 'w').write('made here')\nprint(open('/mnt/data/in.txt').read())",
        session_id=sid,
    )
    assert s["stdout"] == "input bytes\n" and s["container_id"] == first_cid
    made = s["files"][0]
    assert made["path"] == "made.txt"

    live = sc(await client.call_tool("list_container_files", {"session_id": sid}))
    assert live["container_alive"] is True and live["expires_at"] is not None
    assert {f["path"] for f in live["files"]} == {"in.txt", "made.txt"}
    d = await client.call_tool("download_file", {"file": "made.txt", "session_id": sid})
    assert any(isinstance(c, EmbeddedResource) and c.resource.text == "made here" for c in d.content)

    emu.expire(first_cid)  # the remote data is gone now
    after = await client.call_tool("list_container_files", {"session_id": sid})
    assert not after.is_error
    assert {f["path"] for f in sc(after)["files"]} >= {"made.txt"}
    for ref in (made["file_id"], "made.txt", made["uri"]):  # harvested copies serve every way of naming it
        d = await client.call_tool("download_file", {"file": ref, "session_id": sid})
        assert not d.is_error, text_of(d)
        assert sc(d)["file"]["sha256"] == sha(b"made here")
        assert any(isinstance(c, EmbeddedResource) and c.resource.text == "made here" for c in d.content)
    assert (await client.read_resource(made["uri"])).contents[0].text == "made here"

    # The next run gets a new container, says state_lost, and the input file is there again.
    creates = emu.calls["containers.create"]
    again = await run(client, "print(open('/mnt/data/in.txt').read(), 'v' in globals())", session_id=sid)
    assert again["container_id"] != first_cid and again["container"]["state_lost"] is True
    assert again["stdout"] == "input bytes False\n"
    assert any("lost" in w for w in again["warnings"])
    assert emu.calls["containers.create"] == creates + 1
    assert emu.containers[first_cid].status in ("expired", "deleted")
    assert (emu.container_dir(again["container_id"]) / "in.txt").read_bytes() == b"input bytes"
    # A run after that keeps the new container (state_lost only once).
    third = await run(client, "print('steady')", session_id=sid)
    assert third["container_id"] == again["container_id"] and third["container"]["state_lost"] is False
    everything = sc(await client.call_tool("list_container_files", {"session_id": sid, "all_containers": True}))
    assert {"made.txt", "in.txt"} <= {f["path"] for f in everything["files"]}


async def test_listing_after_expiry_reports_the_container_gone(emu: Emulator, client: Client) -> None:
    """BUG (engine/files.py, Files.list_files): after the API says the container expired, the listing
    still reports container_alive=true with an expires_at, because the harvest swallows ContainerExpired into a
    warning and list_files never looks at it. Expected: container_alive false, expires_at null."""
    s = await run(client, "open('/mnt/data/k.txt', 'w').write('k')")
    emu.expire(s["container_id"])
    listing = sc(await client.call_tool("list_container_files", {"session_id": s["session_id"]}))
    assert [f["path"] for f in listing["files"]] == ["k.txt"]
    assert listing["container_alive"] is False
    assert listing["expires_at"] is None


async def test_restart_reuses_the_kept_container_then_recovers_from_expiry(emu: Emulator, tmp_path: Path) -> None:
    async with emulator_client(emu, tmp_path, delete_containers_on_shutdown=False) as client:
        s = await run(client, "x = 5\nopen('/mnt/data/a.txt', 'w').write('a')")
    assert emu.containers[s["container_id"]].status == "running"  # left running, as configured
    async with emulator_client(emu, tmp_path, delete_containers_on_shutdown=False) as client:
        again = await run(client, "print(x)", session_id=s["session_id"])
        assert again["container_id"] == s["container_id"] and again["container"]["state_lost"] is False
        assert again["stdout"] == "5\n"
        emu.expire(s["container_id"])
    async with emulator_client(emu, tmp_path, delete_containers_on_shutdown=False) as client:
        third = await run(client, "print('x' in globals())", session_id=s["session_id"])
        assert third["container_id"] != s["container_id"] and third["container"]["state_lost"] is True
        assert third["stdout"] == "False\n"
        d = await client.call_tool("download_file", {"file": s["files"][0]["file_id"], "session_id": s["session_id"]})
        assert any(isinstance(c, EmbeddedResource) and c.resource.text == "a" for c in d.content)


async def test_429_with_retry_after_and_5xx_on_the_nth_call_are_retried(emu: Emulator, client: Client) -> None:
    first = await run(client, "n = 0")
    sid = first["session_id"]
    before = emu.calls["responses"]
    emu.add_fault("responses", 429, retry_after="0.4")
    out = await run(client, "n += 1\nprint('after 429', n)", session_id=sid)
    assert out["stdout"] == "after 429 1\n" and emu.calls["responses"] == before + 2
    sent = [r.at for r in emu.requests if r.kind == "responses"][-2:]
    assert sent[1] - sent[0] >= 0.4 - 0.02  # Retry-After honoured (a lower bound: cannot flake)

    emu.add_fault("responses", 502, on_call=3, retry_after=None)  # the third run from now fails once
    listing_fault = emu.add_fault("files.list", 503, on_call=2)
    for i in range(3):
        out = await run(client, f"n += 1\nopen('/mnt/data/r{i}.txt', 'w').write(str(n))", session_id=sid)
        assert out["status"] == "ok" and [f["path"] for f in out["files"]] == [f"r{i}.txt"]
        assert_matches_emulator(emu, out)
    assert emu.calls["responses"] == before + 2 + 3 + 1
    assert listing_fault.seen > listing_fault.on_call  # the failing listing happened, and was retried
    # A new container's creation is retried too (after close_session the next call starts a new session).
    assert sc(await client.call_tool("close_session", {"session_id": sid}))["closed"]
    emu.add_fault("containers.create", 500)
    created = emu.calls["containers.create"]
    new = await run(client, "print('new session')")
    assert new["stdout"] == "new session\n" and new["session_id"] != sid
    assert emu.calls["containers.create"] == created + 2


@pytest.mark.parametrize(
    "fault",
    [{"mode": "drop", "drop_after_bytes": 70_000}, {"status": 503, "retry_after": "0.01"}],
    ids=["dropped-mid-stream", "503"],
)
async def test_download_failing_once_still_harvests(emu: Emulator, client: Client, fault: dict[str, Any]) -> None:
    emu.add_fault("files.content", **fault)
    s = await run(client, "open('/mnt/data/d.bin', 'wb').write(bytes(range(256)) * 1000)")
    (f,) = s["files"]
    assert f["bytes"] == 256_000 and f["sha256"] == sha(bytes(range(256)) * 1000) and s["warnings"] == []
    assert_matches_emulator(emu, s)
    assert emu.calls["files.content"] == 2
    assert not list(Path(f["local_path"]).parent.glob("*.part"))


async def test_file_over_the_cap_is_a_warning_and_others_come_back(emu: Emulator, tmp_path: Path) -> None:
    async with emulator_client(emu, tmp_path, max_file_bytes=10_000) as client:
        r = await client.call_tool(
            "run_code",
            {
                "code": "open('/mnt/data/big.bin', 'wb').write(b'b' * 20_000)\n"
                "open('/mnt/data/small.txt', 'w').write('small')"
            },
        )
        s = sc(r)
        assert not r.is_error and s["status"] == "ok"
        assert [f["path"] for f in s["files"]] == ["small.txt"]
        assert_matches_emulator(emu, s)
        (warning,) = [w for w in s["warnings"] if "big.bin" in w]
        assert "not harvested" in warning and "10000" in warning.replace(",", "")
        # The server carries on with the same session and container.
        nxt = await run(client, "print('still fine')", session_id=s["session_id"])
        assert nxt["stdout"] == "still fine\n"


async def test_altered_code_gives_a_warning(emu: Emulator, client: Client) -> None:
    emu.behaviour.alter_code = "print('sneaky')"
    s = await run(client, "print('mine')")
    assert s["stdout"] == "mine\nsneaky\n"
    assert any("changed the code" in w for w in s["warnings"])
    r = await client.call_tool("run_code", {"code": "print('again')", "session_id": s["session_id"]})
    assert not r.is_error and "warning: The model changed the code" in text_of(r)  # the summary says it too


@pytest.mark.parametrize(
    ("mode", "code"),
    [
        ("empty", "response_malformed"),
        ("not_a_list", "response_malformed"),
        ("no_tool_call", "response_malformed"),
        ("incomplete_before_call", "backend_error"),
        ("failed", "upstream_unavailable"),
        ("stream_error", "upstream_unavailable"),
    ],
)
async def test_unusable_responses_are_clear_tool_errors(emu: Emulator, client: Client, mode: str, code: str) -> None:
    first = await run(client, "kept = 'yes'")
    emu.behaviour.output_mode = mode  # type: ignore[assignment]
    r = await client.call_tool("run_code", {"code": "print(1)", "session_id": first["session_id"]})
    assert r.is_error is True
    m = TOOL_ERROR_RE.search(text_of(r))
    assert m is not None and m.group("code") == code, text_of(r)
    emu.behaviour.output_mode = "normal"
    after = await run(client, "print(kept)", session_id=first["session_id"])
    assert after["stdout"] == "yes\n" and after["container_id"] == first["container_id"]


async def test_incomplete_after_the_code_ran_is_a_warning(emu: Emulator, client: Client) -> None:
    emu.behaviour.output_mode = "incomplete"
    s = await run(client, "open('/mnt/data/i.txt', 'w').write('i')\nprint('ran')")
    assert s["status"] == "ok" and s["stdout"] == "ran\n" and [f["path"] for f in s["files"]] == ["i.txt"]
    assert any("cut short" in w for w in s["warnings"])


async def test_close_session_deletes_the_remote_container(emu: Emulator, client: Client) -> None:
    s = await run(client, "open('/mnt/data/keep.txt', 'w').write('kept')")
    cid = s["container_id"]
    assert emu.containers[cid].status == "running"
    closed = sc(await client.call_tool("close_session", {"session_id": s["session_id"]}))
    assert closed["closed"] and closed["containers_stopped"] == 1 and closed["files_kept"]
    assert emu.containers[cid].status == "deleted" and emu.calls["containers.delete"] == 1
    assert Path(s["files"][0]["local_path"]).read_text() == "kept"


async def test_shutdown_deletes_the_containers_it_created(emu: Emulator, tmp_path: Path) -> None:
    async with emulator_client(emu, tmp_path) as client:
        a = await run(client, "open('/mnt/data/a.txt', 'w').write('a')")
        cid = a["container_id"]
        assert emu.containers[cid].status == "running"
    assert emu.containers[cid].status == "deleted"
    assert Path(a["files"][0]["local_path"]).read_text() == "a"  # harvested copies stay


async def test_api_key_never_appears_in_results_or_logs(
    emu: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    emu.behaviour.api_key = SECRET  # the emulator accepts only this key: it really is what the server sends
    seen: list[str] = []

    def keep(r: CallToolResult) -> CallToolResult:
        seen.append(json.dumps(r.structured_content) + "\n" + text_of(r) + "\n" + repr(r.content))
        return r

    async with emulator_client(emu, tmp_path, openai_api_key=SECRET) as client:
        ok = keep(await client.call_tool("run_code", {"code": "open('/mnt/data/f.txt', 'w').write('f')"}))
        assert not ok.is_error
        sid = sc(ok)["session_id"]
        emu.behaviour.echo_key_in_errors = True  # adversarial: every error message carries the caller's key
        emu.add_fault("responses", 400, message="Bad thing")
        keep(await client.call_tool("run_code", {"code": "1", "session_id": sid}))
        emu.add_fault("responses", 429, times=3, retry_after="0.01")
        keep(await client.call_tool("run_code", {"code": "2", "session_id": sid}))
        emu.add_fault("files.content", 500, times=3, retry_after="0.01")  # a harvest warning quotes the error
        keep(await client.call_tool("run_code", {"code": "open('/mnt/data/g.txt', 'w').write('g')", "session_id": sid}))
        emu.expire(sc(ok)["container_id"])  # the 400 "Container is expired." echoes the key as well
        emu.add_fault("containers.create", 503, times=3, retry_after="0.01")  # then the replacement fails
        keep(await client.call_tool("run_code", {"code": "3", "session_id": sid}))
        keep(await client.call_tool("list_container_files", {"session_id": sid}))
        keep(await client.call_tool("download_file", {"file": "f.txt", "session_id": sid}))
        emu.behaviour.api_key = "the-only-accepted-key"  # 401 whose message echoes the presented key
        keep(await client.call_tool("run_code", {"code": "4", "session_id": sid}))
    assert len(seen) == 8
    assert sum("request key" in t for t in seen) >= 3  # the echoed key reached the server and was scrubbed
    assert any("auth_failed" in t for t in seen)
    for t in seen:
        assert SECRET not in t
    for record in caplog.records:
        assert SECRET not in record.getMessage()


async def test_progress_notifications_during_a_slow_run(emu: Emulator, client: Client) -> None:
    first = await run(client, "1")  # the container exists: the slow part below is the model call itself
    seen: list[tuple[float, float | None, str | None, float]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message, time.monotonic()))
        if message and message.startswith("model started"):
            emu.behaviour.latency_s = 0.0  # only the first call of the run is slow: keep the test short

    emu.behaviour.latency_s = 1.6
    started = time.monotonic()
    r = await client.call_tool(
        "run_code", {"code": "print('slow')", "session_id": first["session_id"]}, progress_callback=on_progress
    )
    done = time.monotonic()
    assert sc(r)["stdout"] == "slow\n"
    messages = [m or "" for _, _, m, _ in seen]
    # A heartbeat while nothing happened yet, then the stages the stream reports, in order.
    assert messages[0].startswith("running") and seen[0][3] - started < 1.6
    stages = [m.split(" (")[0] for m in messages[1:]]
    assert stages == ["model started", "running code", "interpreting", "writing answer", "done"]
    assert all(b[0] > a[0] for a, b in itertools.pairwise(seen))  # strictly increasing progress
    assert all(total is None for _, total, _, _ in seen)  # seconds have no known total (the timeout is a ceiling)
    assert all(at <= done for *_, at in seen)


# ----- end to end: the real server process over stdio, the emulator in its own process --------------------------


def server_params(emulator: EmulatorProcess, data_dir: Path, key: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "code_interpreter_mcp", "serve"],
        env={
            "PYTHONUNBUFFERED": "1",
            "CODE_INTERPRETER_BACKEND": "openai",
            "CODE_INTERPRETER_DATA_DIR": str(data_dir),
            "CODE_INTERPRETER_LOG_LEVEL": "DEBUG",
            "OPENAI_BASE_URL": emulator.base_url,
            "OPENAI_API_KEY": key,
        },
    )


@pytest.mark.slow
async def test_stdio_server_against_the_emulator_process(tmp_path: Path) -> None:
    errlog_path = tmp_path / "server-stderr.log"
    texts: list[str] = []

    def keep(r: CallToolResult) -> CallToolResult:
        texts.append(json.dumps(r.structured_content) + text_of(r) + repr(r.content))
        return r

    with EmulatorProcess(behaviour={"api_key": SECRET}) as emulator, errlog_path.open("w") as errlog:
        params = server_params(emulator, tmp_path / "data", SECRET)
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            code = (
                "import os\nos.makedirs('/mnt/data/out', exist_ok=True)\n"
                "open('/mnt/data/out/table.csv', 'w').write('x,y\\n1,2\\n')\n"
                "open('/mnt/data/img.bin', 'wb').write(bytes(range(256)) * 40)\nprint('e2e', 6 * 7)"
            )
            r = keep(await s.call_tool("run_code", {"code": code}))
            first = sc(r)
            assert not r.is_error and first["stdout"] == "e2e 42\n" and first["backend"] == "openai"
            files = {f["path"]: f for f in first["files"]}
            assert set(files) == {"out/table.csv", "img.bin"}
            assert files["img.bin"]["sha256"] == sha(bytes(range(256)) * 40)
            assert files["out/table.csv"]["sha256"] == sha(b"x,y\n1,2\n")
            assert "sandbox:" not in first["text"] and files["img.bin"]["uri"] in first["text"]
            cid = first["container_id"]
            remote = {
                f["path"]: f["bytes"] for c in emulator.state()["containers"] if c["id"] == cid for f in c["files"]
            }
            assert remote == {"/mnt/data/out/table.csv": 8, "/mnt/data/img.bin": 10240}

            emulator.expire(cid)
            d = keep(await s.call_tool("download_file", {"file": "out/table.csv"}))
            assert not d.is_error and any(
                isinstance(c, EmbeddedResource) and c.resource.text == "x,y\n1,2\n" for c in d.content
            )
            listing = sc(keep(await s.call_tool("list_container_files", {})))
            assert {"out/table.csv", "img.bin"} <= {f["path"] for f in listing["files"]}
            again = sc(
                keep(await s.call_tool("run_code", {"code": "print(sorted(__import__('os').listdir('/mnt/data')))"}))
            )
            assert again["session_id"] == first["session_id"] and again["container"]["state_lost"] is True
            assert again["container_id"] != cid and again["stdout"] == "[]\n"
            ids = {cid, again["container_id"]}
        # The server process has exited (stdin closed): nothing it created is left running.
        state = emulator.state()
        statuses = {c["id"]: c["status"] for c in state["containers"]}
        assert set(statuses) == ids
        assert statuses[again["container_id"]] == "deleted"
        assert statuses[cid] in ("expired", "deleted")
        assert state["calls"].get("containers.delete", 0) >= 1
    log = errlog_path.read_text()
    assert len(texts) == 4 and all(SECRET not in t for t in texts)
    assert "DEBUG" in log and SECRET not in log  # the server logged at DEBUG, and never the key
