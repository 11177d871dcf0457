"""Variables survive: a session's namespace comes back after a crashed worker, an expired or evicted container, a
server restart and a kill -9 of the server, through a real MCP client and the real sandbox; what cannot come back
is named; broken snapshots never fail a run; sessions never see each other's; SNAPSHOTS=off keeps the old way."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine
from tests.helpers import structured
from tests.test_e2e_stdio import params
from tests.test_runs_restart import start
from tests.test_tasks import raw_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DEFINE = """
import numpy as np
import pandas as pd
from math import sqrt
n = 42
s = "héllo"
d = {"a": [1, 2], "b": None}
arr = np.arange(12).reshape(3, 4)
df = pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]})
def twice(v):
    return v * 2 + n
lam = lambda z: z + 1
class Point:
    def __init__(self, x):
        self.x = x
    def norm(self):
        return sqrt(self.x * self.x)
p = Point(-3)
gen = (i for i in range(3))
"""
CHECK = """
assert n == 42 and s == "héllo" and d == {"a": [1, 2], "b": None}
assert (arr == np.arange(12).reshape(3, 4)).all()
assert df.equals(pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]}))
assert twice(1) == 44 and lam(1) == 2 and sqrt(16) == 4
assert isinstance(p, Point) and p.norm() == 3
assert np.pi > 3 and "gen" not in dir()
print("all back")
"""
HOG = (
    "kept = 'during'\n"
    "import subprocess, sys\n"
    "hold = bytearray(170 << 20)\n"
    "subprocess.run([sys.executable, '-c', 'b = bytearray(120 << 20); import time; time.sleep(5)'])\n"
)
CRASH = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"  # the worker dies as a crash would kill it
NAMES = ["np", "pd", "sqrt", "n", "s", "d", "arr", "df", "twice", "lam", "Point", "p"]


def snap_dir(data: Path, sid: str) -> Path:
    return data / "files" / "o_none" / "snapshots" / sid


def newest(data: Path, sid: str) -> Path | None:
    runs = sorted(snap_dir(data, sid).glob("run-*"), key=lambda p: int(p.name.split("-")[1]))
    return runs[-1] if runs else None


async def saved(data: Path, sid: str, run: int, within: float = 30.0) -> Path:
    """The snapshot folder once the one of the session's `run`-th run (or a later one) is complete."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        folder = newest(data, sid)
        if folder is not None:
            manifest = json.loads((folder / "manifest.json").read_text())
            if (manifest.get("run") or 0) >= run:
                return folder
        await anyio.sleep(0.05)
    raise AssertionError(f"no snapshot of run {run} of {sid}")


def assert_restored(r: dict[str, Any]) -> None:
    assert r["status"] == "ok", r
    assert r["stdout"] == "all back\n", r
    container = r["container"]
    assert container["state_lost"] is False, r
    restored = container["state_restored"]
    assert restored is not None, r
    assert restored["restored"] == NAMES
    assert [x["name"] for x in restored["skipped"]] == ["gen"]
    assert "generator" in restored["skipped"][0]["reason"]
    assert restored["from_run"] >= 1 and restored["seconds"] >= 0


@asynccontextmanager
async def client(data: Path, **overrides: Any) -> AsyncIterator[tuple[Client, Engine]]:
    settings = Settings(data_dir=data, interrupt_grace_s=1.0, **overrides)
    engine = Engine(settings)
    async with Client(build_server(settings, engine)) as c:
        yield c, engine


async def call(c: Client, code: str, sid: str | None = None, **extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"code": code, **extra}
    if sid is not None:
        args["session_id"] = sid
    return structured(await c.call_tool("run_code", args))


async def other_session(c: Client, engine: Engine, code: str) -> str:
    """A second client's session (the in-process client has one of its own), after its first run."""
    sid = (await engine.reg.create_session(None)).id
    assert (await call(c, code, sid))["status"] == "ok"
    return sid


