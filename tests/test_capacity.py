"""Bounded live workers (backends/local/workers/capacity.py): the least recently used idle worker makes room and its
next run says state_lost and why; a clear `capacity` error when every worker is busy; the per-owner cap; and the same
through a real MCP client."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from mcp import Client

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.backends.base import ContainerState, ExecOutcome, ExecRequest, no_progress
from code_interpreter_mcp.backends.local import LocalBackend
from code_interpreter_mcp.backends.local.workers.capacity import default_max_live
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine
from code_interpreter_mcp.errors import CapacityError
from tests.helpers import MakeBackend, structured, text_of

pytestmark = pytest.mark.anyio


async def run(backend: LocalBackend, container: ContainerState, code: str, timeout: float = 20.0) -> ExecOutcome:
    return await backend.execute(container, ExecRequest(code=code, timeout_s=timeout), no_progress)


def live_workers(backend: LocalBackend) -> int:
    assert backend._capacity is not None
    return len(backend._capacity.live())


async def test_lru_idle_worker_is_evicted_and_its_next_run_says_why(make_backend: MakeBackend) -> None:
    backend = await make_backend(max_live_containers=2, warm_workers=0)
    a = await backend.create_container("s-a", 600)
    b = await backend.create_container("s-b", 600)
    assert (await run(backend, a, "x = 'a'\nopen('kept.txt', 'w').write('a')")).status == "ok"
    assert (await run(backend, b, "x = 'b'")).status == "ok"
    await run(backend, a, "x")  # a is now the most recently used: b is the one to go
    c = await backend.create_container("s-c", 600)
    assert live_workers(backend) == 2
    assert backend._containers.get(b.id).worker is None  # type: ignore[union-attr]
    again = await run(backend, b, "x")
    assert again.status == "ok" and again.result_repr == "'b'"  # saved before the eviction, loaded after it
    assert not again.state_lost and again.state_restored is not None
    assert any("make room" in w and "MAX_LIVE_CONTAINERS=2" in w and "came back" in w for w in again.warnings)
    assert live_workers(backend) == 2  # b's return evicted the next LRU idle one (a)
    files = await backend.list_files(a)
    assert [f.path for f in files] == ["kept.txt"]  # an evicted container keeps its files
    assert (await run(backend, c, "1")).state_lost is False


async def test_capacity_error_when_every_worker_is_busy(make_backend: MakeBackend) -> None:
    backend = await make_backend(max_live_containers=2, warm_workers=0)
    a = await backend.create_container("s-a", 600)
    b = await backend.create_container("s-b", 600)
    async with anyio.create_task_group() as tg:
        for c in (a, b):
            tg.start_soon(run, backend, c, "import time; time.sleep(2)")
        await anyio.sleep(0.5)
        with pytest.raises(CapacityError) as info:
            await backend.create_container("s-c", 600)
        assert info.value.code == "capacity"
        assert "busy" in info.value.message and "close_session" in info.value.hint
        assert live_workers(backend) == 2
    c = await backend.create_container("s-c", 600)  # once they are idle, one makes room
    assert (await run(backend, c, "1+1")).result_repr == "2"


async def test_per_owner_cap_evicts_only_that_owner(make_backend: MakeBackend) -> None:
    backend = await make_backend(max_live_containers=10, max_live_containers_per_owner=2, warm_workers=0)
    a1 = await backend.create_container("a1", 600, owner="alice")
    b1 = await backend.create_container("b1", 600, owner="bob")
    a2 = await backend.create_container("a2", 600, owner="alice")
    await run(backend, a2, "1")
    await backend.create_container("a3", 600, owner="alice")
    assert backend._containers.get(a1.id).worker is None  # type: ignore[union-attr]
    assert backend._containers.get(a2.id).worker is not None  # type: ignore[union-attr]
    assert backend._containers.get(b1.id).worker is not None  # type: ignore[union-attr]
    async with anyio.create_task_group() as tg:
        for cid in (a2,):
            tg.start_soon(run, backend, cid, "import time; time.sleep(1.5)")
        await anyio.sleep(0.4)
        busy = await backend.create_container("a4", 600, owner="alice")  # a3 is idle: it makes room
        assert backend._containers.get(busy.id).worker is not None  # type: ignore[union-attr]
        tg.start_soon(run, backend, busy, "import time; time.sleep(1.5)")
        await anyio.sleep(0.4)
        with pytest.raises(CapacityError):
            await backend.create_container("a5", 600, owner="alice")
        await backend.create_container("b2", 600, owner="bob")  # another owner is not held up


async def test_default_cap_follows_memory() -> None:
    assert 2 <= default_max_live(2048) <= 200
    assert default_max_live(128) >= default_max_live(2048)  # a smaller per-worker budget fits more workers


async def test_describe_reports_caps(make_backend: MakeBackend) -> None:
    backend = await make_backend(max_live_containers=3, warm_workers=0)
    facts = backend.describe()["capacity"]
    assert facts["max_live_containers"] == 3 and facts["warm_workers"] == 0


async def test_eviction_through_mcp_client(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_live_containers=1, warm_workers=0, interrupt_grace_s=1.0)
    engine = Engine(settings)
    async with Client(build_server(settings, engine)) as client:
        first = structured(await client.call_tool("run_code", {"code": "x = 1\nopen('a.txt','w').write('1')"}))
        sid_a = first["session_id"]
        sid_b = (await engine.reg.create_session(None)).id  # a second client's session
        other = structured(await client.call_tool("run_code", {"code": "2", "session_id": sid_b}))
        assert other["status"] == "ok", other
        back = structured(await client.call_tool("run_code", {"code": "'x' in dir()", "session_id": sid_a}))
        assert back["status"] == "ok" and back["result"] == "True"  # its variables came back from the snapshot
        assert back["container"]["state_lost"] is False and back["container"]["state_restored"]["restored"] == ["x"]
        assert any("make room" in w for w in back["warnings"])
        listed = structured(await client.call_tool("list_container_files", {"session_id": sid_a}))
        assert [f["path"] for f in listed["files"]] == ["a.txt"]


async def test_capacity_error_through_mcp_client(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_live_containers=1, warm_workers=0, interrupt_grace_s=1.0)
    engine = Engine(settings)
    async with Client(build_server(settings, engine)) as client:
        busy = structured(await client.call_tool("run_code", {"code": "1"}))
        sid_b = (await engine.reg.create_session(None)).id
        async with anyio.create_task_group() as tg:
            args = {"code": "import time; time.sleep(2)", "session_id": busy["session_id"]}
            tg.start_soon(client.call_tool, "run_code", args)
            await anyio.sleep(0.6)
            refused = await client.call_tool("run_code", {"code": "2", "session_id": sid_b})
            assert refused.is_error
            text = text_of(refused)
            assert "[capacity]" in text and "busy" in text and "MAX_LIVE_CONTAINERS" in text
        again = structured(await client.call_tool("run_code", {"code": "2", "session_id": sid_b}))
        assert again["status"] == "ok" and again["result"] == "2"  # the idle worker made room
