"""The registry's database behind one small contract, with two engines: SQLite in the data folder (the default)
and PostgreSQL (`DATABASE_URL=postgresql://...`, psycopg 3 and its connection pool).

The registry speaks one SQL: `?` placeholders, `INSERT ... ON CONFLICT ... DO UPDATE`, the column types of
`SCHEMA` (`REAL` and `INTEGER` are 64-bit in SQLite; PostgreSQL gets `DOUBLE PRECISION` and `BIGINT`, so no
timestamp or size loses precision). Each engine creates the schema and adds the columns of later releases at
start (PostgreSQL under an advisory lock, so replicas starting together do not race), and runs every write as one
transaction. A PostgreSQL that does not answer is `RegistryUnavailable` (retryable, no traceback), and the pool
reconnects by itself when it is back. Every method blocks: the registry calls them from worker threads.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import RegistryUnavailable

Statement = tuple[str, tuple[Any, ...] | list[tuple[Any, ...]]]
"""One SQL statement and its parameters; a list of parameter tuples runs it once for each (executemany)."""
Row = tuple[Any, ...]
_SCHEMA_LOCK = 0x6369_6D63_7000  # pg_advisory_xact_lock key: "cimcp"
CONNECT_TIMEOUT_S = 5.0  # a call waits this long for a connection before it is told to retry
REVIVE_EVERY_S = 2.0  # a pool that lends nothing is made again at most this often (see `_connection`)


class Database(Protocol):
    kind: str  # "sqlite" | "postgresql"

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def row(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    def transaction(self, statements: list[Statement]) -> None: ...

    def close(self) -> None: ...


Migrate = Callable[["Database", list[tuple[str, str]]], None]
"""Runs once the schema is there, with the (table, column) pairs this start added."""


class SqliteDatabase:
    """One connection in WAL mode, used under a lock (sqlite3 objects are not shared between threads safely)."""

    kind = "sqlite"

    def __init__(self, path: Path, schema: str, added: list[tuple[str, str, str]], migrate: Migrate) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(schema)
        new = []
        for table, column, definition in added:
            if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                new.append((table, column))
        migrate(self, new)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    def row(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchone()  # type: ignore[no-any-return]

    def transaction(self, statements: list[Statement]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for sql, params in statements:
                    if isinstance(params, list):
                        self._db.executemany(sql, params)
                    else:
                        self._db.execute(sql, params)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


_TYPES = [(re.compile(r"\bREAL\b"), "DOUBLE PRECISION"), (re.compile(r"\bINTEGER\b"), "BIGINT")]


def postgres_sql(sql: str) -> str:
    """Our SQL as PostgreSQL takes it: `%s` placeholders (none of our statements holds a literal ? or %)."""
    return sql.replace("?", "%s")


def postgres_ddl(ddl: str) -> str:
    for pattern, name in _TYPES:
        ddl = pattern.sub(name, ddl)
    return ddl


class PostgresDatabase:
    """A psycopg 3 connection pool; each call takes a connection for one statement or one transaction."""

    kind = "postgresql"

    def __init__(
        self, url: str, schema: str, added: list[tuple[str, str, str]], migrate: Migrate, pool_size: int = 4
    ) -> None:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise RuntimeError(
                "DATABASE_URL names PostgreSQL but psycopg is not installed: "
                "pip install 'code-interpreter-mcp[postgres]'"
            ) from exc
        import psycopg
        from psycopg_pool import PoolTimeout

        self.url = url
        self._down = (psycopg.OperationalError, PoolTimeout)  # the server gone or unreachable: retryable
        self._pool_timeout = PoolTimeout

        def new_pool() -> Any:
            # Each connection is checked as it is lent, so one broken by a database restart is replaced, not used.
            return ConnectionPool(
                url,
                min_size=1,
                max_size=pool_size,
                open=True,
                timeout=CONNECT_TIMEOUT_S,
                check=ConnectionPool.check_connection,
                name="registry",
            )

        self._new_pool = new_pool
        self._pool = new_pool()
        self._revive_lock = threading.Lock()
        self._revived_at = 0.0
        with self._answered():
            new = self._create(schema, added)
        migrate(self, new)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        """A connection of the pool; when none comes, and the server answers a direct connection, the pool is
        made again at once: psycopg_pool retries a lost server with a delay that doubles without bound (1, 2,
        4, ... 64 s after a minute's outage), and calls should work again within seconds of the server's return."""
        pool = self._pool
        try:
            conn = pool.getconn()
        except self._pool_timeout:
            if not self._revive(pool):
                raise
            pool = self._pool
            conn = pool.getconn()
        try:
            yield conn
        finally:
            pool.putconn(conn)

    def _revive(self, stuck: Any) -> bool:
        """Whether there is a new pool to try (made here, or by another call since `stuck` failed)."""
        import psycopg

        with self._revive_lock:
            if self._pool is not stuck:
                return True
            if time.monotonic() - self._revived_at < REVIVE_EVERY_S:
                return False
            self._revived_at = time.monotonic()
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
            except psycopg.OperationalError:
                return False
            old, self._pool = self._pool, self._new_pool()
        old.close(timeout=0)
        return True

    @contextlib.contextmanager
    def _answered(self) -> Iterator[None]:
        try:
            yield
        except self._down as exc:
            raise RegistryUnavailable(
                f"The registry's PostgreSQL did not answer: {type(exc).__name__}: {exc}"
            ) from None

    def _create(self, schema: str, added: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
        new = []
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in postgres_ddl(schema).split(";"):
                if statement.strip():
                    conn.execute(statement)  # type: ignore[call-overload]
            for table, column, definition in added:
                exists = conn.execute(
                    "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                    "AND table_name = %s AND column_name = %s",
                    (table, column),
                ).fetchone()
                if exists is None:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {postgres_ddl(definition)}")  # type: ignore[call-overload]
                    new.append((table, column))
        return new

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._answered(), self._connection() as conn:
            return conn.execute(postgres_sql(sql), tuple(params)).fetchall()  # type: ignore[call-overload,no-any-return]

    def row(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        with self._answered(), self._connection() as conn:
            return conn.execute(postgres_sql(sql), tuple(params)).fetchone()  # type: ignore[call-overload,no-any-return]

    def transaction(self, statements: list[Statement]) -> None:
        with self._answered(), self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            for sql, params in statements:
                if isinstance(params, list):
                    if params:
                        cur.executemany(postgres_sql(sql), params)  # type: ignore[arg-type]
                else:
                    cur.execute(postgres_sql(sql), params)  # type: ignore[arg-type]

    def close(self) -> None:
        self._pool.close()


def is_postgres(url: str | None) -> bool:
    return bool(url) and str(url).split("://", 1)[0] in ("postgresql", "postgres")
