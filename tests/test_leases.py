"""Sessions' homes among replicas (`REPLICA_URL`): leases in the shared registry, on both of its engines (SQLite for
the contract, a real PostgreSQL for the races and for whole engines sharing one registry and one store).

- a new session is held by the replica that made it; another replica is refused while the home beats;
- a home whose beats stopped is adopted with the epoch moved on, its runs in flight marked lost; a graceful stop
  frees its sessions at once;
- eight replicas racing to adopt one session: exactly one wins, the others name the winner;
- whole engines: a session moves to another replica when its home stops without letting go, with its files and
  variables (from the shared store); a former home whose session was adopted drops it without writing and refuses
  it afterwards.
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine
from code_interpreter_mcp.errors import SessionElsewhere
from code_interpreter_mcp.sessions import ADDED_COLUMNS, SCHEMA
from code_interpreter_mcp.storage.database import Database, PostgresDatabase, SqliteDatabase
from code_interpreter_mcp.storage.leases import Claim, HeldElsewhere, Leases
from tests.infra import (  # noqa: F401  # the fixtures, by name
    Postgres,
    backing_settings,
    pg_fixture,
    pg_session_fixture,
)

pytestmark = pytest.mark.anyio


def _open(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Database:
    if kind == "sqlite":
        return SqliteDatabase(tmp_path / "r.sqlite3", SCHEMA, ADDED_COLUMNS, lambda db, added: None)
    pg: Postgres = request.getfixturevalue("pg")
    return PostgresDatabase(pg.create_database("l_" + secrets.token_hex(6)), SCHEMA, ADDED_COLUMNS, lambda d, a: None)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    database = _open(request.param, tmp_path, request)
    yield database
    database.close()


def _age(db: Database, replica: str) -> None:
    """The replica's last beat long ago: what a crash looks like to the others."""
    db.transaction([("UPDATE replicas SET seen_at = 0 WHERE url = ?", (replica,))])


def test_owners_live_workers_are_counted_per_replica(db: Database) -> None:
    a, b, c = Leases(db, "http://a", 10), Leases(db, "http://b", 10), Leases(db, "http://c", 10)
    a.beat({"o_1": 2, "o_2": 1})
    b.beat({"o_1": 1, "o_3": 0})
    c.beat()  # no counts: only alive
    assert c.owners_elsewhere() == {"o_1": {"http://a": 2, "http://b": 1}, "o_2": {"http://a": 1}}
    assert a.owners_elsewhere() == {"o_1": {"http://b": 1}}
    a.beat({"o_2": 1})  # each beat replaces the replica's counts
    assert c.owners_elsewhere() == {"o_1": {"http://b": 1}, "o_2": {"http://a": 1}}
    _age(db, "http://b")  # a dead replica's workers count no more
    assert c.owners_elsewhere() == {"o_2": {"http://a": 1}}


def test_homes_are_held_adopted_and_freed(db: Database) -> None:
    a, b = Leases(db, "http://a", 10), Leases(db, "http://b", 10)
    a.beat()
    b.beat()
    assert a.claim("s_1") == Claim(1)
    assert a.claim("s_1") == Claim(1)  # ours already
    with pytest.raises(HeldElsewhere) as refused:
        b.claim("s_1")
    assert refused.value.home == "http://a"
    run = "INSERT INTO runs (id, session_id, status, started_at, pid) VALUES ('r_1', 's_1', 'running', 1, 1)"
    db.transaction([(run, ())])
    _age(db, "http://a")
    assert b.claim("s_1") == Claim(2, adopted_from="http://a")
    assert db.row("SELECT status FROM runs WHERE id = 'r_1'") == ("lost",)
    assert a.lost({"s_1": 1}) == ["s_1"] and b.lost({"s_1": 2}) == []
    a.beat()  # the former home is back: the session stays the adopter's
    with pytest.raises(HeldElsewhere):
        a.claim("s_1")
    b.release(["s_1"])
    assert a.claim("s_1") == Claim(3)  # freed by a graceful stop: taken at once, the epoch moved on
    assert b.lost({"s_1": 2}) == ["s_1"]


