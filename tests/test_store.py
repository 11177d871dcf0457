"""The shared store of harvested files and snapshots (`STORE_URL`), on both of its implementations: a folder and a
real S3 (SeaweedFS's gateway, tests/infra.py), through the real local backend.

- the contract itself: a 20 MB file streamed up (multipart on S3) and down, sizes, listing, deletion, absence;
- a run's files are in the store when its result returns, and come back from it when the copy here is gone;
- a session moves to another data folder (what another replica is) with its files, its uploads and its variables;
- a store that does not answer loses nothing: the run says so, and the files reach it once it is back, even across a
  restart of the server in between (the journal);
- close_session(delete_files=true) takes the session's objects out of the store too.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from code_interpreter_mcp.artifacts import file_uri
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine
from code_interpreter_mcp.storage import mirror as mirror_module
from code_interpreter_mcp.storage.blobs import owner_key
from code_interpreter_mcp.storage.objects import ObjectStore, open_store
from tests.infra import (  # noqa: F401  # the fixtures, by name
    SeaweedS3,
    backing_settings,
    pg_fixture,
    pg_session_fixture,
    s3_fixture,
    s3_session_fixture,
)

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
KEY = owner_key(None)


@pytest.fixture(params=["sqlite+folder", "postgresql+s3"])
def backing(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return backing_settings(request, tmp_path, monkeypatch)


@pytest.fixture(params=["postgresql+folder", "postgresql+s3"])
def shared(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A registry and a store two servers can share (SQLite in a data folder is one server's)."""
    return backing_settings(request, tmp_path, monkeypatch)


def settings(data: Path, backing: dict[str, Any], **extra: Any) -> Settings:
    return Settings(data_dir=data, default_timeout_s=60, **backing, **extra)


@pytest.fixture
async def engine(tmp_path: Path, backing: dict[str, Any]) -> AsyncIterator[Engine]:
    eng = Engine(settings(tmp_path / "data", backing))
    async with eng.running():
        await eng.ready()
        yield eng


def store(backing: dict[str, Any]) -> ObjectStore:
    made = open_store(backing["store_url"])
    assert made is not None
    return made


def blob_key(sha: str) -> str:
    return f"{KEY}/blobs/{sha[:2]}/{sha[2:]}"


async def settled(eng: Engine, within: float = 30.0) -> None:
    """Until the store's queue is empty (snapshots uploaded, waiting files sent)."""
    mirror = eng.ctx.mirror
    assert mirror is not None
    deadline = time.monotonic() + within
    while mirror.backlog:
        assert time.monotonic() < deadline, f"the store's queue did not empty: {mirror.backlog} ({mirror.last_error})"
        await anyio.sleep(0.1)


def _snapshot_keys(objects: ObjectStore, sid: str) -> list[str]:
    return objects.list(f"{KEY}/snapshots/{sid}/")


async def snapshot_stored(objects: ObjectStore, sid: str, within: float = 30.0) -> list[str]:
    """The keys of the session's snapshot in the store, once one is complete there (written after the result,
    then uploaded by the store's background pass)."""
    deadline = time.monotonic() + within
    while True:
        keys = _snapshot_keys(objects, sid)
        if any(k.endswith("/manifest.json") for k in keys):
            return keys
        assert time.monotonic() < deadline, f"no snapshot of {sid} in the store: {keys}"
        await anyio.sleep(0.1)


# ---- the contract ------------------------------------------------------------------------------------------------


