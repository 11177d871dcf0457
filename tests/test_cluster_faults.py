"""Faults of the shared components under three real replicas (separate server processes, as in test_cluster.py),
talked to by the real MCP client over HTTP:

- PostgreSQL stopped (fast mode) and started again while a steady stream of run_code calls goes through every
  replica, on existing sessions (some forwarded) and on new ones: every failed call is a clear, retryable tool
  error (no traceback), no replica dies, calls succeed again on every replica within seconds of the database's
  return, the sessions keep their variables, and each session has exactly one home;
- the S3 gateway (SeaweedFS) stopped during a harvest on a cluster: the run succeeds with a warning, the files reach
  the store once the gateway is back (the mirror's background pass), byte for byte, and another replica serves them;
- two replicas racing to adopt one session after its home is killed (kill -9): exactly one adopts, the other's call
  is forwarded to it, variables intact, one home; and calls racing on the one replica that adopts a session
  share one container (restored once);
- a home paused while the database was away, whose session another replica took over meanwhile, writes nothing of
  that session when it wakes (its old container is not recorded as running again).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import os
import re
import secrets
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from mcp.shared.exceptions import MCPError
from mcp.types import BlobResourceContents, CallToolResult, EmbeddedResource

from code_interpreter_mcp.storage.objects import ObjectStore, open_store
from tests.helpers import structured, text_of
from tests.infra import (  # noqa: F401  # the fixtures, by name
    Postgres,
    SeaweedS3,
    pg_fixture,
    pg_session_fixture,
    s3_fixture,
    s3_session_fixture,
)
from tests.test_cluster import LEASE_S, Replica, call, client, kill_home, replica, shared_env
from tests.test_e2e_http import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RETRYABLE = re.compile(r"\[(registry_unavailable|session_elsewhere|store_unavailable)\] ")
"""What a failed call during an outage must carry: one of the retryable codes of errors.py (not internal_error)."""
RECOVERY_S = 20.0


@dataclass
class Cluster:
    replicas: list[Replica]
    database_url: str
    logs: list[Path]

    def log_tails(self, chars: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in self.logs if p.exists())


def _start(tmp_path: Path, shared: dict[str, str]) -> Iterator[Cluster]:
    with ExitStack() as stack:
        replicas = [stack.enter_context(replica(tmp_path / f"r{i}", free_port(), shared)) for i in range(3)]
        yield Cluster(replicas, shared["DATABASE_URL"], [tmp_path / f"r{i}.log" for i in range(3)])


@pytest.fixture
def pg_cluster(tmp_path: Path, pg: Postgres) -> Iterator[Cluster]:
    """Three replicas on a new PostgreSQL database and a folder store; PostgreSQL running again at the end."""
    try:
        yield from _start(tmp_path, shared_env(tmp_path, pg))
    finally:
        pg.ensure_running()


@pytest.fixture
def s3_cluster(tmp_path: Path, pg: Postgres, s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """Three replicas on a new PostgreSQL database and a new prefix of the S3 gateway's bucket (the AWS_* variables
    set here too, for the test's own look at the store); the gateway running again at the end."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    shared = {
        **s3.env(),
        "DATABASE_URL": pg.create_database("f_" + secrets.token_hex(6)),
        "STORE_URL": f"s3://{s3.bucket}/f_{secrets.token_hex(6)}",
        "CLUSTER_SECRET": secrets.token_hex(32),
    }
    monkeypatch.setenv("CI_TEST_STORE_URL", shared["STORE_URL"])
    try:
        yield from _start(tmp_path, shared)
    finally:
        s3.ensure_running()


# ---- calls that may fail ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    began: float  # monotonic
    ended: float
    url: str
    session: str | None  # the session asked for (None: a new one)
    ok: bool
    text: str  # the error's text when not ok
    result: dict[str, Any] | None = None
    transport: bool = False  # nothing MCP answered (a refused connection, a dropped stream, a timeout)


