"""The snapshot store and the host's reading of a snapshot stream, without a sandbox: only complete snapshots are
seen, unchanged parts are linked rather than written, an identical snapshot is not written at all, and a stream
that breaks the rules (hostile: it comes from a fork of user code) leaves the last snapshot as it was."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from code_interpreter_mcp.backends.local.kernel.protocol import HEADER
from code_interpreter_mcp.backends.local.workers.snapshots import Keeper, StreamError
from code_interpreter_mcp.storage.snapshots import SnapshotStore, SnapshotUnreadable

KEY, SID = "o_none", "s_0123456789abcdef"


def frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    return HEADER.pack(len(body)) + body


def part(name: str, body: bytes, digest: str | None = None) -> dict[str, Any]:
    return {"op": "part", "name": name, "kind": "value", "digest": digest or f"d-{body!r}", "pickle": len(body),
            "buffers": [], "bytes": len(body)}  # fmt: skip


def stream(keeper: Keeper, messages: list[tuple[dict[str, Any], bytes | None]], end: dict[str, Any] | None) -> Any:
    """Play a child's side of one stream (answering the host's need/skip) while the host reads it."""
    host, child = socket.socketpair()
    answers: list[bytes] = []

    def play() -> None:
        try:
            child.sendall(frame({"op": "begin", "run": 3, "python": "3.11.7", "dill": "0.4"}))
            for header, body in messages:
                child.sendall(frame(header))
                if header.get("kind") == "value":
                    answer = child.recv(1)
                    answers.append(answer)
                    if answer == b"1" and body is not None:
                        child.sendall(body)
            if end is not None:
                child.sendall(frame(end))
                child.recv(1)
        except OSError:
            pass
        finally:
            child.close()

    player = threading.Thread(target=play)
    player.start()
    try:
        return keeper._receive_sync(host, KEY, SID), answers
    finally:
        host.close()
        player.join()


@pytest.fixture
def keeper(tmp_path: Path) -> Keeper:
    return Keeper(SnapshotStore(tmp_path / "files"), max_bytes=1 << 20, spawn=None)


NP = {"op": "part", "name": "np", "kind": "module", "module": "numpy"}
END = {"op": "end", "skipped": [{"name": "g", "reason": "TypeError: cannot pickle 'generator' object"}], "over": []}


def test_a_snapshot_then_an_unchanged_one_writes_nothing_new(keeper: Keeper) -> None:
    stream(keeper, [(part("a", b"AAAA"), b"AAAA"), (NP, None)], END)
    first = keeper.store.latest(KEY, SID)
    assert first is not None and first.seq == 1
    assert [p["name"] for p in first.parts] == ["a", "np"]
    assert (first.path / first.parts[0]["file"]).read_bytes() == b"AAAA"
    assert first.manifest["skipped"][0]["name"] == "g" and first.manifest["run"] == 3
    assert keeper.store.has(KEY, SID) and keeper.store.used_bytes > 0
    # The same namespace again: the child is told it need not send the bytes, and no snapshot is written.
    _over, answers = stream(keeper, [(part("a", b"AAAA"), b"AAAA"), (NP, None)], END)
    assert answers == [b"0"]
    again = keeper.store.latest(KEY, SID)
    assert again is not None and again.seq == 1
    # One name changed: only its bytes travel; the other is linked; the old snapshot is gone.
    stream(keeper, [(part("a", b"AAAA"), b"AAAA"), (part("b", b"BB"), b"BB")], END)
    third = keeper.store.latest(KEY, SID)
    assert third is not None and third.seq == 2 and [p["name"] for p in third.parts] == ["a", "b"]
    assert (third.path / third.parts[0]["file"]).stat().st_nlink == 1  # the old one's link went with it
    assert sorted(p.name for p in third.path.parent.iterdir()) == ["run-2"]


@pytest.mark.parametrize(
    "messages, why",
    [
        ([(part("a", b"x" * 10) | {"bytes": 2 << 20, "pickle": 2 << 20}, None)], "over the cap"),
        ([(part("a", b"abc") | {"pickle": 1}, b"abc")], "sizes that do not add up"),
        ([({"op": "part", "name": 7, "kind": "value"}, None)], "a name that is not a string"),
        ([({"op": "part", "name": "a", "kind": "shell"}, None)], "an unknown kind"),
        ([(part("a", b"abcdef"), b"abc")], "a part cut short"),
    ],
)
def test_a_stream_that_breaks_the_rules_leaves_the_last_snapshot(keeper: Keeper, messages: Any, why: str) -> None:
    stream(keeper, [(part("a", b"good"), b"good")], END)
    with pytest.raises((StreamError, OSError)):
        stream(keeper, messages, END if why != "a part cut short" else None)
    snap = keeper.store.latest(KEY, SID)
    assert snap is not None and snap.seq == 1 and (snap.path / snap.parts[0]["file"]).read_bytes() == b"good"
    assert [p.name for p in snap.path.parent.iterdir()] == ["run-1"]  # no temporary folder left behind


def test_a_frame_over_the_size_cap_is_refused_before_it_is_read(keeper: Keeper) -> None:
    host, child = socket.socketpair()
    child.sendall(HEADER.pack(1 << 30))
    with pytest.raises(StreamError, match="size cap"):
        keeper._receive_sync(host, KEY, SID)
    host.close()
    child.close()


def test_a_closed_session_gets_no_snapshot_and_bad_ids_name_no_path(keeper: Keeper, tmp_path: Path) -> None:
    stream(keeper, [(part("a", b"1"), b"1")], END)
    keeper.store.delete(KEY, SID)
    assert not (tmp_path / "files" / KEY / "snapshots" / SID).exists() and not keeper.store.has(KEY, SID)
    stream(keeper, [(part("a", b"2"), b"2")], END)  # one still in flight at the close
    assert keeper.store.latest(KEY, SID) is None
    for owner, session in (("o_none", "../../etc"), ("../o_none", SID), ("o_none", "a/b"), ("x", SID)):
        with pytest.raises(ValueError):
            keeper.store.folder(owner, session)


def test_an_unreadable_manifest_is_said_and_a_restart_counts_what_is_on_disk(keeper: Keeper, tmp_path: Path) -> None:
    stream(keeper, [(part("a", b"abc"), b"abc")], END)
    snap = keeper.store.latest(KEY, SID)
    assert snap is not None
    (snap.path / "manifest.json").write_text("[1, 2")
    with pytest.raises(SnapshotUnreadable, match="manifest"):
        keeper.store.latest(KEY, SID)
    (snap.path.parent / ".tmp-leftover").mkdir()  # a server killed mid-write
    fresh = SnapshotStore(tmp_path / "files")
    fresh.scan()
    assert fresh.has(KEY, SID) and fresh.used_bytes > 0  # restoring it will say why it cannot be read
    assert not (snap.path.parent / ".tmp-leftover").exists()
