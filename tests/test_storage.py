"""Harvested storage: content-addressed blobs per owner, the history quota and superseded versions, the
server-wide quota, freeing at once, real-block accounting of sparse files, the upgrade from the one-folder-per-file
layout, and one registry transaction per harvest. Through the engine on the real local backend, and the
superseded download through a real in-memory MCP client. The tests that go through the registry run on both of
its engines, SQLite and a real PostgreSQL (tests/infra.py), and on the shared store's two, a folder and a real S3
(SeaweedFS); the two that read SQLite's own files are SQLite's. What the store itself adds is tests/test_store.py's."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine
from code_interpreter_mcp.errors import FileSuperseded
from code_interpreter_mcp.sessions import SCHEMA, FileRecord
from code_interpreter_mcp.storage import copying
from code_interpreter_mcp.storage.blobs import BlobStore, owner_key
from code_interpreter_mcp.storage.copying import tree_disk_bytes
from code_interpreter_mcp.storage.history import superseded_to_drop
from tests.helpers import structured, text_of
from tests.infra import (  # noqa: F401  # the fixtures, by name
    backing_settings,
    pg_fixture,
    pg_session_fixture,
    s3_fixture,
    s3_session_fixture,
)

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


@pytest.fixture(params=["sqlite", "postgresql+s3", "sqlite+folder"])
def backing(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The registry's engine and the shared store for this test: SQLite in the data folder and no store (a
    single process), a new PostgreSQL database with a new prefix of a real S3 bucket, or SQLite with a folder store."""
    return backing_settings(request, tmp_path, monkeypatch)


@pytest.fixture
async def engine(tmp_path: Path, request: pytest.FixtureRequest, backing: dict[str, Any]) -> AsyncIterator[Engine]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    eng = Engine(Settings(data_dir=tmp_path / "data", default_timeout_s=60, **backing, **overrides))
    async with eng.running():
        await eng.ready()
        yield eng


def write(path: str, expr: str) -> str:
    return f"open('/mnt/data/{path}', 'wb').write({expr})\n"


# ---- content addressing --------------------------------------------------------------------------------------


async def test_identical_bytes_are_stored_once_per_owner(engine: Engine) -> None:
    one = await engine.session_for(None)
    code = (
        "import random\ndata = random.Random(7).randbytes(1 << 20)\n"
        + write("a.bin", "data")
        + write("b.bin", "data")
        + "del data\n"  # the disk use counted below is the blobs': no variable to snapshot
    )
    out = await engine.run_code(one, code)
    a, b = out.result.files
    assert a.sha256 == b.sha256 and a.local_path == b.local_path and a.file_id != b.file_id
    other_session = await engine.session_for(None)
    again = await engine.run_code(other_session, code)
    assert {f.local_path for f in again.result.files} == {a.local_path}
    assert tree_disk_bytes(engine.settings.files_dir) <= 1 * MiB + 64 * 1024
    stranger = await engine.reg.create_session("someone-else")
    theirs = await engine.run_code(stranger, code)
    assert theirs.result.files[0].local_path != a.local_path  # never shared across owners
    assert owner_key("someone-else") in (theirs.result.files[0].local_path or "")
    assert tree_disk_bytes(engine.settings.files_dir) <= 2 * MiB + 128 * 1024


async def test_five_rewrites_of_a_50_mib_file_keep_at_most_twice_its_size(engine: Engine) -> None:
    session = await engine.session_for(None)
    ids = []
    for _ in range(6):  # the first write and five rewrites, each with other bytes
        out = await engine.run_code(session, "import os\n" + write("big.bin", f"os.urandom({50 * MiB})"))
        assert out.result.status == "ok", out.result.error
        ids.append(out.result.files[0].file_id)
    assert tree_disk_bytes(engine.settings.files_dir) <= 2 * 50 * MiB + 64 * 1024
    # the newest superseded version fits the default history quota (64 MB) and stays downloadable
    assert (await engine.download(session, ids[-2])).result.file.file_id == ids[-2]
    with pytest.raises(FileSuperseded) as info:
        await engine.download(session, ids[0])
    assert info.value.current_file_id == ids[-1]


async def test_rewriting_the_same_bytes_costs_nothing_more(engine: Engine) -> None:
    session = await engine.session_for(None)
    code = "import random\n" + write("same.bin", f"random.Random(1).randbytes({8 * MiB})")
    for _ in range(4):
        assert len((await engine.run_code(session, code)).result.files) == 1  # a new version each time
    assert tree_disk_bytes(engine.settings.files_dir) <= 8 * MiB + 64 * 1024