async def attempt(url: str, tool: str, args: dict[str, Any], timeout: float = 60.0) -> Outcome:
    """One call on a fresh client; a tool error, an MCP error or a transport failure is an Outcome, not raised."""
    began = time.monotonic()
    sid = args.get("session_id")

    def done(ok: bool, text: str, result: dict[str, Any] | None = None, transport: bool = False) -> Outcome:
        return Outcome(began, time.monotonic(), url, sid, ok, text, result, transport)

    try:
        with anyio.fail_after(timeout):
            async with client(url) as c:
                r = await c.call_tool(tool, args)
    except MCPError as exc:
        return done(False, f"MCPError {exc.error.code}: {exc.error.message}")
    except Exception as exc:
        return done(False, f"{type(exc).__name__}: {exc!r}", transport=True)
    if r.is_error:
        return done(False, text_of(r), r.structured_content)
    return done(True, "", structured(r))


def unclear(o: Outcome) -> str | None:
    """Why a failed call's text is not a clear, retryable error (None: it is)."""
    if o.transport:
        return "no MCP answer at all"
    if "Traceback" in o.text or 'File "' in o.text:
        return "a traceback reached the client"
    if not RETRYABLE.search(o.text):
        return "not one of the retryable error codes"
    if "try again" not in o.text.lower():
        return "does not say to try again"
    return None


def _homes(database_url: str, sessions: list[str]) -> list[tuple[str, str, int]]:
    with psycopg.connect(database_url) as db:
        rows = db.execute(
            "SELECT session_id, replica, epoch FROM homes WHERE session_id = ANY(%s) ORDER BY session_id", (sessions,)
        ).fetchall()
    return [(str(s), str(r), int(e)) for s, r, e in rows]


def _runs(database_url: str, run_ids: list[str]) -> dict[str, str]:
    with psycopg.connect(database_url) as db:
        rows = db.execute("SELECT id, status FROM runs WHERE id = ANY(%s)", (run_ids,)).fetchall()
    return {str(i): str(s) for i, s in rows}


def _alive(cluster: Cluster) -> None:
    dead = [(r.url, r.proc.returncode) for r in cluster.replicas if r.proc.poll() is not None]
    assert not dead, f"replicas died: {dead}\n{cluster.log_tails()}"


# ---- 1. PostgreSQL restarted during load -------------------------------------------------------------------------


