"""The fast paths of a harvest of many small files: small files copied in one batch (one thread), and a small
file whose bytes the owner's blob store keeps already never copied again. Through the engine on the real local
backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from code_interpreter_mcp.backends.local import files
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine, harvest
from code_interpreter_mcp.storage.blobs import BlobStore

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
