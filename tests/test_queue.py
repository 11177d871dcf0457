"""The per-session queue and file tools during a run, through a real in-memory MCP client on the real local
backend: parallel runs go in arrival order, MAX_QUEUED_RUNS, a queued run's status, get_run and cancel_run, and
list_container_files / download_file answering at once while a run goes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.models import DownloadResult, FileList, RunResult
from tests.helpers import structured, text_of

pytestmark = pytest.mark.anyio


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", reaper_interval_s=0.2, interrupt_grace_s=1.0, **overrides)


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    return structured(await client.call_tool(tool, args))


async def parallel(client: Client, calls: list[dict[str, Any]], gap_s: float = 0.02) -> list[Any]:
    """Each call started in order (a short gap so arrival order is the list's), all awaited together."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        results[i] = await client.call_tool("run_code", calls[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(one, i)
            await anyio.sleep(gap_s)
    return results


async def test_twenty_parallel_runs_go_in_arrival_order(tmp_path: Path) -> None:
    async with Client(build_server(_settings(tmp_path)), raise_exceptions=True) as client:
        first = await call(client, "run_code", code="x = 0\norder = []")
        sid = first["session_id"]
        code = "x += 1\norder.append(x)\nx"
        results = await parallel(client, [{"code": code, "session_id": sid} for _ in range(20)])
        values = [structured(r) for r in results]
        assert all(v["status"] == "ok" for v in values), [text_of(r) for r in results if r.is_error]
        assert [v["result"] for v in values] == [str(i) for i in range(1, 21)]  # each saw the one before it
        assert (await call(client, "run_code", code="x, order == list(range(1, 21))", session_id=sid))[
            "result"
        ] == "(20, True)"


async def test_max_queued_runs_refuses_the_ones_past_it(tmp_path: Path) -> None:
    async with Client(build_server(_settings(tmp_path, max_queued_runs=2)), raise_exceptions=True) as client:
        sid = (await call(client, "run_code", code="n = 0"))["session_id"]
        code = "import time; time.sleep(0.5); n += 1"
        results = await parallel(client, [{"code": code, "session_id": sid} for _ in range(5)])
        ok = [r for r in results if not r.is_error]
        busy = [r for r in results if r.is_error]
        assert len(ok) == 3 and len(busy) == 2, [text_of(r) for r in results]
        for r in busy:
            assert "[session_busy]" in text_of(r) and "MAX_QUEUED_RUNS=2" in text_of(r)
        assert (await call(client, "run_code", code="n", session_id=sid))["result"] == "3"


async def test_a_queued_run_reports_its_place_and_get_run_gives_its_result(tmp_path: Path) -> None:
    async with Client(build_server(_settings(tmp_path)), raise_exceptions=True) as client:
        long = await call(client, "run_code", code="import time; time.sleep(2); y = 5", wait_s=0)
        sid = long["session_id"]
        queued = await call(client, "run_code", code="y * 2", session_id=sid, wait_s=0)
        RunResult.model_validate(queued)
        assert queued["status"] == "queued" and queued["run_id"].startswith("r_")
        assert queued["position"] == 1 and queued["waits_for"] == long["run_id"]
        third = await call(client, "run_code", code="y * 3", session_id=sid, wait_s=0)
        assert third["status"] == "queued" and third["position"] == 2 and third["waits_for"] == queued["run_id"]
        again = await call(client, "get_run", run_id=queued["run_id"], wait_s=0)
        assert again["status"] == "queued"
        done = await call(client, "get_run", run_id=queued["run_id"], wait_s=20)
        assert done["status"] == "ok" and done["result"] == "10"
        assert (await call(client, "get_run", run_id=third["run_id"], wait_s=20))["result"] == "15"


async def test_cancel_run_takes_a_queued_run_out_and_it_never_runs(tmp_path: Path) -> None:
    async with Client(build_server(_settings(tmp_path)), raise_exceptions=True) as client:
        long = await call(client, "run_code", code="import time; time.sleep(1.5)", wait_s=0)
        sid = long["session_id"]
        queued = await call(client, "run_code", code="open('side.txt', 'w').write('ran')", session_id=sid, wait_s=0)
        after = await call(client, "run_code", code="'after'", session_id=sid, wait_s=0)
        assert queued["status"] == after["status"] == "queued"
        cancelled = await call(client, "cancel_run", run_id=queued["run_id"])
        assert cancelled["status"] == "cancelled" and "never ran" in cancelled["error"]["message"]
        assert (await call(client, "get_run", run_id=after["run_id"], wait_s=20))["result"] == "'after'"
        check = await call(client, "run_code", code="import os; os.path.exists('side.txt')", session_id=sid)
        assert check["result"] == "False"
        assert (await call(client, "get_run", run_id=long["run_id"]))["status"] == "ok"


async def test_an_error_does_not_cancel_the_runs_behind_it(tmp_path: Path) -> None:
    async with Client(build_server(_settings(tmp_path)), raise_exceptions=True) as client:
        sid = (await call(client, "run_code", code="z = 1"))["session_id"]
        calls = [{"code": c, "session_id": sid} for c in ("import time; time.sleep(0.3); 1/0", "z + 1")]
        failed, later = (structured(r) for r in await parallel(client, calls))
        assert failed["status"] == "error" and failed["error"]["type"] == "ZeroDivisionError"
        assert later["status"] == "ok" and later["result"] == "2"


async def test_close_session_cancels_its_queue(tmp_path: Path) -> None:
    async with Client(build_server(_settings(tmp_path)), raise_exceptions=True) as client:
        long = await call(client, "run_code", code="import time; time.sleep(30)", wait_s=0)
        sid = long["session_id"]
        answers: dict[str, dict[str, Any]] = {}

        async def wait_queued() -> None:  # a caller still waiting for its queued run
            answers["queued"] = await call(client, "run_code", code="1", session_id=sid)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_queued)
            await anyio.sleep(0.3)
            started = time.monotonic()
            await call(client, "close_session", session_id=sid)
            assert time.monotonic() - started < 6
        assert answers["queued"]["status"] == "cancelled" and "never ran" in answers["queued"]["error"]["message"]