async def test_postgresql_restarted_during_load_gives_retryable_errors_and_recovers(
    pg_cluster: Cluster, pg: Postgres
) -> None:
    reps = pg_cluster.replicas
    n = len(reps)
    tokens: dict[int, str] = {}
    sessions: list[str] = []
    for k, r in enumerate(reps):  # one session made on each replica, then used through the next one (forwarded)
        tokens[k] = secrets.token_hex(4)
        made = await call(r.mcp, "run_code", {"code": f"before = {tokens[k]!r}\nseen = []"})
        sessions.append(made["session_id"])
        used = await call(reps[(k + 1) % n].mcp, "run_code", {"code": "before", "session_id": sessions[k]})
        assert used["status"] == "ok" and used["result"] == repr(tokens[k]), used
    await anyio.sleep(1.5)  # their snapshots reach the store

    outcomes: list[Outcome] = []
    made_during: list[str] = []
    stop = anyio.Event()

    async def on_session(k: int) -> None:
        i = 0
        while not stop.is_set():
            tag = k * 100_000 + i
            o = await attempt(
                reps[(k + i) % n].mcp,
                "run_code",
                {"code": f"seen.append({tag})\nlen(seen)", "session_id": sessions[k]},
            )
            if o.result is not None:
                o.result["tag"] = tag
            outcomes.append(o)
            i += 1
            await anyio.sleep(0.2)

    async def new_sessions() -> None:
        i = 0
        while not stop.is_set():
            o = await attempt(reps[i % n].mcp, "run_code", {"code": "6 * 7"})
            outcomes.append(o)
            if o.ok and o.result is not None:
                made_during.append(o.result["session_id"])
            i += 1
            await anyio.sleep(0.3)

    probes: dict[tuple[str, str | None], Outcome] = {}
    async with anyio.create_task_group() as tg:
        for k in range(n):
            tg.start_soon(on_session, k)
        tg.start_soon(new_sessions)
        await anyio.sleep(2.0)  # warm traffic first
        down = time.monotonic()
        await anyio.to_thread.run_sync(pg.stop)
        try:
            await anyio.sleep(3 * LEASE_S)  # longer than a lease: every replica's beats are late
        finally:
            await anyio.to_thread.run_sync(pg.start)
        up = time.monotonic()
        # Every replica serves every existing session (its home's, or forwarded there) and makes new ones again.
        pending: set[tuple[str, str | None]] = {(r.mcp, s) for r in reps for s in [*sessions, None]}
        while pending and time.monotonic() < up + RECOVERY_S:
            for url, sid in sorted(pending, key=str):
                args: dict[str, Any] = {"code": "6 * 7"} if sid is None else {"code": "before", "session_id": sid}
                o = await attempt(url, "run_code", args)
                outcomes.append(o)
                if o.ok:
                    probes[(url, sid)] = o
                    pending.discard((url, sid))
            await anyio.sleep(0.3)
        recovered = time.monotonic()
        stop.set()

    _alive(pg_cluster)
    assert not pending, (
        f"not served {RECOVERY_S:.0f}s after PostgreSQL came back: {sorted(pending, key=str)}; last failures: "
        f"{[o.text for o in outcomes if not o.ok][-6:]}\n{pg_cluster.log_tails()}"
    )
    failed = [o for o in outcomes if not o.ok]
    bad = [(why, o.url, o.session, o.text[:900]) for o in failed if (why := unclear(o)) is not None]
    assert not bad, f"unclear failures: {bad}\n{pg_cluster.log_tails()}"
    during = [o for o in failed if o.began < up and o.ended > down]
    assert any("[registry_unavailable]" in o.text for o in during), (
        "no call failed while PostgreSQL was down",
        [(o.ok, o.text[:200]) for o in outcomes if o.ended > down and o.began < up],
    )
    print(
        f"\n{len(outcomes)} calls, {len(failed)} failed ({len(during)} during the outage);"
        f" recovered {recovered - up:.1f}s after PostgreSQL was back"
    )

    # Variables: each session's, set before the outage, are there through every replica; where a session was
    # adopted (its lease ran out while the database was away), the adopting run said so (state_restored).
    for (url, sid), o in probes.items():
        assert o.result is not None
        if sid is not None:
            assert o.result["result"] == repr(tokens[sessions.index(sid)]), (url, o.result)
    homes_before = {s: (r, e) for s, r, e in _homes(pg_cluster.database_url, sessions)}
    for k, sid in enumerate(sessions):
        ok_calls = [o for o in outcomes if o.ok and o.session == sid and o.result is not None]
        restored = [o for o in ok_calls if o.result and o.result["container"].get("state_restored")]
        epoch = homes_before[sid][1]
        print(f"session {k}: home {homes_before[sid]}, {len(ok_calls)} ok, restored by {[o.url for o in restored]}")
        # The epoch grows at each change of home, and each new home starts one container, restored from the
        # session's snapshot: restored once per change (more would be two containers of one session).
        assert len(restored) == epoch - 1, (sid, epoch, [(o.url, o.result) for o in restored])
        for o in restored:
            assert o.result is not None and "before" in o.result["container"]["state_restored"]["restored"], o.result
        final = await call(reps[k].mcp, "run_code", {"code": "sorted(seen)", "session_id": sid})
        assert final["container"]["state_restored"] is None, final
        seen = set(ast.literal_eval(final["result"]))  # a list of ints, repr()'d
        since = max((o.ended for o in restored), default=0.0)  # one container since then: every run left its mark
        tags = {o.result["tag"] for o in ok_calls if o.began > since and o.result is not None and "tag" in o.result}
        calls = [
            (o.result["tag"], o.url, o.result["container_id"], round(o.began - down, 2), round(o.ended - down, 2))
            for o in ok_calls
            if o.result is not None and "tag" in o.result
        ]
        assert tags <= seen, (sid, sorted(tags - seen), final["container_id"], calls)

    # One home per session, which stays put now: runs through A, B, C, A in turn see one namespace (two homes, or
    # two containers, would each count on their own).
    for sid in sessions:
        counts = []
        for r in [*reps, reps[0]]:
            got = await call(r.mcp, "run_code", {"code": "k = globals().get('k', 0) + 1\nk", "session_id": sid})
            counts.append(got["result"])
        assert counts == ["1", "2", "3", "4"], (sid, counts)
    assert {s: (r, e) for s, r, e in _homes(pg_cluster.database_url, sessions)} == homes_before
    with psycopg.connect(pg_cluster.database_url) as db:
        live = db.execute(
            "SELECT session_id, count(*) FROM containers WHERE status = 'running' AND session_id = ANY(%s) "
            "GROUP BY session_id HAVING count(*) > 1",
            (sessions,),
        ).fetchall()
        rows_of = {
            str(s): db.execute(
                "SELECT id, status FROM containers WHERE session_id = %s ORDER BY created_at", (s,)
            ).fetchall()
            for s, _ in live
        }
    used = {
        (o.session, o.result["container_id"], o.url, bool(o.result["container"].get("state_restored")))
        for o in outcomes
        if o.ok and o.result is not None and o.session in rows_of
    }
    assert not live, f"sessions with more than one live container in the registry: {rows_of}; used: {sorted(used)}"
    everyone = sessions + made_during
    rows = _homes(pg_cluster.database_url, everyone)
    assert sorted(s for s, _, _ in rows) == sorted(everyone), "a session without a home row"
    assert {r for _, r, _ in rows} <= {r.url for r in reps}, rows

    # The registry caught up with the runs that ended while it was away: none lost, none left running.
    ok_runs = [o.result["run_id"] for o in outcomes if o.ok and o.result is not None and o.result.get("run_id")]
    deadline = time.monotonic() + 10
    while True:
        statuses = _runs(pg_cluster.database_url, ok_runs)
        missing = {r: statuses.get(r) for r in ok_runs if statuses.get(r) != "ok"}
        if not missing or time.monotonic() > deadline:
            break
        await anyio.sleep(0.5)
    assert not missing, f"{len(missing)} of {len(ok_runs)} runs that returned ok are not so in the registry: {missing}"
    _alive(pg_cluster)


