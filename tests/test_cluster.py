"""Three real replicas (separate server processes) sharing a real PostgreSQL registry and a shared store, behind a
real haproxy, talked to by the real MCP client over HTTP with bearer tokens:

- a session made through A runs, lists and downloads through B and C (forwarded to A), keeping its variables;
- 30 sessions through haproxy spread over the three replicas;
- a forwarded request that is unsigned or signed with another secret is refused; one token's session stays
  invisible to another token on every replica;
- kill -9 of a session's home while idle: the next call through another replica adopts it, files intact and
  variables restored (`state_restored`).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from code_interpreter_mcp.app.forward import HEADER, RAW, signed_header
from tests.helpers import structured
from tests.infra import (  # noqa: F401  # the fixtures, by name
    Postgres,
    haproxy_fixture,
    pg_fixture,
    pg_session_fixture,
)
from tests.test_e2e_http import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
TOKENS = ("tok-one", "tok-two")
LEASE_S = 2.0


@dataclass
class Replica:
    url: str  # its REPLICA_URL
    proc: subprocess.Popen[bytes]

    @property
    def mcp(self) -> str:
        return self.url + "/mcp"


@contextmanager
def replica(data: Path, port: int, shared: dict[str, str]) -> Iterator[Replica]:
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **shared,
        "CODE_INTERPRETER_DATA_DIR": str(data),
        "REPLICA_URL": url,
        "CODE_INTERPRETER_AUTH_TOKEN": ",".join(TOKENS),
        "CODE_INTERPRETER_LEASE_S": str(LEASE_S),
    }
    argv = [sys.executable, "-m", "code_interpreter_mcp", "serve", "--transport", "http", "--port", str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=open(data.with_suffix(".log"), "wb"))
    try:
        _wait_http(url, proc)
        yield Replica(url, proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"replica {url} exited"
        try:
            httpx2.get(url + "/mcp", timeout=0.5)
            return
        except httpx2.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"replica {url} did not start")


DATABASE: dict[str, str] = {}  # the running cluster's DATABASE_URL, for the tests that read its registry


def shared_env(tmp_path: Path, pg: Postgres, extra: dict[str, str] | None = None) -> dict[str, str]:
    """What every replica of one cluster shares: a new PostgreSQL database, a folder store, a secret."""
    store = tmp_path / "store"
    store.mkdir()
    return {
        "DATABASE_URL": pg.create_database("c_" + secrets.token_hex(6)),
        "STORE_URL": store.as_uri(),
        "CLUSTER_SECRET": secrets.token_hex(32),
        **(extra or {}),
    }


async def kill_home(r: Replica) -> None:
    """kill -9 of a replica, then wait until its lease has run out."""
    r.proc.send_signal(signal.SIGKILL)
    r.proc.wait(5)
    await anyio.sleep(LEASE_S + 0.5)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[Replica]]:
    marker = request.node.get_closest_marker("replica_env")
    extra: dict[str, str] = marker.args[0] if marker is not None else {}
    shared = shared_env(tmp_path, request.getfixturevalue("pg"), extra)
    DATABASE["url"] = shared["DATABASE_URL"]
    with ExitStack() as stack:
        yield [stack.enter_context(replica(tmp_path / f"r{i}", free_port(), shared)) for i in range(3)]


def client(url: str, token: str = TOKENS[0]) -> Client:
    headers = {"Authorization": f"Bearer {token}"}
    return Client(streamable_http_client(url, http_client=httpx2.AsyncClient(headers=headers, timeout=60)))


async def call(url: str, tool: str, args: dict[str, Any], token: str = TOKENS[0]) -> dict[str, Any]:
    async with client(url, token) as c:
        return structured(await c.call_tool(tool, args))


async def test_a_session_is_served_by_every_replica(cluster: list[Replica]) -> None:
    a, b, c = cluster
    first = await call(a.mcp, "run_code", {"code": "x = 1\nopen('/mnt/data/n.txt', 'w').write('one')"})
    sid = first["session_id"]
    second = await call(b.mcp, "run_code", {"code": "x += 1\nx", "session_id": sid})  # forwarded to a
    assert second["status"] == "ok" and second["result"] == "2", second
    third = await call(c.mcp, "run_code", {"code": "x += 1\nx", "session_id": sid})
    assert third["result"] == "3", third
    listed = await call(c.mcp, "list_container_files", {"session_id": sid})
    assert [f["path"] for f in listed["files"]] == ["n.txt"]
    async with client(b.mcp) as cl:
        got = await cl.call_tool("download_file", {"file": "n.txt", "session_id": sid})
    assert structured(got)["inline"] is True and "one" in str(got.content), got


async def test_a_2026_request_is_passed_to_the_home_as_it_came(cluster: list[Replica]) -> None:
    import json

    a, b, _c = cluster
    sid = (await call(a.mcp, "run_code", {"code": "w = 20"}))["session_id"]
    message = _modern("tools/call", {"name": "run_code", "arguments": {"code": "w + 1", "session_id": sid}})
    headers = {
        "authorization": f"Bearer {TOKENS[0]}",
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "run_code",
    }
    async with httpx2.AsyncClient(timeout=60) as h:
        r = await h.post(b.mcp, json=message, headers=headers)
        assert r.headers.get("x-ci-home") == a.url, r.headers  # b passed the bytes on; a answered
        lines = [ln[5:] for ln in r.text.splitlines() if ln.startswith("data:")] or [r.text]
        answer = json.loads(lines[-1])
        assert answer["result"]["structuredContent"]["result"] == "21", answer
        # Another token's request is passed on alike, and the home refuses it as its own.
        other = {**headers, "authorization": f"Bearer {TOKENS[1]}"}
        refused = await h.post(b.mcp, json=message, headers=other)
        assert "No session" in refused.text, refused.text
        # Without a valid token nothing is passed on: b's own authentication answers.
        bad = await h.post(b.mcp, json=message, headers={**headers, "authorization": "Bearer nope"})
        assert bad.status_code == 401 and "x-ci-home" not in bad.headers


async def test_sessions_through_haproxy_spread_over_the_replicas(cluster: list[Replica], haproxy_factory: Any) -> None:
    proxy = haproxy_factory([r.url.removeprefix("http://") for r in cluster])
    front = f"http://127.0.0.1:{proxy.port}/mcp"
    made = []
    async with client(front) as c:  # one client: haproxy deals its requests round robin, one by one
        for i in range(30):
            r = structured(await c.call_tool("run_code", {"code": f"v = {i}\nv"}))
            assert r["status"] == "ok", r
            made.append(r["session_id"])
    for sid in made[:6]:  # each through whichever replica haproxy picks: its home's, or forwarded there
        again = await call(front, "run_code", {"code": "v * 2", "session_id": sid})
        assert again["result"] == str(made.index(sid) * 2), again
    import psycopg

    with psycopg.connect(DATABASE["url"]) as db:
        rows = db.execute("SELECT session_id, replica FROM homes WHERE session_id = ANY(%s)", (made,)).fetchall()
    homes = dict(rows)
    assert len(homes) == 30 and set(homes.values()) == {r.url for r in cluster}, homes


async def test_forwarded_requests_must_be_signed(cluster: list[Replica]) -> None:
    a = cluster[0]
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"run_code","arguments":{"code":"1"}}}'
    async with httpx2.AsyncClient() as h:
        for value in ("1.deadbeef", signed_header("another secret", body), "garbage"):
            r = await h.post(
                a.mcp,
                content=body,
                headers={HEADER: value, "authorization": f"Bearer {TOKENS[0]}", "content-type": "application/json"},
            )
            assert r.status_code == 401 and "CLUSTER_SECRET" in r.text, (value, r.status_code, r.text)
        # The mode (a tool call of the forwarder's, or the client's request passed on as it came) is signed too.
        r = await h.post(
            a.mcp,
            content=body,
            headers={
                HEADER: signed_header("another secret", body, RAW),
                "x-ci-forward-mode": "raw",
                "authorization": f"Bearer {TOKENS[0]}",
                "content-type": "application/json",
            },
        )
        assert r.status_code == 401 and "CLUSTER_SECRET" in r.text, (r.status_code, r.text)
        # The replicas' own calls too: unsigned or signed with another secret, refused before anything runs.
        ask = b'{"owner": "o_none", "count": 5}'
        for headers in ({}, {HEADER: signed_header("another secret", ask)}):
            r = await h.post(a.url + "/cluster/stop-idle", content=ask, headers=headers)
            assert r.status_code == 401 and "CLUSTER_SECRET" in r.text, (headers, r.status_code, r.text)


async def test_one_tokens_session_is_invisible_to_another_on_every_replica(cluster: list[Replica]) -> None:
    mine = await call(cluster[0].mcp, "run_code", {"code": "secret = 42"})
    for r in cluster:
        async with client(r.mcp, TOKENS[1]) as c:
            out = await c.call_tool("run_code", {"code": "secret", "session_id": mine["session_id"]})
            assert out.is_error and "No session" in str(out.content), (r.url, out)


async def test_kill_9_of_the_home_while_idle_adopts_the_session(cluster: list[Replica]) -> None:
    a, b, _c = cluster
    first = await call(a.mcp, "run_code", {"code": "kept = 'variables'\nopen('/mnt/data/f.txt', 'w').write('files')"})
    sid = first["session_id"]
    await anyio.sleep(1.5)  # the snapshot is written after the result, then uploaded by the store's pass
    await kill_home(a)  # its lease runs out
    r = await call(b.mcp, "run_code", {"code": "print(kept)", "session_id": sid})
    assert r["status"] == "ok" and r["stdout"] == "variables\n", r
    assert r["container"]["state_restored"] is not None and "kept" in r["container"]["state_restored"]["restored"]
    async with client(b.mcp) as cl:
        got = await cl.call_tool("download_file", {"file": "f.txt", "session_id": sid})
    assert "files" in str(got.content), got


async def test_progress_get_run_and_cancel_run_go_through_any_replica(cluster: list[Replica]) -> None:
    a, b, c = cluster
    sid = (await call(a.mcp, "run_code", {"code": "n = 0"}))["session_id"]
    seen: list[tuple[float, float | None, str | None]] = []

    async def cb(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with client(b.mcp) as cl:  # forwarded to a; its progress relayed back
        r = await cl.call_tool(
            "run_code", {"code": "import time; time.sleep(2.6); 'done'", "session_id": sid}, progress_callback=cb
        )
    assert structured(r)["result"] == "'done'" and len(seen) >= 2, (structured(r), seen)
    started = await call(
        c.mcp, "run_code", {"code": "import time\nfor n in range(600): time.sleep(0.1)", "session_id": sid, "wait_s": 0}
    )
    assert started["status"] == "running", started
    running = await call(b.mcp, "get_run", {"run_id": started["run_id"], "wait_s": 0})
    assert running["status"] == "running", running
    stopped = await call(c.mcp, "cancel_run", {"run_id": started["run_id"]})
    assert stopped["status"] == "cancelled", stopped
    after = await call(b.mcp, "run_code", {"code": "n > 0", "session_id": sid})  # interrupted, variables kept
    assert after["result"] == "True", after


async def test_kill_9_of_the_home_during_a_run_loses_the_run_and_adopts_the_session(cluster: list[Replica]) -> None:
    a, b, _c = cluster
    sid = (await call(a.mcp, "run_code", {"code": "before = 'kept'"}))["session_id"]
    await anyio.sleep(1.5)  # its snapshot reaches the store
    started = await call(a.mcp, "run_code", {"code": "import time\ntime.sleep(600)", "session_id": sid, "wait_s": 0})
    assert started["status"] == "running", started
    await anyio.sleep(1.0)  # the run's start is in the registry
    await kill_home(a)  # its lease runs out
    r = await call(b.mcp, "run_code", {"code": "before", "session_id": sid})
    assert r["status"] == "ok" and r["result"] == "'kept'", r
    assert r["container"]["state_restored"] is not None
    lost = await call(b.mcp, "get_run", {"run_id": started["run_id"], "wait_s": 0})
    assert lost["status"] == "lost", lost


async def test_resources_read_works_from_every_replica(cluster: list[Replica]) -> None:
    a, b, c = cluster
    sid = (await call(a.mcp, "run_code", {"code": "1"}))["session_id"]
    async with client(b.mcp) as cl:  # b has read the session before its file exists
        await cl.call_tool("list_container_files", {"session_id": sid})
    made = await call(a.mcp, "run_code", {"code": "open('/mnt/data/r.txt', 'w').write('read me')", "session_id": sid})
    uri = made["files"][0]["uri"]
    for r in (b, c):
        async with client(r.mcp) as cl:
            got = await cl.read_resource(uri)
        assert "read me" in str(got.contents), (r.url, got)


async def test_a_client_stop_of_a_forwarded_call_stops_the_run_on_its_home(cluster: list[Replica]) -> None:
    a, b, _c = cluster
    sid = (await call(a.mcp, "run_code", {"code": "i = 0"}))["session_id"]
    loop = "import time\nfor i in range(1, 600): time.sleep(0.1)"
    async with client(b.mcp) as cl:  # forwarded to a; the client gives up after 2 s ("caller cancelled")
        with anyio.move_on_after(2.0) as scope:
            await cl.call_tool("run_code", {"code": loop, "session_id": sid})
    assert scope.cancelled_caught
    began = time.monotonic()
    after = await call(a.mcp, "run_code", {"code": "i", "session_id": sid, "wait_s": 20})
    assert after["status"] == "ok" and 0 < int(after["result"]) < 100, after  # stopped, not run to its end
    assert time.monotonic() - began < 10
    # A 2025-era client's own timeout says so in its cancel: the forwarder keeps the run, as its home would.
    headers = {"Authorization": f"Bearer {TOKENS[0]}"}
    legacy = Client(streamable_http_client(b.mcp, http_client=httpx2.AsyncClient(headers=headers)), mode="legacy")
    async with legacy as cl:
        with pytest.raises(Exception):  # noqa: B017 - the client's timeout
            await cl.call_tool(
                "run_code", {"code": "import time; time.sleep(4); 'kept'", "session_id": sid}, read_timeout_seconds=0.5
            )
    await anyio.sleep(1.5)  # past the verdict's wait for the cancel's reason
    probe = await call(a.mcp, "run_code", {"code": "'next'", "session_id": sid, "wait_s": 0})
    assert probe["status"] == "queued", probe  # the kept run still goes
    assert (await call(b.mcp, "get_run", {"run_id": probe["waits_for"], "wait_s": 20}))["result"] == "'kept'"


def _modern(tool_or_method: str, params: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
    }
    return {"jsonrpc": "2.0", "id": 1, "method": tool_or_method, "params": {**params, "_meta": meta}}


async def _post(url: str, message: dict[str, Any]) -> dict[str, Any]:
    """One 2026-07-28 request (no handshake), its answer from JSON or from the event stream."""
    import json

    headers = {
        "authorization": f"Bearer {TOKENS[0]}",
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": message["method"],
    }
    if message["method"] == "tools/call":
        headers["mcp-name"] = message["params"]["name"]
    async with httpx2.AsyncClient(timeout=60) as h:
        r = await h.post(url, json=message, headers=headers)
    if not r.headers.get("content-type", "").startswith("text/event-stream"):
        return json.loads(r.text)  # type: ignore[no-any-return]
    answers = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    return next(m for m in reversed(answers) if "result" in m or "error" in m)  # type: ignore[no-any-return]


async def test_mcp_tasks_work_from_every_replica(cluster: list[Replica]) -> None:
    a, b, c = cluster
    sid = (await call(a.mcp, "run_code", {"code": "n = 6"}))["session_id"]
    slow = "import time\ntime.sleep(2.5)\nn * 7"
    made = await _post(
        b.mcp, _modern("tools/call", {"name": "run_code", "arguments": {"code": slow, "session_id": sid}})
    )
    task = made["result"]
    assert task["resultType"] == "task" and task["status"] == "working", made  # forwarded, answered as a task
    task_id = task["taskId"]
    polled = (await _post(c.mcp, _modern("tasks/get", {"taskId": task_id})))["result"]
    assert polled["status"] == "working", polled
    deadline = time.monotonic() + 30
    while polled["status"] == "working" and time.monotonic() < deadline:
        await anyio.sleep(0.5)
        polled = (await _post(c.mcp, _modern("tasks/get", {"taskId": task_id})))["result"]
    assert polled["status"] == "completed", polled
    assert polled["result"]["structuredContent"]["result"] == "42", polled
    long = {"name": "run_code", "arguments": {"code": "import time\ntime.sleep(600)", "session_id": sid}}
    second = (await _post(c.mcp, _modern("tools/call", long)))["result"]
    assert second["status"] == "working", second
    acknowledged = await _post(b.mcp, _modern("tasks/cancel", {"taskId": second["taskId"]}))
    assert acknowledged["result"]["resultType"] == "complete", acknowledged
    after = (await _post(a.mcp, _modern("tasks/get", {"taskId": second["taskId"]})))["result"]
    assert after["status"] == "cancelled", after
    missing = await _post(b.mcp, _modern("tasks/get", {"taskId": "r_" + "0" * 32}))
    assert "error" in missing and "not found" in missing["error"]["message"], missing


def _owner_counts() -> dict[tuple[str, str], int]:
    import psycopg

    with psycopg.connect(DATABASE["url"]) as db:
        rows = db.execute("SELECT replica, owner, live FROM replica_owners").fetchall()
    return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}


@pytest.mark.replica_env({"CODE_INTERPRETER_MAX_LIVE_CONTAINERS_PER_OWNER": "2", "CODE_INTERPRETER_WARM_WORKERS": "0"})
async def test_the_per_owner_cap_holds_across_replicas(cluster: list[Replica]) -> None:
    a, b, c = cluster
    other = await call(a.mcp, "run_code", {"code": "z = 3"}, token=TOKENS[1])  # another owner: never counted
    first = await call(a.mcp, "run_code", {"code": "x = 1"})
    second = await call(b.mcp, "run_code", {"code": "y = 2"})
    await anyio.sleep(LEASE_S)  # a beat or two: each replica's counts are in the registry
    third = await call(c.mcp, "run_code", {"code": "w = 4\nw"})  # a third live worker: one elsewhere stops
    assert third["status"] == "ok" and third["result"] == "4", third
    await anyio.sleep(LEASE_S)
    rows = _owner_counts()
    key = next(o for (r, o) in rows if r == c.url)  # c has only this owner's worker
    counts = {r: n for (r, o), n in rows.items() if o == key}
    assert sum(counts.values()) == 2 and counts.get(c.url) == 1, rows
    stopped = a if counts.get(a.url, 0) == 0 else b
    sid, name = (first["session_id"], "x") if stopped is a else (second["session_id"], "y")
    back = await call(stopped.mcp, "run_code", {"code": name, "session_id": sid})
    assert back["status"] == "ok" and back["result"] in ("1", "2"), back  # its variables came back
    assert any("make room" in w and "counted over the replicas" in w for w in back["warnings"]), str(back["warnings"])
    assert (await call(a.mcp, "run_code", {"code": "z", "session_id": other["session_id"]}, token=TOKENS[1]))[
        "container"
    ]["state_lost"] is False