def test_exactly_one_of_eight_racing_replicas_adopts(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    pg: Postgres = request.getfixturevalue("pg")
    url = pg.create_database("race_" + secrets.token_hex(6))
    dbs = [PostgresDatabase(url, SCHEMA, ADDED_COLUMNS, lambda d, a: None) for _ in range(8)]
    try:
        dead = Leases(dbs[0], "http://dead", 10)
        dead.beat()
        dead.claim("s_race")
        _age(dbs[0], "http://dead")
        racers = [Leases(d, f"http://r{i}", 10) for i, d in enumerate(dbs)]
        for r in racers:
            r.beat()
        start = threading.Barrier(len(racers))
        outcomes: dict[str, Claim | str] = {}

        def race(r: Leases) -> None:
            start.wait()
            try:
                outcomes[r.replica] = r.claim("s_race")
            except HeldElsewhere as exc:
                outcomes[r.replica] = exc.home

        threads = [threading.Thread(target=race, args=(r,)) for r in racers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [name for name, got in outcomes.items() if isinstance(got, Claim)]
        assert len(outcomes) == 8 and len(winners) == 1, outcomes
        assert outcomes[winners[0]] == Claim(2, adopted_from="http://dead")
        assert all(got == winners[0] for name, got in outcomes.items() if name != winners[0])
        assert racers[0].home_of("s_race") == (winners[0], 2)
    finally:
        for d in dbs:
            d.close()


# ---- whole engines sharing a registry and a store --------------------------------------------------------------


@pytest.fixture(params=["postgresql+folder"])
def shared(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return backing_settings(request, tmp_path, monkeypatch)


def _settings(data: Path, shared: dict[str, Any], replica: str) -> Settings:
    return Settings(data_dir=data, default_timeout_s=60, replica_url=replica, lease_s=2, **shared)


async def _snapshot_stored(eng: Engine, sid: str, within: float = 30.0) -> None:
    mirror = eng.ctx.mirror
    assert mirror is not None
    deadline = time.monotonic() + within
    while not any(k.endswith("/manifest.json") for k in mirror.store.list(f"o_none/snapshots/{sid}/")):
        assert time.monotonic() < deadline, "no snapshot reached the store"
        await anyio.sleep(0.1)


async def test_a_session_is_adopted_when_its_home_dies(tmp_path: Path, shared: dict[str, Any]) -> None:
    a = Engine(_settings(tmp_path / "a", shared, "http://a"))
    b = Engine(_settings(tmp_path / "b", shared, "http://b"))
    async with a.running(), b.running():
        await a.ready()
        await b.ready()
        s = await a.session_for(None)
        out = await a.run_code(s, "x = 41\nopen('/mnt/data/kept.txt', 'w').write('made on a')")
        assert out.result.status == "ok", out.result
        await _snapshot_stored(a, s.id)
        with pytest.raises(SessionElsewhere, match="http://a"):
            await b.session_for(s.id)  # its home beats: not taken
        # a dies as kill -9 would leave it: no release, no more beats.
        homes = a.ctx.homes
        assert homes is not None
        homes.held.clear()
        a.ctx.homes = None  # its beats stop
        await anyio.sleep(1.0)  # a beat already under way lands before the ageing below
        _age(a.reg.database, "http://a")
        adopted = await b.session_for(s.id)
        again = await b.run_code(adopted, "print(x + 1)")
        assert again.result.status == "ok", again.result
        assert again.result.stdout == "42\n", again.result
        restored = again.result.container.state_restored
        assert restored is not None and "x" in restored.restored
        kept = next(f for f in adopted.latest_files() if f.path == "kept.txt")
        assert (await b.download(adopted, kept.file_id)).data == b"made on a"
        a.ctx.homes = homes  # it comes back: its beat finds the session gone and drops it, writing nothing
        homes.held[s.id] = 1
        await homes.beat()
        assert s.id not in homes.held and s.id not in a.reg.sessions
        with pytest.raises(SessionElsewhere, match="http://b"):
            await a.session_for(s.id)


async def test_a_graceful_stop_frees_its_sessions_at_once(tmp_path: Path, shared: dict[str, Any]) -> None:
    a = Engine(_settings(tmp_path / "a", shared, "http://a"))
    async with a.running():
        await a.ready()
        s = await a.session_for(None)
        assert (await a.run_code(s, "y = 5")).result.status == "ok"
        await _snapshot_stored(a, s.id)
    b = Engine(_settings(tmp_path / "b", shared, "http://b"))
    async with b.running():
        await b.ready()
        moved = await b.session_for(s.id)  # no lease to wait out
        got = await b.run_code(moved, "y * 2")
        assert got.result.status == "ok" and got.result.result == "10", got.result


def test_replicas_need_a_shared_registry() -> None:
    with pytest.raises(ValueError, match="DATABASE_URL"):
        Settings(replica_url="http://a")