# ---- 2. the S3 gateway stopped during a harvest --------------------------------------------------------------


def _store() -> ObjectStore:
    made = open_store(os.environ["CI_TEST_STORE_URL"])
    assert made is not None
    return made


def _blob_key(objects: ObjectStore, sha: str) -> str | None:
    return next((k for k in objects.list("") if k.endswith(f"/blobs/{sha[:2]}/{sha[2:]}")), None)


def _downloaded(r: CallToolResult) -> bytes:
    blobs = [
        c.resource.blob
        for c in r.content
        if isinstance(c, EmbeddedResource) and isinstance(c.resource, BlobResourceContents)
    ]
    assert blobs, r
    return base64.b64decode(blobs[0])


async def test_the_s3_gateway_stopped_during_a_harvest_loses_nothing(s3_cluster: Cluster, s3: SeaweedS3) -> None:
    a, b, c = s3_cluster.replicas
    sid = (await call(a.mcp, "run_code", {"code": "x = 'here'"}))["session_id"]
    await anyio.sleep(1.0)
    payload = hashlib.sha256(b"seed").digest() * 1024  # 32 KB of fixed bytes
    code = (
        "import hashlib\n"
        "data = hashlib.sha256(b'seed').digest() * 1024\n"
        "open('/mnt/data/kept.bin', 'wb').write(data)\n"
        "open('/mnt/data/note.txt', 'w').write('written while the store was down')\n"
        "len(data)"
    )
    await anyio.to_thread.run_sync(s3.stop)
    try:
        began = time.monotonic()
        o = await attempt(a.mcp, "run_code", {"code": code, "session_id": sid}, timeout=60)
        took = time.monotonic() - began
        assert o.ok and o.result is not None, (o.text, s3_cluster.log_tails())
        r = o.result
        assert r["status"] == "ok" and r["result"] == str(len(payload)), r
        assert any("kept on this server only for now" in w for w in r["warnings"]), r["warnings"]
        files = {f["path"]: f for f in r["files"]}
        assert set(files) == {"kept.bin", "note.txt"}, files
        assert took < 30, f"the harvest waited {took:.1f}s for a store that does not answer"
        kept = files["kept.bin"]
        assert kept["sha256"] == hashlib.sha256(payload).hexdigest()
        # Meanwhile another replica serves it (forwarded to its home, which has the only copy).
        async with client(b.mcp) as cl:
            got = await cl.call_tool("download_file", {"file": "kept.bin", "session_id": sid})
        assert not got.is_error and _downloaded(got) == payload, got
    finally:
        await anyio.to_thread.run_sync(s3.ensure_running)
    back = time.monotonic()
    objects = _store()
    key = None
    while key is None or objects.size(key) != len(payload):
        assert time.monotonic() < back + 30, f"not in the store 30s after it came back\n{s3_cluster.log_tails()}"
        await anyio.sleep(0.5)
        key = await anyio.to_thread.run_sync(_blob_key, objects, kept["sha256"])
    print(f"\nin the store {time.monotonic() - back:.1f}s after the gateway was back")
    assert key is not None
    copy = Path(os.environ.get("TMPDIR", "/tmp")) / f"ci-store-{secrets.token_hex(4)}"
    try:
        assert await anyio.to_thread.run_sync(objects.get_file, key, str(copy))
        assert copy.read_bytes() == payload
    finally:
        copy.unlink(missing_ok=True)
    async with client(b.mcp) as cl:
        got = await cl.call_tool("download_file", {"file": "kept.bin", "session_id": sid})
    assert not got.is_error and _downloaded(got) == payload, got
    # The home dies: the next replica adopts the session and streams the bytes from the store.
    await kill_home(a)  # its lease runs out
    async with client(c.mcp) as cl:
        got = await cl.call_tool("download_file", {"file": "kept.bin", "session_id": sid})
        note = await cl.call_tool("download_file", {"file": "note.txt", "session_id": sid})
    assert not got.is_error and _downloaded(got) == payload, got
    assert "written while the store was down" in str(note.content), note
    again = await call(b.mcp, "run_code", {"code": "x", "session_id": sid})
    assert again["result"] == "'here'", again