async def define(c: Client, data: Path) -> str:
    first = await call(c, DEFINE)
    assert first["status"] == "ok", first
    sid = first["session_id"]
    await saved(data, sid, 1)
    return str(sid)


async def test_a_crashed_worker_gives_every_value_back(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data) as (c, _engine):
        sid = await define(c, data)
        crash = await call(c, CRASH, sid)
        assert crash["status"] == "error" and crash["container"]["state_lost"] is True
        assert_restored(await call(c, CHECK, sid))
        # Loaded once: the run after it is an ordinary one.
        after = await call(c, "n + 1", sid)
        assert after["result"] == "43" and after["container"].get("state_restored") is None


async def test_an_expired_container_gives_every_value_back(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data, expiry_minutes=0.03) as (c, _engine):  # about 2 s
        sid = await define(c, data)
        first_container = (await call(c, "1", sid))["container"]["id"]
        await anyio.sleep(2.5)
        back = await call(c, CHECK, sid)
        assert back["container"]["id"] != first_container
        assert_restored(back)


async def test_an_evicted_container_gives_every_value_back(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data, max_live_containers=1, warm_workers=0) as (c, engine):
        sid = await define(c, data)
        await other_session(c, engine, "n = 'other'")  # evicts the first session's worker
        back = await call(c, CHECK, sid)
        assert_restored(back)
        assert any("make room" in w for w in back["warnings"])


async def test_a_server_restart_gives_every_value_back(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with Client(params(data)) as c:
        first = structured(await c.call_tool("run_code", {"code": DEFINE}))
        sid = first["session_id"]
    # A graceful stop lets the snapshot being written finish.
    await saved(data, sid, 1, within=1)
    async with Client(params(data)) as c:
        assert_restored(structured(await c.call_tool("run_code", {"code": CHECK, "session_id": sid})))


async def test_a_stop_right_after_a_run_keeps_that_runs_variables(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data) as (c, _engine):
        sid = (await call(c, "words = [str(i) for i in range(1_500_000)]\nn = 1"))["session_id"]
        assert (await call(c, "n += 1", sid))["status"] == "ok"
    # Stopped while the snapshot of those runs was still being written: the stop waits for it, and only then
    # retires the worker its snapshot child lives in.
    async with client(data) as (c, _engine):
        back = await call(c, "n, len(words)", sid)
        assert back["container"]["state_lost"] is False, back
        assert back["result"] == "(2, 1500000)", back


async def test_a_killed_server_gives_every_value_back(tmp_path: Path) -> None:
    data = tmp_path / "d"
    with raw_server(data) as raw:
        first = await start(raw, {"code": DEFINE})
        assert first["status"] == "ok", first
        sid = first["session_id"]
        await saved(data, sid, 1)
    # raw_server ends with SIGKILL: nothing of the server got to clean up.
    async with Client(params(data)) as c:
        assert_restored(structured(await c.call_tool("run_code", {"code": CHECK, "session_id": sid})))


async def test_an_out_of_memory_run_restores_the_run_before_it(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data, memory_mb=256) as (c, engine):
        sid = (await call(c, "kept = 'before'"))["session_id"]
        mechanism = engine.ctx.backend.describe()["memory"]["mechanism"]
        await saved(data, sid, 1)
        if mechanism == "rlimit":
            pytest.skip("no memory group on this host: a process over the limit gets MemoryError, nothing is killed")
        # The worker is the biggest process of its group when a child fills it: the OOM killer's pick.
        hog = await call(c, HOG, sid)
        assert hog["status"] == "error" and hog["error"]["type"] == "WorkerDied", hog
        assert "memory" in hog["error"]["message"] and hog["container"]["state_lost"] is True
        back = await call(c, "kept", sid)
        assert back["result"] == "'before'", back
        assert back["container"]["state_restored"]["restored"] == ["kept"]


async def test_a_name_over_the_cap_is_left_out_with_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data, snapshot_max_mb=1) as (c, _engine):
        first = await call(c, "import numpy as np\nbig = np.zeros(400_000)\nsmall = [1, 2]")
        assert any(w.startswith("not kept across restarts: big (3.1 MB") for w in first["warnings"]), first
        sid = first["session_id"]
        # A value whose size only the pickling finds out: said with the next result, once.
        nested = await call(c, "words = [str(i) * 40 for i in range(40_000)]", sid)
        assert not any("words" in w for w in nested["warnings"])
        await saved(data, sid, 2)
        later = await call(c, "1", sid)
        assert sum("not kept across restarts: words" in w for w in later["warnings"]) == 1, later
        assert not any("big" in w for w in later["warnings"])
        await call(c, CRASH, sid)
        back = await call(c, "small", sid)
        assert back["result"] == "[1, 2]"
        restored = back["container"]["state_restored"]
        assert restored["restored"] == ["np", "small"]
        assert {x["name"] for x in restored["skipped"]} == {"big", "words"}
        assert all("SNAPSHOT_MAX_MB" in x["reason"] for x in restored["skipped"])


