"""The fast paths of a harvest of many small files: small files copied in one batch (one thread), a small file
whose bytes the owner's blob store keeps already never copied again, and new small bytes written straight to
their blob (`BlobStore.keep`: no copy in flight, a leftover never trusted, the quota, writers of the same bytes
at once), and a harvest that compares only the paths a listing says changed. Through the engine on the real
local backend, and on the store itself."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from code_interpreter_mcp.backends.base import Listing
from code_interpreter_mcp.backends.local.tracking import files
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine, harvest
from code_interpreter_mcp.errors import StorageQuota
from code_interpreter_mcp.sessions import FileRecord
from code_interpreter_mcp.storage.blobs import BlobStore, owner_key

pytestmark = pytest.mark.anyio


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    eng = Engine(Settings(data_dir=tmp_path / "data", default_timeout_s=60))
    async with eng.running():
        await eng.ready()
        yield eng


async def test_bytes_the_store_keeps_are_not_copied_again(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    session = await engine.session_for(None)
    first = await engine.run_code(session, "open('/mnt/data/a.txt', 'w').write('same bytes\\n' * 50)")
    (a,) = first.result.files
    kept: list[tuple[str, bool]] = []
    keep = BlobStore.keep

    def spy(self: BlobStore, key: str, data: bytes, sha: str, what: str) -> tuple[str, bool]:
        out = keep(self, key, data, sha, what)
        kept.append((what, out[1]))
        return out

    monkeypatch.setattr(BlobStore, "keep", spy)
    code = "open('/mnt/data/b.txt', 'w').write('same bytes\\n' * 50)\nopen('/mnt/data/c.txt', 'w').write('new')"
    second = await engine.run_code(session, code)
    b, c = second.result.files
    assert (b.path, c.path) == ("b.txt", "c.txt")
    assert kept == [("b.txt", False), ("c.txt", True)]  # b.txt's bytes were kept already: nothing written
    assert b.sha256 == a.sha256 and b.local_path == a.local_path and b.file_id != a.file_id
    assert Path(b.local_path or "").read_text() == "same bytes\n" * 50
    await engine.close_session(session, delete_files=True)
    assert not Path(b.local_path or "").exists()  # both records released the one blob


async def test_small_files_are_one_batch_and_large_ones_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[list[str]] = []

    class Group:
        def start_soon(self, fn: object, remotes: list[object]) -> None:
            batches.append([r.path for r in remotes])  # type: ignore[attr-defined]

    files = [harvest.RemoteFile(path=f"s{k}", bytes=100, version="v") for k in range(5)]
    files += [harvest.RemoteFile(path=f"L{k}", bytes=harvest.SMALL_FILE_BYTES + 1, version="v") for k in range(3)]
    h = harvest.Harvest.__new__(harvest.Harvest)
    h._start_batches(Group(), files)  # type: ignore[arg-type]
    assert batches[0] == [f"s{k}" for k in range(5)]
    assert sorted(p for b in batches[1:] for p in b) == ["L0", "L1", "L2"]
    assert len(batches) == 1 + harvest.COPY_THREADS


def test_a_batch_reuses_a_folder_and_still_refuses_links(tmp_path: Path) -> None:
    root, out = tmp_path / "data", tmp_path / "out"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    out.mkdir()
    for name in ("a/x", "a/y", "b/w"):
        (root / name).write_text(name)
    (root / "link").symlink_to(root / "a")

    class Sink:
        def keep(self, data: bytes, sha256: str, path: str) -> tuple[str, bool]:
            dest = out / path.replace("/", "_")
            dest.write_bytes(data)
            return str(dest), True

        def new_path(self) -> str:
            raise AssertionError("small files are kept whole")

    paths = ["a/x", "a/y", "link/x", "a/nope", "b/w"]
    results = files.fetch_many(root, [(p, p) for p in paths], 1 << 20, Sink())
    assert [type(r).__name__ for r in results] == [
        "FetchResult",
        "FetchResult",
        "PathRefused",
        "FileNotFound",
        "FetchResult",
    ]
    assert [(out / n).read_text() for n in ("a_x", "a_y", "b_w")] == ["a/x", "a/y", "b/w"]
    assert not (out / "link_x").exists()


# ---- small copies straight to their blobs ---------------------------------------------------------------------


def _records(store: BlobStore, key: str, sha: str, n: int) -> list[tuple[str, FileRecord]]:
    rec = FileRecord("f", "s", "c", "p", "p", 0, "text/plain", sha, "generated", 0.0, None, None, "v", blob=sha)
    return [(key, rec)] * n


def test_a_small_copy_goes_straight_to_its_blob_and_replaces_a_file_no_reference_holds(tmp_path: Path) -> None:
    store, key = BlobStore(tmp_path / "files", 1 << 30), owner_key(None)
    data = b"row,value\n" * 30
    sha = hashlib.sha256(data).hexdigest()
    cut_short = Path(store.blob_file(key, sha))
    cut_short.parent.mkdir(parents=True)
    cut_short.write_bytes(data[:7])  # a crash's copy: never trusted, since no record holds it
    path, written = store.keep(key, data, sha, "a.csv")
    assert (path, written) == (str(cut_short), True) and cut_short.read_bytes() == data
    assert store.keep(key, data, sha, "b.csv") == (path, False)  # held now: nothing written again
    assert store.cost_of(key, sha) > 0 and store.used_bytes == store.cost_of(key, sha)
    assert not list((tmp_path / "files" / key / "tmp").iterdir())  # its replacement was renamed over it
    store.release(_records(store, key, sha, 2))
    assert not cut_short.exists() and store.used_bytes == 0


def test_a_small_copy_over_the_quota_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    key = owner_key(None)
    for limit, data in ((100, b"x" * 200), (100, b"y" * 50)):  # refused before writing; after (its blocks)
        store = BlobStore(tmp_path / f"files{limit}{len(data)}", limit)
        sha = hashlib.sha256(data).hexdigest()
        with pytest.raises(StorageQuota):
            store.keep(key, data, sha, "big.bin")
        assert not Path(store.blob_file(key, sha)).exists() and store.used_bytes == 0
        store.max_bytes = 1 << 30
        assert store.keep(key, data, sha, "big.bin")[1] is True  # no reference was left behind to claim


def test_the_same_bytes_kept_by_many_threads_at_once_make_one_whole_blob(tmp_path: Path) -> None:
    store, key = BlobStore(tmp_path / "files", 1 << 30), owner_key(None)
    data = os.urandom(1 << 20)
    sha = hashlib.sha256(data).hexdigest()
    with ThreadPoolExecutor(8) as pool:
        swept = pool.submit(lambda: [store.sweep() for _ in range(20)])  # never removes a blob being written
        results = list(pool.map(lambda _: store.keep(key, data, sha, "same.bin"), range(8)))
        swept.result()
    assert {path for path, _ in results} == {store.blob_file(key, sha)}
    assert Path(store.blob_file(key, sha)).read_bytes() == data
    in_flight = tmp_path / "files" / key / "tmp"
    assert not in_flight.exists() or not list(in_flight.iterdir())  # the copies of the writers that lost
    store.release(_records(store, key, sha, 7))
    assert Path(store.blob_file(key, sha)).exists()  # one reference still holds it
    store.release(_records(store, key, sha, 1))
    assert not Path(store.blob_file(key, sha)).exists() and store.used_bytes == 0


# ---- a listing's difference from the last one ----------------------------------------------------------------


async def test_a_harvest_compares_only_what_the_listing_says_changed(engine: Engine) -> None:
    session = await engine.session_for(None)
    code = "import os\nos.makedirs('/mnt/data/d', exist_ok=True)\n" + "".join(
        f"open('/mnt/data/d/{n}.txt', 'w').write('{n}')\n" for n in ("a", "b", "keep")
    )
    first = await engine.run_code(session, code)
    assert [f.path for f in first.result.files] == ["d/a.txt", "d/b.txt", "d/keep.txt"]
    rec = engine.reg.containers[first.result.container_id]
    before = rec.listed
    assert isinstance(before, Listing)
    code = "import os\nopen('/mnt/data/d/a.txt', 'w').write('A')\nos.remove('/mnt/data/d/b.txt')\n"
    second = await engine.run_code(session, code + "open('/mnt/data/c.txt', 'w').write('c')\n")
    assert [f.path for f in second.result.files] == ["c.txt", "d/a.txt"]
    after = rec.listed
    assert isinstance(after, Listing) and after.base == before.generation
    assert set(after.changes) == {"c.txt", "d/a.txt", "d/b.txt"} and after.changes["d/b.txt"] is None
    assert rec.snapshot == {f.path: f for f in after}  # kept from the changes alone, as a full compare makes it
    assert [f.path for f in (await engine.run_code(session, "1")).result.files] == []