# ---- 3. two replicas racing to adopt one session -------------------------------------------------------------


async def test_two_replicas_racing_to_adopt_a_session_one_wins_the_other_forwards(pg_cluster: Cluster) -> None:
    a, b, c = pg_cluster.replicas
    sid = (await call(a.mcp, "run_code", {"code": "kept = 'variables'"}))["session_id"]
    await anyio.sleep(1.5)  # its snapshot reaches the store
    await kill_home(a)  # its lease runs out
    got: dict[str, Outcome] = {}
    ready = anyio.Event()

    async def one(r: Replica) -> None:
        async with client(r.mcp) as cl:  # connected first, so that both calls leave together
            await ready.wait()
            began = time.monotonic()
            out = await cl.call_tool("run_code", {"code": "print(kept)", "session_id": sid})
        text = "" if not out.is_error else text_of(out)
        got[r.url] = Outcome(began, time.monotonic(), r.url, sid, not out.is_error, text, out.structured_content)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, b)
        tg.start_soon(one, c)
        await anyio.sleep(1.0)
        ready.set()
    for o in got.values():
        assert o.ok and o.result is not None, (o.url, o.text, pg_cluster.log_tails())
        assert o.result["status"] == "ok" and o.result["stdout"] == "variables\n", o.result
    restored = [o.url for o in got.values() if o.result and o.result["container"]["state_restored"] is not None]
    assert len(restored) == 1, got  # one new worker, loaded once: by whichever of the two calls ran first there
    # Both calls were served by the one container of the winner (the loser's call forwarded to it).
    assert len({o.result["container"]["id"] for o in got.values() if o.result}) == 1, got
    rows = _homes(pg_cluster.database_url, [sid])
    assert len(rows) == 1 and rows[0][1] in (b.url, c.url), rows
    assert rows[0][2] == 2, rows  # adopted once
    for r in (b, c):
        again = await call(r.mcp, "run_code", {"code": "kept", "session_id": sid})
        assert again["result"] == "'variables'" and again["container"]["state_restored"] is None, again


