"""The local backend's change tracking of a data folder (inotify), its disk accounting and quota, and the full scan.

Fast unit tests on plain folders: no sandbox. A "background writer" is a subprocess left running, as a process that
outlives a run would be.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from code_interpreter_mcp.backends.local.tracking import tree
from code_interpreter_mcp.backends.local.tracking.changes import Changes, ChangeTracker, diff, scan
from code_interpreter_mcp.backends.local.tracking.index import WALK_LIMIT
from code_interpreter_mcp.backends.local.tracking.inotify import IN_Q_OVERFLOW, Event, Inotify, pack
from code_interpreter_mcp.removal import remove_tree

MiB = 1024 * 1024
Track = Callable[..., ChangeTracker]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def track(root: Path) -> Iterator[Track]:
    """Started trackers (of `root` unless told), all closed at the end."""
    made: list[ChangeTracker] = []

    def make(folder: Path | None = None, **kw: object) -> ChangeTracker:
        t = ChangeTracker(folder or root, **kw)  # type: ignore[arg-type]
        t.start()
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def assert_matches_scan(t: ChangeTracker) -> None:
    """The tracker's index and usage are what a full walk finds now."""
    snap = scan(t.root)

    def shape(entries: object) -> dict[str, tuple[object, ...]]:
        return {p: (e.kind, e.size, e.ino, e.mtime_ns) for p, e in dict(entries).items()}  # type: ignore[call-overload]

    assert shape(t.files) == shape(snap.entries)
    assert t.usage_bytes == snap.usage_bytes
    assert t.hole_bytes == snap.hole_bytes


# ---------------------------------------------------------------------------------------------- files and dirs


def test_existing_content_is_the_baseline(root: Path, track: Track) -> None:
    write(root / "old.txt", b"before")
    t = track()
    assert not t.drain()
    assert "old.txt" in t.files
    assert_matches_scan(t)


def test_create_modify_delete_rename_file(root: Path, track: Track) -> None:
    t = track()
    write(root / "a.txt", b"one")
    ch = t.drain()
    assert ch.changed == {"a.txt"} and not ch.removed and not ch.rescan_needed

    assert not t.drain()  # nothing new

    with open(root / "a.txt", "ab") as f:
        f.write(b"two")
    assert t.drain().changed == {"a.txt"}

    os.rename(root / "a.txt", root / "b.txt")
    ch = t.drain()
    assert ch.changed == {"b.txt"} and ch.removed == {"a.txt"}

    os.unlink(root / "b.txt")
    ch = t.drain()
    assert ch.removed == {"b.txt"} and not ch.changed
    assert_matches_scan(t)


def test_open_close_without_writing_is_no_change(root: Path, track: Track) -> None:
    write(root / "a", b"data")
    t = track()
    with open(root / "a", "r+b"):
        pass
    os.chmod(root / "a", 0o644)  # IN_ATTRIB: ctime changes, which counts as a change
    assert t.drain().changed == {"a"}
    with open(root / "a", "rb") as f:
        f.read()
    assert not t.drain()