# ---- the history quota and superseded downloads --------------------------------------------------------------


@pytest.mark.parametrize("engine", [{"file_history_mb": 0}], indirect=True)
async def test_a_dropped_version_names_the_current_one_and_its_copy_is_gone(engine: Engine) -> None:
    session = await engine.session_for(None)
    first = (await engine.run_code(session, write("r.txt", "b'one'"))).result.files[0]
    second = (await engine.run_code(session, write("r.txt", "b'two, longer'"))).result.files[0]
    with pytest.raises(FileSuperseded) as info:
        await engine.download(session, first.file_id)
    assert info.value.current_file_id == second.file_id
    assert second.file_id in info.value.message and "superseded" in info.value.message
    assert first.local_path is not None and not os.path.exists(first.local_path)
    with pytest.raises(FileSuperseded):
        await engine.read_resource(first.uri)
    assert (await engine.download(session, "r.txt")).data == b"two, longer"
    with pytest.raises(FileSuperseded):  # nor can it go back into the container as a run's input
        await engine.run_code(session, "1", files=[first.file_id])
    assert [f.file_id for f in (await engine.list_files(session)).files] == [second.file_id]


async def test_download_and_resources_read_of_a_superseded_version_through_mcp(
    tmp_path: Path, backing: dict[str, Any]
) -> None:
    settings = Settings(data_dir=tmp_path / "data", file_history_mb=0, **backing)
    async with Client(build_server(settings), raise_exceptions=True) as client:
        first = structured(await client.call_tool("run_code", {"code": write("v.txt", "b'1'")}))
        sid = first["session_id"]
        second = structured(await client.call_tool("run_code", {"code": write("v.txt", "b'22'"), "session_id": sid}))
        old, new = first["files"][0], second["files"][0]
        r = await client.call_tool("download_file", {"file": old["file_id"], "session_id": sid})
        assert r.is_error and "file_superseded" in text_of(r) and new["file_id"] in text_of(r)
        with pytest.raises(Exception, match=new["file_id"]):
            await client.read_resource(old["uri"])
        ok = await client.call_tool("download_file", {"file": new["file_id"], "session_id": sid})
        assert not ok.is_error


def rec(seq: int, path: str, blob: str | None, size: int = 10) -> FileRecord:
    return FileRecord(
        file_id=f"f_{seq}", session_id="s", container_id="c", path=path, name=path, bytes=size,
        mime_type="text/plain", sha256=blob, source="generated", created_at=0.0, local_path=f"/x/{seq}",
        remote_id=None, version=str(seq), seq=seq, blob=blob, disk_bytes=size,
    )  # fmt: skip


def test_history_keeps_the_newest_superseded_versions_within_the_quota() -> None:
    records = [rec(1, "a", "h1"), rec(2, "a", "h2"), rec(3, "a", "h3"), rec(4, "a", "h4"), rec(5, "b", "h5")]
    dropped = superseded_to_drop(records, 20, lambda r: r.bytes)
    assert [r.file_id for r in dropped] == ["f_1"]  # h3 + h2 fit in 20, h1 is past it; latest a and b stay
    assert superseded_to_drop(records, 0, lambda r: r.bytes) == records[:3]


def test_history_treats_shared_blobs_as_one_and_free_when_the_current_version_holds_them() -> None:
    records = [rec(1, "a", "same"), rec(2, "a", "other"), rec(3, "a", "same")]
    assert superseded_to_drop(records, 0, lambda r: r.bytes) == [records[1]]  # f_1 costs nothing: f_3 holds it
    shared = [rec(1, "a", "x"), rec(2, "b", "x"), rec(3, "a", "y"), rec(4, "b", "z")]
    assert [r.file_id for r in superseded_to_drop(shared, 5, lambda r: r.bytes)] == ["f_1", "f_2"]


# ---- the server-wide quota and freeing -------------------------------------------------------------------


@pytest.mark.parametrize("engine", [{"max_stored_mb": 1}], indirect=True)
async def test_the_server_quota_refuses_new_files_clearly_and_the_run_still_answers(engine: Engine) -> None:
    first = await engine.session_for(None)
    kept = await engine.run_code(first, "import os\n" + write("a.bin", "os.urandom(600_000)"))
    assert [f.path for f in kept.result.files] == ["a.bin"] and not kept.result.warnings
    second = await engine.session_for(None)
    full = await engine.run_code(second, "import os\nprint('still here')\n" + write("b.bin", "os.urandom(600_000)"))
    assert full.result.stdout == "still here\n" and full.result.files == []
    assert any("storage_quota" in w and "b.bin" in w for w in full.result.warnings), full.result.warnings
    in_flight = engine.settings.files_dir / owner_key(None) / "tmp"  # small files never pass through it
    assert not in_flight.exists() or not list(in_flight.iterdir())  # no copy left in flight
    await engine.close_session(first, delete_files=True)
    retried = await engine.run_code(second, "1")  # room again: the file refused earlier comes back
    assert [f.path for f in retried.result.files] == ["b.bin"]