async def test_a_truncated_part_loses_only_its_name(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data) as (c, _engine):
        sid = (await call(c, "a = list(range(1000))\nb = 'bee'"))["session_id"]
        folder = await saved(data, sid, 1)
        manifest = json.loads((folder / "manifest.json").read_text())
        part = next(p for p in manifest["parts"] if p["name"] == "a")
        os.truncate(folder / part["file"], 10)
        await call(c, CRASH, sid)
        back = await call(c, "b", sid)
        assert back["status"] == "ok" and back["result"] == "'bee'"
        restored = back["container"]["state_restored"]
        assert restored["restored"] == ["b"] and back["container"]["state_lost"] is False
        assert restored["skipped"][0]["name"] == "a" and "truncated" in restored["skipped"][0]["reason"]


async def test_an_unreadable_manifest_says_state_lost_with_the_reason(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data) as (c, _engine):
        sid = (await call(c, "a = 1"))["session_id"]
        folder = await saved(data, sid, 1)
        (folder / "manifest.json").write_text("{not json")
        await call(c, CRASH, sid)
        back = await call(c, "'a' in dir()", sid)
        assert back["status"] == "ok" and back["result"] == "False"
        assert back["container"]["state_lost"] is True and back["container"].get("state_restored") is None
        assert any("could not be restored" in w and "manifest" in w for w in back["warnings"]), back
        assert (await call(c, "2", sid))["result"] == "2"  # and the server goes on


async def test_two_sessions_with_the_same_names_keep_their_own_values(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data) as (c, engine):
        one = (await call(c, "x = 'one'"))["session_id"]
        two = await other_session(c, engine, "x = 'two'")
        await saved(data, one, 1)
        await saved(data, two, 1)
        for sid in (one, two):
            await call(c, CRASH, sid)
        assert (await call(c, "x", one))["result"] == "'one'"
        assert (await call(c, "x", two))["result"] == "'two'"


async def test_off_keeps_the_old_behaviour_and_close_session_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "off"
    async with client(data, snapshots="off") as (c, engine):
        assert engine.ctx.backend.describe()["snapshots"] == "off (SNAPSHOTS=off)"
        sid = (await call(c, "a = 1"))["session_id"]
        crash = await call(c, CRASH, sid)
        assert crash["container"]["state_lost"] is True  # said once, by the run that lost it, as before
        back = await call(c, "'a' in dir()", sid)
        assert back["result"] == "False" and back["container"].get("state_restored") is None
        assert not (data / "files" / "o_none" / "snapshots").exists()

    data = tmp_path / "on"
    async with client(data) as (c, _engine):
        sid = (await call(c, "a = 1"))["session_id"]
        await saved(data, sid, 1)
        closed = structured(await c.call_tool("close_session", {"session_id": sid}))
        assert closed["closed"] is True
        assert not snap_dir(data, sid).exists()