async def test_calls_racing_on_the_replica_that_adopts_a_session_share_one_container(pg_cluster: Cluster) -> None:
    a, b, _c = pg_cluster.replicas
    sid = (await call(a.mcp, "run_code", {"code": "kept = 'variables'"}))["session_id"]
    await anyio.sleep(1.5)  # its snapshot reaches the store
    await kill_home(a)  # its lease runs out
    got: dict[str, Outcome] = {}

    async def one(name: str) -> None:
        got[name] = await attempt(b.mcp, "run_code", {"code": f"{name} = kept\n{name}", "session_id": sid})

    async with anyio.create_task_group() as tg:  # three calls at once through b: the first adopts
        for name in ("x1", "x2", "x3"):
            tg.start_soon(one, name)
    for name, o in got.items():
        assert o.ok and o.result is not None and o.result["result"] == "'variables'", (name, o.text, o.result)
    containers = {o.result["container_id"] for o in got.values() if o.result is not None}
    restored = [n for n, o in got.items() if o.result and o.result["container"]["state_restored"] is not None]
    with psycopg.connect(pg_cluster.database_url) as db:
        live = db.execute("SELECT id FROM containers WHERE session_id = %s AND status = 'running'", (sid,)).fetchall()
    assert len(containers) == 1 and len(restored) == 1 and len(live) == 1, (containers, restored, live)
    final = await call(b.mcp, "run_code", {"code": "sorted(n for n in globals() if n[:1] == 'x')", "session_id": sid})
    assert final["result"] == "['x1', 'x2', 'x3']", final


async def test_a_home_that_lost_its_session_while_the_database_was_away_writes_nothing_of_it(
    pg_cluster: Cluster, pg: Postgres
) -> None:
    a, b, _c = pg_cluster.replicas
    first = await call(a.mcp, "run_code", {"code": "kept = 1"})
    sid, old = first["session_id"], first["container_id"]
    await anyio.sleep(1.0)
    await anyio.to_thread.run_sync(pg.stop)
    try:
        during = await attempt(a.mcp, "run_code", {"code": "kept += 1", "session_id": sid})  # warm: no database
        assert during.ok, during.text  # its container's row waits in a for the database
        await anyio.sleep(1.0)  # its snapshot reaches the store
        a.proc.send_signal(signal.SIGSTOP)  # a paused home: b takes the session over once the database is back
        await anyio.sleep(LEASE_S + 0.5)
    finally:
        await anyio.to_thread.run_sync(pg.start)
    try:
        moved = await call(b.mcp, "run_code", {"code": "kept", "session_id": sid})
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert moved["result"] == "2" and moved["container"]["state_restored"] is not None, moved
    new = moved["container_id"]
    assert _homes(pg_cluster.database_url, [sid]) == [(sid, b.url, 2)]
    with psycopg.connect(pg_cluster.database_url, autocommit=True) as db:
        for _ in range(16):  # a, awake, writes what waited for the database within this, and drops the session
            await anyio.sleep(0.5)
            rows = db.execute("SELECT id, status FROM containers WHERE session_id = %s", (sid,)).fetchall()
            running = sorted(str(i) for i, s in rows if s == "running")
            assert running == [new], (f"old {old} (a), new {new} (b)", rows)
    again = await call(a.mcp, "run_code", {"code": "kept", "session_id": sid})  # forwarded to b
    assert again["container_id"] == new and again["result"] == "2", again