def test_rewrite_with_mtime_set_back_is_seen(root: Path, track: Track) -> None:
    write(root / "a", b"aaaa")
    st = os.stat(root / "a")
    t = track()
    with open(root / "a", "r+b") as f:
        f.write(b"bbbb")  # same size, same inode
    os.utime(root / "a", ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p or tar would
    assert t.drain().changed == {"a"}


def test_truncate_shrinks_usage(root: Path, track: Track) -> None:
    write(root / "a", b"x" * (4 * MiB))
    t = track()
    before = t.usage_bytes
    os.truncate(root / "a", 10)
    assert t.drain().changed == {"a"}
    assert t.usage_bytes <= before - 4 * MiB + 8192
    assert_matches_scan(t)


def test_nested_directories(root: Path, track: Track) -> None:
    t = track()
    write(root / "d1/d2/d3/f.txt")
    write(root / "d1/g.txt")
    ch = t.drain()
    assert ch.changed == {"d1/d2/d3/f.txt", "d1/g.txt"}
    assert t.watches == 4  # the root and three directories

    write(root / "d1/d2/d3/new.txt")  # a change inside a directory watched since it appeared
    assert t.drain().changed == {"d1/d2/d3/new.txt"}

    os.rename(root / "d1/d2", root / "moved")
    ch = t.drain()
    assert ch.removed == {"d1/d2/d3/f.txt", "d1/d2/d3/new.txt"}
    assert ch.changed == {"moved/d3/f.txt", "moved/d3/new.txt"}
    assert t.watches == 4  # the moved directories keep their watches, under their new names

    write(root / "moved/d3/later.txt")
    assert t.drain().changed == {"moved/d3/later.txt"}

    shutil.rmtree(root / "moved")
    ch = t.drain()
    assert ch.removed == {"moved/d3/f.txt", "moved/d3/new.txt", "moved/d3/later.txt"}
    assert t.watches == 2
    assert_matches_scan(t)


def test_directory_moved_out_of_the_folder_stops_being_watched(root: Path, track: Track, tmp_path: Path) -> None:
    t = track()
    write(root / "d/e/f")
    t.drain()
    os.rename(root / "d", tmp_path / "outside")
    assert t.drain().removed == {"d/e/f"}
    assert t.watches == 1
    write(tmp_path / "outside/e/g")
    assert not t.drain()
    assert_matches_scan(t)


def test_directory_created_and_filled_at_once(root: Path, track: Track) -> None:
    """mkdir then write before the tracker reads the mkdir: the listing that follows the new watch finds them."""
    t = track()
    for i in range(50):
        write(root / f"burst{i}/sub/deeper/file{i}.bin", b"y" * 100)
    ch = t.drain()
    assert ch.changed == {f"burst{i}/sub/deeper/file{i}.bin" for i in range(50)}
    for i in range(50):  # and the new directories are watched from then on
        write(root / f"burst{i}/sub/deeper/more.bin")
    assert len(t.drain().changed) == 50
    assert_matches_scan(t)


def test_directory_race_with_a_concurrent_writer(root: Path, track: Track) -> None:
    t = track()
    seen = Changes()
    stop = threading.Event()

    def writer() -> None:
        for i in range(300):
            d = root / f"w{i % 7}" / f"x{i}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "f").write_bytes(b"z" * i)
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not stop.is_set():
        seen.merge(t.drain())
    thread.join()
    seen.merge(t.drain())
    assert not seen.rescan_needed
    assert seen.changed == {f"w{i % 7}/x{i}/f" for i in range(300)}
    assert_matches_scan(t)


@pytest.mark.anyio
async def test_ten_thousand_files(root: Path, track: Track) -> None:
    t = track()
    for i in range(10_000):
        (root / f"f{i:05d}").write_bytes(b"v")
        if i % 2000 == 1999:  # drained as it goes, the queue (16,384 events) never overflows
            assert not t.drain().rescan_needed
    assert len(t.files) == 10_000
    with open(root / "f04242", "ab") as f:
        f.write(b"w")
    ch = t.drain()
    assert ch.changed == {"f04242"} and not ch.removed
    assert_matches_scan(t)

    for i in range(10_000):  # modify + close_write each, undrained: past the kernel's queue
        with open(root / f"f{i:05d}", "ab") as f:
            f.write(b"2")
    ch = await t.changes()  # the overflow, then one rescan
    assert not ch.rescan_needed
    assert len(ch.changed) == 10_000
    assert_matches_scan(t)


# ---------------------------------------------------------------------------------------------- lost events


def _losing_reader(lose: threading.Event) -> Callable[[int, int], bytes]:
    """os.read, except that once `lose` is set it swallows what is queued and reports an overflow instead."""

    def read(fd: int, size: int) -> bytes:
        if lose.is_set():
            lose.clear()
            try:
                while os.read(fd, size):
                    pass
            except BlockingIOError:
                pass
            return pack(Event(-1, IN_Q_OVERFLOW, 0, ""))
        return os.read(fd, size)

    return read


@pytest.mark.anyio
async def test_overflow_asks_for_a_rescan_that_finds_what_was_lost(root: Path, track: Track) -> None:
    lose = threading.Event()
    t = track(read=_losing_reader(lose))
    write(root / "seen")
    assert t.drain().changed == {"seen"}

    write(root / "lost/inner")  # its events, and the new directory's watch, are lost
    write(root / "seen", b"changed")
    lose.set()
    ch = t.drain()
    assert ch.rescan_needed and not ch.changed

    ch = await t.changes()
    assert ch.changed == {"lost/inner", "seen"} and not ch.rescan_needed
    write(root / "lost/after")  # the rescan watched the directory it found
    assert t.drain().changed == {"lost/after"}
    assert_matches_scan(t)


@pytest.mark.anyio
async def test_watch_limit_degrades_to_rescans(root: Path, track: Track) -> None:
    for d in "abcd":
        write(root / d / "f")
    t = track(max_watches=3)
    assert t.degraded and t.watches == 3
    write(root / "a/g")
    write(root / "b/g")
    write(root / "c/g")
    write(root / "d/g")
    ch = t.drain()
    assert ch.rescan_needed  # a directory has no watch: what it got may be missing
    ch.merge(await t.changes())
    assert {"a/g", "b/g", "c/g", "d/g"} <= ch.changed
    shutil.rmtree(root / "d")
    shutil.rmtree(root / "c")
    await t.changes()
    assert not t.degraded  # room again after the rescan
    write(root / "a/h")
    assert t.drain() == Changes(changed={"a/h"})


@pytest.mark.anyio
async def test_rescan_in_a_thread_while_writes_go_on(root: Path, track: Track) -> None:
    """Events that arrive during a rescan's walk are held and replayed after it: nothing is lost or stale."""
    for i in range(800):
        write(root / f"pre/{i % 20}/f{i}")
    t = track()
    rng = random.Random(7)
    done = threading.Event()

    def churn() -> None:
        for i in range(1000):
            n = rng.randrange(800)
            p = root / f"pre/{n % 20}/f{n}"
            op = rng.random()
            if op < 0.4:
                write(p, b"n" * rng.randrange(9000))
            elif op < 0.6:
                p.unlink(missing_ok=True)
            elif op < 0.8:
                write(root / f"new/{i % 13}/g{i}")
            else:
                src = root / f"pre/{n % 20}"
                if src.exists():
                    os.replace(src, root / f"pre/moved{i}")
        done.set()

    async def rescan() -> None:
        await anyio.to_thread.run_sync(t.rescan)
        walked.set()

    thread = threading.Thread(target=churn)
    thread.start()
    while not done.is_set():
        walked = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(rescan)
            while not walked.is_set():  # the loop pumps while the walk runs: those events are held
                t.drain()
                await anyio.sleep(0.0005)
    thread.join()
    await t.changes()
    assert_matches_scan(t)


def test_root_removed(root: Path, track: Track) -> None:
    t = track()
    shutil.rmtree(root)
    ch = t.drain()
    assert t.gone and ch.rescan_needed
    with pytest.raises(FileNotFoundError):
        t.rescan()


# ---------------------------------------------------------------------------------------------- disk use


def test_fallocate_is_counted_by_real_blocks(root: Path, track: Track) -> None:
    t = track()
    before = t.usage_bytes
    fd = os.open(root / "alloc", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        t.drain()
        os.posix_fallocate(fd, 0, 8 * MiB)
        assert t.drain().changed == {"alloc"}  # IN_MODIFY, before any close
    finally:
        os.close(fd)
    assert t.usage_bytes - before >= 8 * MiB
    assert_matches_scan(t)


def test_sparse_file_counts_what_it_allocated(root: Path, track: Track) -> None:
    t = track()
    with open(root / "sparse", "wb") as f:
        f.truncate(1024 * MiB)
    assert t.drain().changed == {"sparse"}
    assert t.usage_bytes < MiB
    assert t.hole_bytes >= 1024 * MiB - MiB
    assert_matches_scan(t)


def test_hard_links_count_once(root: Path, track: Track) -> None:
    t = track()
    write(root / "a", b"q" * MiB)
    t.drain()
    one = t.usage_bytes
    os.link(root / "a", root / "b")
    assert t.drain().changed >= {"b"}
    assert t.usage_bytes == one
    os.unlink(root / "a")
    t.drain()
    assert t.usage_bytes == one
    os.unlink(root / "b")
    t.drain()
    assert t.usage_bytes < one - MiB // 2
    assert_matches_scan(t)


def test_writes_to_a_deleted_open_file_are_counted(root: Path, track: Track) -> None:
    t = track()
    with open(root / "ghost", "wb") as f:
        t.drain()
        os.unlink(root / "ghost")
        f.write(b"g" * 1000)
        f.flush()
        ch = t.drain()
    assert ch.removed == {"ghost"} and ch.unlinked_writes >= 1 and not ch.changed


def test_usage_follows_many_operations(root: Path, track: Track) -> None:
    t = track()
    rng = random.Random(3)
    for i in range(400):
        p = root / f"d{rng.randrange(5)}" / f"f{rng.randrange(40)}"
        if rng.random() < 0.7:
            write(p, b"u" * rng.randrange(20000))
        else:
            p.unlink(missing_ok=True)
        if i % 50 == 0:
            t.drain()
    t.drain()
    assert_matches_scan(t)


# ---------------------------------------------------------------------------------------------- odd trees


def remove_deep(top: Path) -> None:
    """Take a chain top/d/d/... apart from the top, one level at a time (shutil.rmtree recurses, and pytest's own
    clean-up of old temporary folders would hit the recursion limit on it)."""
    spare = top.parent / (top.name + ".next")
    while (top / "d").is_dir():
        os.rename(top / "d", spare)
        shutil.rmtree(top)
        os.rename(spare, top)
    shutil.rmtree(top)


def test_thousand_deep_tree(root: Path, track: Track) -> None:
    t = track()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1000):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(leaf, b"bottom")
        os.close(leaf)
    finally:
        os.close(fd)
    try:
        deep = "/".join(["d"] * 1000) + "/leaf"
        assert deep in t.drain().changed
        assert t.watches == 1001
        assert scan(root).entries[deep].size == 6
        assert_matches_scan(t)
    finally:
        remove_deep(root / "d")


def test_a_deep_tree_made_level_by_level_costs_a_few_opens_a_level(
    root: Path, track: Track, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code making a tree one level at a time, each level's event read before the next (as the event loop does):
    paths past PATH_MAX are opened from the deepest directory kept open, not component by component from the
    root each time (which cost O(depth²) opens: seconds of a stalled event loop at 1,000 levels)."""
    t = track()
    opens = [0]

    class CountingOs:
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        @staticmethod
        def open(*args: object, **kwargs: object) -> int:
            opens[0] += 1
            return os.open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tree, "os", CountingOs())
    levels, name = 700, "level_0000"  # past PATH_MAX from about level 360
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            leaf = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
            os.write(leaf, b"x")
            os.close(leaf)
            t.drain()
    finally:
        os.close(fd)
    assert opens[0] < 12 * levels, opens[0]  # component by component: over 300,000
    monkeypatch.undo()
    assert_matches_scan(t)
    # A deep subtree moved, then removed: the kept directories must not stand for their old paths.
    mid = "/".join([name] * 400)
    parent_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(399):
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent_fd)
            os.close(parent_fd)
            parent_fd = nfd
        os.rename(name, "moved_back", src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    finally:
        os.close(parent_fd)
    changes = t.drain()
    assert f"{mid}/f" in changes.removed and f"{mid[: -len(name)]}moved_back/f" in changes.changed
    assert_matches_scan(t)
    remove_tree(root / name)
    t.drain()
    assert_matches_scan(t)
    assert not t.files


@pytest.mark.anyio
async def test_a_big_tree_moved_in_is_walked_by_a_rescan_not_on_the_loop(
    root: Path, track: Track, tmp_path: Path
) -> None:
    """A new directory's walk happens in the pump (the event loop): past WALK_LIMIT entries it stops and leaves
    the rest to a rescan in a worker thread, so one `mv` of a huge tree cannot stall every session."""
    t = track()
    outside = tmp_path / "staging"
    for d in range(6):
        for k in range(WALK_LIMIT // 4):
            write(outside / f"d{d}" / f"f{k}.txt")
    os.rename(outside, root / "moved")
    drained = t.drain()
    assert drained.rescan_needed
    assert len(drained.changed) <= WALK_LIMIT
    changes = await t.changes()
    drained.merge(changes)
    assert len(drained.changed) == 6 * (WALK_LIMIT // 4) and not changes.rescan_needed
    assert_matches_scan(t)


def test_paths_longer_than_path_max(root: Path, track: Track) -> None:
    """Opened one component at a time: no ENAMETOOLONG, nothing dropped."""
    t = track()
    name = "n" * 250
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(24):  # about 6,000 bytes of path
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(leaf, b"x" * 10)
        os.close(leaf)
    finally:
        os.close(fd)
    deep = "/".join([name] * 24) + "/leaf"
    assert len(os.fsencode(deep)) > 4096
    assert deep in t.drain().changed
    assert scan(root).entries[deep].size == 10
    assert_matches_scan(t)


def test_odd_names_survive(root: Path, track: Track) -> None:
    t = track()
    raw = [b"caf\xe9-latin1.txt", b"line\nbreak", b"back\\slash", b"tab\there", "日本語.csv".encode()]
    for name in raw:
        fd = os.open(os.fsencode(root) + b"/" + name, os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
    ch = t.drain()
    assert {os.fsencode(p) for p in ch.changed} == set(raw)
    latin = os.fsdecode(b"caf\xe9-latin1.txt")
    with pytest.raises(UnicodeEncodeError):
        latin.encode("utf-8")  # the caller can tell a name it cannot show
    assert (root / latin).exists()  # and the path opens the very file
    assert_matches_scan(t)


def test_symlinks_and_specials_are_reported_not_followed(root: Path, track: Track, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "secret", b"host data")
    t = track()
    os.symlink(outside, root / "to_dir")
    os.symlink(outside / "secret", root / "to_file")
    os.mkfifo(root / "fifo")
    ch = t.drain()
    assert ch.symlinks == {"to_dir", "to_file"} and ch.specials == {"fifo"} and not ch.changed
    assert not any(p.startswith("to_dir/") for p in t.files)

    # A directory swapped for a symlink: nothing outside is listed or watched.
    write(root / "d/own")
    t.drain()
    watches = t.watches
    shutil.rmtree(root / "d")
    os.symlink(outside, root / "d")
    ch = t.drain()
    assert ch.removed == {"d/own"} and ch.symlinks == {"d"}
    assert t.watches == watches - 1
    write(outside / "more")
    assert not t.drain()
    assert set(t.files) == {"to_dir", "to_file", "fifo", "d"}
    assert_matches_scan(t)


def test_walk_refuses_a_directory_swapped_for_a_symlink_midway(root: Path, tmp_path: Path) -> None:
    """a/b is listed from a, then a becomes a symlink to a folder that also has a b: opening root/a/b now lands
    outside, and the inode check refuses it."""
    write(root / "a/b/mine")
    write(root / "a/z/mine")
    write(tmp_path / "outside/b/secret")
    st = os.lstat(root)

    def swap(rel: str, fd: int, ino: int) -> None:
        if rel == "a/z":  # popped before a/b
            os.rename(root / "a", root / "a_old")
            os.symlink(tmp_path / "outside", root / "a")

    out: dict[str, object] = {}
    tree.walk(str(root), "", st.st_ino, st.st_dev, swap, out)  # type: ignore[arg-type]
    assert not any("secret" in p for p in out)
    with pytest.raises(OSError):
        tree.open_dir(str(root), "a_old/b", os.lstat(root / "a_old/z").st_ino, st.st_dev)


# ---------------------------------------------------------------------------------------------- sharing, quota


def test_one_inotify_instance_shared_by_trackers(tmp_path: Path) -> None:
    lose = threading.Event()
    hub = Inotify(read=_losing_reader(lose))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ta, tb = ChangeTracker(a, hub=hub), ChangeTracker(b, hub=hub)
    try:
        ta.start()
        tb.start()
        write(a / "x/1")
        write(b / "y/2")
        assert ta.drain().changed == {"x/1"}  # pumps the hub for both
        assert tb.drain().changed == {"y/2"}
        write(b / "y/lost")
        lose.set()
        assert ta.drain().rescan_needed and tb.drain().rescan_needed  # an overflow reaches every tracker
        tb.rescan()
        assert tb.drain().changed == {"y/lost"}
        tb.close()
        write(a / "x/3")
        assert ta.drain().changed == {"x/3"}
    finally:
        ta.close()
        tb.close()
        hub.close()


@pytest.mark.anyio
async def test_idle_costs_nothing_and_one_task_reads_a_shared_hub(tmp_path: Path) -> None:
    """While nothing happens the reader task sleeps in the loop's wait on the fd: no thread, no pump. A second
    watch on the same hub waits for the first to stop, then reads in its place."""
    hub = Inotify()
    pumps = 0
    pump = hub.pump

    def counted() -> int:
        nonlocal pumps
        pumps += 1
        return pump()

    hub.pump = counted  # type: ignore[method-assign]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ta, tb = ChangeTracker(a, hub=hub), ChangeTracker(b, hub=hub)
    ta.start()
    tb.start()
    fired: list[str] = []
    threads = threading.active_count()
    try:
        async with anyio.create_task_group() as tg:
            first = anyio.CancelScope()

            async def watch_a() -> None:
                with first:
                    await ta.watch_quota(MiB, lambda used: fired.append("a"))

            tg.start_soon(watch_a)
            tg.start_soon(tb.watch_quota, MiB, lambda used: fired.append("b"))
            await anyio.sleep(0.3)
            assert pumps == 0 and threading.active_count() == threads
            first.cancel()  # the task that read the hub stops: the other takes over
            await anyio.sleep(0.05)
            write(b / "big", b"b" * (2 * MiB))
            with anyio.fail_after(5):
                while not fired:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    finally:
        ta.close()
        tb.close()
        hub.close()
    assert fired == ["b"] and pumps >= 1


def test_no_inotify_falls_back_to_scans(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr("code_interpreter_mcp.backends.local.tracking.changes.Inotify", refuse)
    with ChangeTracker(root) as t:
        write(root / "f")
        assert t.drain().rescan_needed
        t.rescan()
        assert t.drain().changed == {"f"}


def test_quota_counting_holes(root: Path, track: Track) -> None:
    t = track()
    fired: list[int] = []
    t.set_quota(64 * MiB, fired.append, count_holes=True)
    with open(root / "sparse", "wb") as f:
        f.truncate(128 * MiB)
    t.drain()
    assert fired and fired[0] >= 128 * MiB
    t.set_quota(64 * MiB, fired.append)  # by real blocks the folder is nearly empty
    fired.clear()
    t.drain()
    assert not fired


_WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
chunk = b"w" * (1 << 20)
for _ in range(int(sys.argv[2])):
    os.write(fd, chunk)
"""


@pytest.mark.anyio
async def test_quota_callback_stops_a_background_writer(root: Path, track: Track) -> None:
    """A process left running writes past the quota with no run going on: the callback fires from the event
    loop's wait on the inotify fd, and stops it well before it is done."""
    t = track()
    limit, total = 16 * MiB, 1024
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root / "big"), str(total)])
    fired: list[tuple[int, float]] = []
    hit = anyio.Event()

    def exceeded(used: int) -> None:
        if not fired:
            proc.kill()
        fired.append((used, time.monotonic()))
        hit.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(t.watch_quota, limit, exceeded)
            with anyio.fail_after(30):
                await hit.wait()
            tg.cancel_scope.cancel()
    finally:
        proc.kill()
        proc.wait()
    assert fired[0][0] > limit
    assert (root / "big").stat().st_size < total * MiB  # stopped, not finished
    assert t.hub is not None and t.hub.serving is None  # the reader task let go of the fd