async def test_the_contract_streams_a_large_file_both_ways(backing: dict[str, Any], tmp_path: Path) -> None:
    objects = store(backing)
    src = tmp_path / "big.bin"
    with open(src, "wb") as fh:  # 20 MB: several multipart parts on S3
        for i in range(20):
            fh.write(hashlib.sha256(str(i).encode()).digest() * (MiB // 32))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    await anyio.to_thread.run_sync(objects.put_file, "t/a/big.bin", str(src))
    objects.put_file("t/a/small.txt", str(_write(tmp_path / "small.txt", b"small")))
    assert objects.size("t/a/big.bin") == 20 * MiB
    assert objects.list("t/") == ["t/a/big.bin", "t/a/small.txt"]
    dest = tmp_path / "back" / "big.bin"
    assert await anyio.to_thread.run_sync(objects.get_file, "t/a/big.bin", str(dest))
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
    assert not [p for p in dest.parent.iterdir() if p.name != "big.bin"], "no partial file left beside it"
    assert objects.get_file("t/missing", str(tmp_path / "m")) is False and not (tmp_path / "m").exists()
    assert objects.size("t/missing") is None
    objects.delete(["t/a/big.bin", "t/a/small.txt", "t/never-was"])
    assert objects.list("t/") == []
    objects.check()


def test_store_urls_are_checked() -> None:
    with pytest.raises(ValueError, match="store_url"):
        Settings(store_url="http://example.com/bucket")
    assert open_store(None) is None
    with pytest.raises(ValueError, match="s3://bucket"):
        open_store("ftp://x/y")


# ---- through the engine --------------------------------------------------------------------------------------------


async def test_a_runs_files_are_in_the_store_when_its_result_returns(engine: Engine, backing: dict[str, Any]) -> None:
    s = await engine.session_for(None)
    code = (
        "import os\nopen('/mnt/data/a.txt','w').write('alpha')\nopen('/mnt/data/b.bin','wb').write(os.urandom(6 << 20))"
    )
    out = await engine.run_code(s, code)
    assert out.result.status == "ok", out.result
    objects = store(backing)
    files = {f.path: f for f in out.result.files}
    for f in files.values():  # no waiting: they were stored before the result came back
        assert objects.size(blob_key(f.sha256 or "")) == f.bytes
    assert not any("shared store" in w for w in out.result.warnings)
    # The copy here lost (a replica that never had it): download_file brings it back from the store.
    local = engine.ctx.blobs.blob_path(KEY, files["b.bin"].sha256 or "")
    original = hashlib.sha256(local.read_bytes()).hexdigest()
    local.unlink()
    got = await engine.download(s, files["b.bin"].file_id)
    assert got.result.file.bytes == 6 * MiB and local.is_file()
    assert hashlib.sha256(local.read_bytes()).hexdigest() == original
    engine.ctx.blobs.blob_path(KEY, files["a.txt"].sha256 or "").unlink()
    data, _mime, _info = await engine.read_resource(file_uri(s.id, files["a.txt"].file_id, "a.txt"), None)
    assert data == b"alpha"


async def test_a_session_moves_to_another_data_folder_with_files_uploads_and_variables(
    tmp_path: Path, shared: dict[str, Any]
) -> None:
    first = Engine(settings(tmp_path / "one", shared))
    async with first.running():
        await first.ready()
        s = await first.session_for(None)
        payload = base64.b64encode(b"uploaded bytes").decode()
        await first.upload(s, name="in.txt", content_base64=payload)
        out = await first.run_code(
            s, "import numpy as np\nx = 41\narr = np.arange(5)\nopen('/mnt/data/out.txt','w').write('hi')\n"
        )
        assert out.result.status == "ok", out.result
        sid = s.id
        await snapshot_stored(store(shared), sid)
    second = Engine(settings(tmp_path / "two", shared))  # another machine: nothing of the first's data folder
    async with second.running():
        await second.ready()
        s2 = await second.reg.get_session(sid, None)
        again = await second.run_code(s2, "print(x + 1, arr.sum(), open('/mnt/data/in.txt').read())")
        assert again.result.status == "ok", again.result
        assert again.result.stdout == "42 10 uploaded bytes\n"
        restored = again.result.container.state_restored
        assert restored is not None and {"x", "arr"} <= set(restored.restored), again.result.container
        out_txt = next(f for f in s2.latest_files() if f.path == "out.txt")
        got = await second.download(s2, out_txt.file_id)
        assert got.data == b"hi"


async def test_a_store_that_does_not_answer_loses_nothing(
    tmp_path: Path, backing: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    s3: SeaweedS3 | None = request.getfixturevalue("s3") if "s3" in str(backing["store_url"]) else None
    shared_folder = tmp_path / "shared-store"
    objects = store(backing)

    def down() -> None:
        if s3 is not None:
            s3.stop()
        else:
            shared_folder.rename(tmp_path / "away")

    def up() -> None:
        if s3 is not None:
            s3.ensure_running()
        else:
            (tmp_path / "away").rename(shared_folder)

    data = tmp_path / "data"
    eng = Engine(settings(data, backing))
    async with eng.running():
        await eng.ready()
        s = await eng.session_for(None)
        down()
        try:
            out = await eng.run_code(s, "open('/mnt/data/kept.txt','w').write('kept while the store was down')")
            assert out.result.status == "ok", out.result
            assert any("kept on this server only for now" in w for w in out.result.warnings), out.result.warnings
            kept = out.result.files[0]
            got = await eng.download(s, kept.file_id)  # served from here meanwhile
            assert got.data == b"kept while the store was down"
            assert eng.ctx.mirror is not None and eng.ctx.mirror.backlog
        finally:
            if s3 is None:
                up()  # the folder comes back only after a restart of the server: the journal carries it over
    if s3 is not None:
        up()
    assert (data / "store-pending.json").is_file()
    eng = Engine(settings(data, backing))
    async with eng.running():
        await eng.ready()
        await settled(eng, within=60)
    assert objects.size(blob_key(kept.sha256 or "")) == kept.bytes


async def test_close_session_with_delete_files_empties_its_part_of_the_store(
    engine: Engine, backing: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror_module, "DELETE_GRACE_S", 0.0)
    objects = store(backing)
    s = await engine.session_for(None)
    await engine.upload(s, name="in.txt", content_base64=base64.b64encode(b"input").decode())
    out = await engine.run_code(s, "y = 1\nopen('/mnt/data/gone.txt','w').write('soon gone')")
    keep = await engine.session_for(None)  # the same bytes in another session: its blob stays
    other = await engine.run_code(keep, "open('/mnt/data/same.txt','w').write('soon gone')")
    await snapshot_stored(objects, s.id)
    gone = out.result.files[0]
    assert other.result.files[0].sha256 == gone.sha256
    assert objects.list(f"{s.id}/")
    await engine.close_session(s, delete_files=True)
    await settled(engine)
    assert objects.list(f"{s.id}/") == [] and _snapshot_keys(objects, s.id) == []
    assert objects.size(blob_key(gone.sha256 or "")) is not None, "another session's record still holds it"
    await engine.close_session(keep, delete_files=True)
    await settled(engine)
    assert objects.size(blob_key(gone.sha256 or "")) is None


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_keys_are_paths_under_the_files_folder(tmp_path: Path) -> None:
    objects = open_store((tmp_path / "s").as_uri())
    assert objects is not None
    m = mirror_module.Mirror(objects, tmp_path / "files", tmp_path / "j.json")
    assert m.key_of(tmp_path / "files" / "o_none" / "blobs" / "ab" / "cd") == "o_none/blobs/ab/cd"
    assert m.key_of(tmp_path / "elsewhere") is None
    assert m.key_of(str(tmp_path / "files") + "/../x") is None
    with pytest.raises(ValueError):
        objects.put_file("../escape", os.devnull)