async def test_no_path_in_the_sandbox_reaches_a_snapshot(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data) as (c, engine):
        mine = (await call(c, "secret = 'mine'"))["session_id"]
        other = await other_session(c, engine, "secret = 'theirs'")
        theirs = await saved(data, other, 1)
        await saved(data, mine, 1)
        probe = (
            "import os\n"
            f"paths = [{str(theirs / 'manifest.json')!r}, {str(snap_dir(data, mine))!r}, {str(data / 'files')!r}]\n"
            "reachable = [p for p in paths if os.path.exists(p)]\n"
            "mounts = open('/proc/self/mountinfo').read()\n"
            "found = [p for p in ('snapshots', 'files/o_') if p in mounts]\n"
            "listed = sorted(os.listdir('/mnt/data'))\n"
            "(reachable, found, listed)"
        )
        out = await call(c, probe, mine)
        assert out["status"] == "ok" and out["result"] == "([], [], [])", out
        files = structured(await c.call_tool("list_container_files", {"session_id": mine}))
        assert files["files"] == []


async def test_a_restored_large_array_is_writable_and_its_snapshot_unchanged(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data) as (c, _engine):
        sid = (await call(c, "import numpy as np\nbig = np.arange(1_000_000, dtype=np.float64)"))["session_id"]
        folder = await saved(data, sid, 1)
        part = next(p for p in json.loads((folder / "manifest.json").read_text())["parts"] if p["name"] == "big")
        assert part["buffers"] == [8_000_000]  # the array's memory went out of band, not copied into the pickle
        before = (folder / part["file"]).read_bytes()
        with open(folder / part["file"], "rb") as kept:  # the file itself, even once a newer snapshot replaced it
            await call(c, CRASH, sid)
            back = await call(c, "big[0] = -1.0\nfloat(big.sum()), big.flags.writeable", sid)
            assert back["result"] == f"({sum(range(1_000_000)) - 1.0}, True)", back
            assert kept.read() == before  # written through a private copy, never the file


async def test_snapshots_count_against_the_store_and_a_full_one_is_said(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data, max_stored_mb=1) as (c, engine):
        sid = (await call(c, "small = 'fits'"))["session_id"]
        await saved(data, sid, 1)
        assert engine.ctx.blobs.used_bytes >= engine.ctx.snapshots.used_bytes > 0  # type: ignore[union-attr]
        await call(c, "import numpy as np\nbig = np.ones(300_000)", sid)
        deadline = time.monotonic() + 20
        while True:  # the stream is dropped when the store has no room; the next run says so
            later = await call(c, "1", sid)
            if any("store of files and snapshots is full" in w for w in later["warnings"]):
                break
            assert time.monotonic() < deadline, later
            await anyio.sleep(0.1)
        manifest = json.loads((newest(data, sid) / "manifest.json").read_text())  # type: ignore[operator]
        assert [p["name"] for p in manifest["parts"]] == ["small"]  # the last snapshot that fit is kept


async def test_a_module_gone_since_the_snapshot_loses_only_what_needs_it(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with client(data) as (c, _engine):
        make = (
            "open('mymod.py', 'w').write('class Thing:\\n    def __init__(self):\\n        self.v = 7\\n')\n"
            "import mymod\nthing = mymod.Thing()\nplain = 'still here'"
        )
        sid = (await call(c, make))["session_id"]
        await saved(data, sid, 1)
        await call(c, "import os, signal; os.remove('mymod.py'); os.kill(os.getpid(), signal.SIGKILL)", sid)
        back = await call(c, "plain", sid)
        assert back["status"] == "ok" and back["result"] == "'still here'", back
        restored = back["container"]["state_restored"]
        assert restored["restored"] == ["plain"]
        reasons = {x["name"]: x["reason"] for x in restored["skipped"]}
        assert set(reasons) == {"mymod", "thing"} and all("mymod" in r for r in reasons.values()), reasons