@pytest.mark.anyio
async def test_watch_quota_rescans_after_an_overflow(root: Path, track: Track) -> None:
    lose = threading.Event()
    t = track(read=_losing_reader(lose))
    fired = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(t.watch_quota, 4 * MiB, lambda used: fired.set())
        await anyio.sleep(0.05)
        lose.set()  # the event of the big write is lost: only the rescan can see it
        write(root / "big", b"b" * (8 * MiB))
        with anyio.fail_after(10):
            await fired.wait()
        tg.cancel_scope.cancel()
    assert t.usage_bytes >= 8 * MiB


# ---------------------------------------------------------------------------------------------- structures


def test_scan_and_diff_without_a_tracker(root: Path) -> None:
    write(root / "keep", b"1")
    write(root / "drop", b"2")
    write(root / "edit", b"3")
    before = scan(root).entries
    os.unlink(root / "drop")
    write(root / "edit", b"33")
    write(root / "sub/new", b"4")
    os.symlink("keep", root / "ln")
    ch = diff(before, scan(root).entries)
    assert ch == Changes(changed={"edit", "sub/new"}, removed={"drop"}, symlinks={"ln"})


def test_changes_merge_keeps_the_latest_state() -> None:
    first = Changes(changed={"a", "b"}, removed={"c"}, rescan_needed=True, unlinked_writes=1)
    later = Changes(changed={"c"}, removed={"a"}, symlinks={"b"}, unlinked_writes=2)
    first.merge(later)
    assert first == Changes(changed={"c"}, removed={"a"}, symlinks={"b"}, unlinked_writes=3)