async def test_file_tools_answer_at_once_during_a_run(tmp_path: Path) -> None:
    async with Client(build_server(_settings(tmp_path)), raise_exceptions=True) as client:
        first = await call(client, "run_code", code="open('a.txt', 'w').write('hello')")
        sid = first["session_id"]
        long = await call(client, "run_code", code="import time; time.sleep(10)", session_id=sid, wait_s=0)
        started = time.monotonic()
        listed = await call(client, "list_container_files", session_id=sid)
        FileList.model_validate(listed)
        got = await call(client, "download_file", session_id=sid, file="a.txt")
        DownloadResult.model_validate(got)
        read = await client.read_resource(first["files"][0]["uri"])
        assert time.monotonic() - started < 1
        assert read.contents[0].text == "hello"  # type: ignore[union-attr]
        assert [f["path"] for f in listed["files"]] == ["a.txt"]
        for r in (listed, got):
            assert r["as_of_run"] == first["run_id"] and r["run_in_progress"] == long["run_id"]
        await call(client, "cancel_run", run_id=long["run_id"])
        quiet = await call(client, "list_container_files", session_id=sid)
        assert quiet["run_in_progress"] is None and quiet["as_of_run"] == long["run_id"]


async def _twenty_in_order(client: Client) -> None:
    sid = structured(await client.call_tool("run_code", {"code": "x = 0"}))["session_id"]
    results = await parallel(client, [{"code": "x += 1\nx", "session_id": sid} for _ in range(20)])
    assert [structured(r)["result"] for r in results] == [str(i) for i in range(1, 21)]
    assert structured(await client.call_tool("run_code", {"code": "x", "session_id": sid}))["result"] == "20"


@pytest.mark.slow
async def test_twenty_parallel_runs_over_stdio_and_http(tmp_path: Path) -> None:
    """The same through the real server process, over both transports a client uses."""
    from tests.test_e2e_http import http_server
    from tests.test_e2e_stdio import params

    async with Client(params(tmp_path / "s")) as over_stdio:
        await _twenty_in_order(over_stdio)
    with http_server(tmp_path / "h") as url:
        async with Client(url) as over_http:
            await _twenty_in_order(over_http)