async def test_close_session_with_delete_files_frees_the_space_at_once(engine: Engine) -> None:
    session = await engine.session_for(None)
    await engine.run_code(session, "import os\n" + write("x.bin", f"os.urandom({4 * MiB})") + write("y.txt", "b'y'"))
    keeper = await engine.session_for(None)
    await engine.run_code(keeper, write("y.txt", "b'y'"))  # the same bytes in a session that stays
    assert tree_disk_bytes(engine.settings.files_dir) >= 4 * MiB
    used = engine.ctx.blobs.used_bytes
    await engine.close_session(session, delete_files=True)
    assert tree_disk_bytes(engine.settings.files_dir) < 64 * 1024
    assert engine.ctx.blobs.used_bytes < used - 4 * MiB + 64 * 1024
    assert (await engine.download(keeper, "y.txt")).data == b"y"


# ---- sparse files ------------------------------------------------------------------------------------------


async def test_a_sparse_file_costs_its_real_blocks_and_hashes_as_its_bytes(engine: Engine) -> None:
    session = await engine.session_for(None)
    code = "f = open('/mnt/data/sparse.bin', 'wb')\nf.write(b'head')\nf.seek(64 << 20)\nf.write(b'tail')\nf.close()\n"
    info = (await engine.run_code(session, code)).result.files[0]
    content = b"head" + bytes((64 << 20) - 4) + b"tail"
    assert info.bytes == len(content) and info.sha256 == hashlib.sha256(content).hexdigest()
    assert info.local_path is not None
    assert os.stat(info.local_path).st_blocks * 512 <= 64 * 1024
    assert engine.ctx.blobs.used_bytes <= 64 * 1024
    with open(info.local_path, "rb") as fh:
        assert fh.read() == content


def test_copy_keeps_holes_and_falls_back_to_read_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as fh:
        fh.seek(3 * MiB)
        fh.write(b"x" * 10)
        fh.truncate(5 * MiB)  # a trailing hole too
    content = src.read_bytes()
    fd = os.open(src, os.O_RDONLY)
    try:
        size, digest = copying.copy_to_new(fd, tmp_path / "kernel", 10 * MiB, "src")

        def no_kernel_copy(*_args: Any) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(copying.os, "copy_file_range", no_kernel_copy)
        assert copying.copy_to_new(fd, tmp_path / "plain", 10 * MiB, "src") == (size, digest)
    finally:
        os.close(fd)
    assert size == 5 * MiB and digest == hashlib.sha256(content).hexdigest()
    for name in ("kernel", "plain"):
        assert (tmp_path / name).read_bytes() == content
        assert os.stat(tmp_path / name).st_blocks * 512 <= 64 * 1024


# ---- upgrade from the earlier layout ---------------------------------------------------------------------


def make_legacy_data_dir(data: Path) -> tuple[str, str, Path]:
    """A data folder as the previous release left it: the old schema, a copy at files/<session>/<file_id>/name."""
    session_id, file_id = "s_" + "ab" * 16, "f_" + "cd" * 12
    copy = data / "files" / session_id / file_id / "old.txt"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"from the old layout")
    db = sqlite3.connect(data / "registry.sqlite3")
    db.executescript(SCHEMA)  # the schema of the previous release: no blob, disk_bytes or dropped columns
    now = time.time()
    db.execute(
        "INSERT INTO sessions (id, owner, created_at, last_used_at) VALUES (?, NULL, ?, ?)", (session_id, now, now)
    )
    db.execute(
        "INSERT INTO files VALUES (?, ?, 'c_gone', 'old.txt', 'old.txt', 19, 'text/plain', ?, 'generated', ?, ?, "
        "NULL, '1:19:1', 1)",
        (file_id, session_id, hashlib.sha256(b"from the old layout").hexdigest(), now, str(copy)),
    )
    db.commit()
    db.close()
    return session_id, file_id, copy


