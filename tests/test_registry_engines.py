"""The registry on both of its engines, SQLite (the default) and PostgreSQL (`DATABASE_URL`, a real server started
by tests/infra.py): the same tests, parametrised. Sessions, containers, file records and finished runs persist
and come back after a restart; owners stay apart; the schema is created, and the columns of later releases added,
by the server at start, also by two starting at once; timestamps and sizes keep their precision."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from code_interpreter_mcp.backends.base import ContainerState
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine
from code_interpreter_mcp.errors import SessionNotFound
from code_interpreter_mcp.records import FileRecord
from code_interpreter_mcp.sessions import ADDED_COLUMNS, SCHEMA, Registry, open_database
from code_interpreter_mcp.storage.database import PostgresDatabase, postgres_ddl
from tests.infra import Postgres, pg_fixture, pg_session_fixture  # noqa: F401  # the fixtures, by name

pytestmark = pytest.mark.anyio
Make = Callable[[Path], Settings]


@pytest.fixture(params=["sqlite", "postgresql"])
def make_settings(request: pytest.FixtureRequest) -> Make:
    """Settings for one data folder, with the registry on the engine of this parameter (one new database)."""
    if request.param == "sqlite":
        return lambda data: Settings(data_dir=data)
    pg: Postgres = request.getfixturevalue("pg")
    url = pg.create_database("t_" + secrets.token_hex(6))
    return lambda data: Settings(data_dir=data, database_url=url)


def _record(session_id: str, **overrides: object) -> FileRecord:
    fields: dict[str, object] = {
        "file_id": "f_1",
        "session_id": session_id,
        "container_id": "lc_1",
        "path": "a.txt",
        "name": "a.txt",
        "bytes": 3,
        "mime_type": "text/plain",
        "sha256": "x",
        "source": "generated",
        "created_at": 3.0,
        "local_path": None,
        "remote_id": None,
        "version": "v1",
    }
    fields.update(overrides)
    return FileRecord(**fields)  # type: ignore[arg-type]


async def test_records_persist_and_owners_stay_apart(tmp_path: Path, make_settings: Make) -> None:
    settings = make_settings(tmp_path / "d")
    reg = Registry(open_database(settings))
    s = await reg.create_session(owner="alice")
    created = 1_765_000_000.123456  # a timestamp's microseconds survive (PostgreSQL REAL would lose them)
    state = ContainerState(id="lc_1", backend="local", created_at=created, last_active_at=2.0, expires_after_s=60)
    await reg.add_container(s, state)
    await reg.add_container(s, state)  # the upsert: written again, not refused
    await reg.add_files(s, [_record(s.id, bytes=5 * 1024**3)])  # 5 GiB: past 32 bits
    await reg.save_packages(s, ["alpha==1"])
    reg.close()

    again = Registry(open_database(settings))
    loaded = await again.get_session(s.id, "alice")
    assert loaded.current_container == "lc_1" and loaded.packages == ["alpha==1"]
    assert loaded.files[0].path == "a.txt" and loaded.files[0].bytes == 5 * 1024**3
    assert again.containers["lc_1"].state.created_at == created and again.containers["lc_1"].verified is False
    with pytest.raises(SessionNotFound):
        await again.get_session(s.id, "mallory")
    await again.close_session(loaded)
    again.close()
    third = Registry(open_database(settings))
    with pytest.raises(SessionNotFound):
        await third.get_session(s.id, "alice")
    assert third.stored_copies_sync() == ([], 0)
    third.close()


async def test_sessions_files_and_runs_come_back_after_a_restart(tmp_path: Path, make_settings: Make) -> None:
    settings = make_settings(tmp_path / "d")
    async with Engine(settings).running() as first:
        session = await first.session_for(None, owner=None)
        out = await first.run_code(session, "open('kept.txt', 'w').write('kept')\nx = 41\nx + 1")
        assert out.result.status == "ok" and out.result.result == "42"
        run = await first.runs.start(session, "print('from a run')", wait_s=30)
        run_id = run.result.run_id
        assert run_id is not None
    async with Engine(settings).running() as second:
        session = await second.session_for(session.id, owner=None)
        listed = await second.list_files(session)
        assert [f.path for f in listed.files] == ["kept.txt"]
        got = await second.get_run(run_id, None, session.id, 0)
        assert got.result.status == "ok" and got.result.stdout == "from a run\n"


async def test_the_schema_is_made_and_migrated_by_the_server(pg: Postgres) -> None:
    url = pg.create_database("t_" + secrets.token_hex(6))
    # A database of the first release: its tables without the columns added since.
    older = SCHEMA
    pg.psql(postgres_ddl(older), dbname=url.rsplit("/", 1)[1])
    reg = Registry(PostgresDatabase(url, SCHEMA, ADDED_COLUMNS, lambda db, added: None))
    s = await reg.create_session(owner=None)
    await reg.save_env(s, {"A": "1"})  # a column added after the first release
    reg.close()
    # Two servers starting at once on a fresh database: the advisory lock orders them, both come up.
    fresh = pg.create_database("t_" + secrets.token_hex(6))
    errors: list[BaseException] = []

    def start() -> None:
        try:
            Registry(PostgresDatabase(fresh, SCHEMA, ADDED_COLUMNS, lambda db, added: None)).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_settings_take_database_url_from_the_environment(tmp_path: Path) -> None:
    from code_interpreter_mcp.config import load_settings

    settings = load_settings(environ={"DATABASE_URL": "postgresql://u:secret@db.example/ci"})
    assert settings.database_url == "postgresql://u:secret@db.example/ci"
    assert "secret" not in str(settings.public_view()["database_url"])
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, database_url="mysql://x")


async def test_a_database_that_goes_away_gives_retryable_errors_and_comes_back(tmp_path: Path, pg: Postgres) -> None:
    import time

    from code_interpreter_mcp.errors import RegistryUnavailable

    url = pg.create_database("t_" + secrets.token_hex(6))
    async with Engine(Settings(data_dir=tmp_path / "d", database_url=url)).running() as engine:
        session = await engine.session_for(None, owner=None)
        await engine.run_code(session, "1")  # its container is recorded
        pg.stop()
        try:
            began = time.monotonic()
            with pytest.raises(RegistryUnavailable) as caught:
                await engine.session_for(None, owner=None)  # a new session is written at once
            assert "try again" in caught.value.hint and time.monotonic() - began < 15
            # A run on the live session goes on; its row waits for the database, it is not dropped.
            run = await engine.runs.start(session, "print('while away')", wait_s=30)
            assert run.result.status == "ok" and run.result.stdout == "while away\n"
            with pytest.raises(RegistryUnavailable):
                await engine.reg.flush()
        finally:
            pg.start()
        again = await engine.session_for(None, owner=None)  # back by itself, on a fresh connection
        await engine.reg.flush()
        assert again.id != session.id
        row = await engine.reg.load_run(run.result.run_id or "")
        assert row is not None and row.status == "ok"


def test_the_pool_comes_back_within_seconds_of_a_long_outage(pg: Postgres) -> None:
    """psycopg_pool's own retry delay doubles without bound; the registry does not wait it out."""
    import time

    from code_interpreter_mcp.errors import RegistryUnavailable

    db = PostgresDatabase(pg.create_database("t_" + secrets.token_hex(6)), SCHEMA, ADDED_COLUMNS, lambda d, a: None)
    try:
        assert db.row("SELECT 1") == (1,)
        pg.stop()
        try:
            until = time.monotonic() + 16  # the pool's retries are 8 s apart by now
            while time.monotonic() < until:
                with pytest.raises(RegistryUnavailable):
                    db.row("SELECT 1")
        finally:
            pg.start()
        began = time.monotonic()
        while True:
            try:
                assert db.row("SELECT 1") == (1,)
                break
            except RegistryUnavailable:
                assert time.monotonic() - began < 12
        assert time.monotonic() - began < 7, time.monotonic() - began
    finally:
        db.close()