async def test_a_data_folder_of_the_old_layout_keeps_working(tmp_path: Path) -> None:
    data = tmp_path / "data"
    session_id, file_id, copy = make_legacy_data_dir(data)
    eng = Engine(Settings(data_dir=data, file_history_mb=0))
    async with eng.running():
        assert eng.ctx.blobs.used_bytes >= 19  # the legacy copy counts against the server quota
        session = await eng.session_for(session_id)
        assert (await eng.download(session, file_id)).data == b"from the old layout"
        assert (await eng.read_resource(f"ci://sessions/{session_id}/files/{file_id}/old.txt"))[0].startswith(b"from")
        new = (await eng.run_code(session, write("old.txt", "b'rewritten'"))).result.files[0]
        assert new.local_path and "/blobs/" in new.local_path
        with pytest.raises(FileSuperseded):  # history 0: the legacy version was superseded and released
            await eng.download(session, file_id)
        assert not copy.exists()
        await eng.close_session(session, delete_files=True)
        assert tree_disk_bytes(eng.settings.files_dir) == 0
    columns = {r[1] for r in sqlite3.connect(data / "registry.sqlite3").execute("PRAGMA table_info(files)")}
    assert {"blob", "disk_bytes", "dropped"} <= columns


async def test_start_sweeps_copies_in_flight_and_blobs_no_record_holds(tmp_path: Path, backing: dict[str, Any]) -> None:
    files = tmp_path / "data" / "files"
    store = BlobStore(files, 1 << 30)
    key = owner_key(None)
    stale = Path(store.tmp_file(key))
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a copy")
    orphan = store.blob_path(key, "ee" * 32)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"nobody's")
    old = time.time() - 60
    os.utime(stale, (old, old))
    eng = Engine(Settings(data_dir=tmp_path / "data", **backing))
    async with eng.running():
        session = await eng.session_for(None)
        kept = (await eng.run_code(session, write("k.txt", "b'kept'"))).result.files[0]
        for _ in range(100):
            if not stale.exists() and not orphan.exists():
                break
            await anyio.sleep(0.05)
        assert not stale.exists() and not orphan.exists()
        assert kept.local_path and Path(kept.local_path).read_bytes() == b"kept"


# ---- one registry transaction per harvest ------------------------------------------------------------------


async def test_a_harvest_of_many_files_is_one_registry_transaction(tmp_path: Path) -> None:
    async with Engine(Settings(data_dir=tmp_path / "data")).running() as engine:  # SQLite: its trace is read
        await _one_transaction(engine)


async def _one_transaction(engine: Engine) -> None:
    session = await engine.session_for(None)
    await engine.run_code(session, "1")  # the container exists: the next run's writes are its harvest's only
    statements: list[str] = []
    engine.reg.database._db.set_trace_callback(statements.append)  # type: ignore[attr-defined]  # SQLite's
    try:
        out = await engine.run_code(
            session, "import os\nos.makedirs('/mnt/data/many')\nfor i in range(200):\n"
            "    open(f'/mnt/data/many/{i}.txt', 'w').write(str(i))\n",
        )  # fmt: skip
    finally:
        engine.reg.database._db.set_trace_callback(None)  # type: ignore[attr-defined]
    assert out.result.status == "ok"
    with_files = [s for s in statements if "INSERT INTO files" in s]
    assert len(with_files) == 200
    transactions, current = [], []
    for s in statements:
        if s == "BEGIN":
            current = []
        elif s == "COMMIT":
            transactions.append(current)
        else:
            current.append(s)
    assert sum(1 for t in transactions if any("INSERT INTO files" in s for s in t)) == 1


async def test_after_a_restart_blobs_keep_their_references(tmp_path: Path, backing: dict[str, Any]) -> None:
    settings = Settings(data_dir=tmp_path / "data", **backing)
    code = write("shared.txt", "b'the same bytes'")
    async with Engine(settings).running() as first:
        one, two = await first.session_for(None), await first.session_for(None)
        a = (await first.run_code(one, code)).result.files[0]
        await first.run_code(two, code)
        ids = (one.id, two.id)
    async with Engine(settings).running() as again:
        await anyio.to_thread.run_sync(again.ctx.blobs.sweep)  # as at start-up: every blob a record holds stays
        one, two = [await again.session_for(sid) for sid in ids]
        assert (await again.download(one, a.file_id)).data == b"the same bytes"
        await again.close_session(two, delete_files=True)  # one of two references released: the blob stays
        assert a.local_path and Path(a.local_path).is_file()
        await again.close_session(one, delete_files=True)
        assert not Path(a.local_path).exists()
