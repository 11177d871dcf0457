"""Units of the run registry's parts: the live-output buffer, the local capture tail, run rows and wait_s."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from code_interpreter_mcp.backends.local.workers.streaming import MAX_READ, CaptureTail
from code_interpreter_mcp.engine.live import RECENT_LINES, LiveOutput
from code_interpreter_mcp.engine.runs import check_wait
from code_interpreter_mcp.errors import BadInput, SessionBusy
from code_interpreter_mcp.sessions import RunRow


def test_live_output_keeps_head_and_newest_tail_within_its_cap() -> None:
    live = LiveOutput(cap=300)
    for i in range(200):
        live.feed("stdout", f"line {i}\n")
    text, truncated = live.text("stdout")
    assert truncated and text.startswith("line 0\n") and text.endswith("line 199\n")
    assert len(text) < 400 and "characters truncated" in text
    assert live.text("stderr") == ("", False)


def test_live_output_newest_lines_mark_stderr_and_include_a_partial_line() -> None:
    live = LiveOutput(cap=10_000)
    before = live.version
    live.feed("stdout", "a\nb\n")
    live.feed("stderr", "oops\n")
    live.feed("stdout", "progress 50%")
    live.feed("nonsense", "ignored\n")
    assert live.version == before + 3
    assert live.newest().splitlines() == ["a", "b", "stderr: oops", "progress 50%"]
    for i in range(20):
        live.feed("stdout", f"n{i}\n")
    assert len(live.newest().splitlines()) == RECENT_LINES


def test_capture_tail_reads_increments_decodes_across_reads_and_follows_truncation(tmp_path: Path) -> None:
    got: list[tuple[str, str]] = []
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    err = os.open(tmp_path / "err", os.O_RDWR | os.O_CREAT)
    try:
        tail = CaptureTail({"stdout": out, "stderr": err}, lambda s, t: got.append((s, t)))
        os.write(out, "é".encode()[:1])  # half of a two-byte character
        tail.poll()
        os.write(out, "é".encode()[1:] + b"\n")
        os.write(err, b"warn\n")
        tail.poll()
        tail.poll()  # nothing new: nothing passed on
        assert got == [("stdout", "é\n"), ("stderr", "warn\n")]
        os.ftruncate(out, 0)  # the worker's next run starts with empty captures
        tail.poll()
        os.lseek(out, 0, os.SEEK_SET)
        os.write(out, b"x" * (MAX_READ + 10))
        got.clear()
        tail.poll()
        assert got[0][0] == "stdout" and got[0][1].startswith("…[10 bytes skipped]…")
        assert got[0][1].count("x") == MAX_READ
        CaptureTail({"stdout": out}, None).poll()  # no listener: nothing read
    finally:
        os.close(out)
        os.close(err)


def test_run_rows_orphaned_only_when_no_process_runs_them() -> None:
    def row(status: str, pid: int) -> RunRow:
        return RunRow("r_x", "s_x", status, 0.0, None, pid, None)

    assert row("running", os.getpid()).orphaned()  # this process would have it in memory: a restart
    assert not row("ok", os.getpid()).orphaned()
    assert row("running", 2**22 + 12345).orphaned()  # no such process
    assert not row("running", os.getppid()).orphaned()  # a live process (another server) still runs it


def test_wait_s_bounds_and_session_busy_text() -> None:
    assert check_wait(None, 45, 300) == 45 and check_wait(0, 45, 300) == 0
    for bad in (-1, float("nan"), float("inf"), 301, "5"):
        with pytest.raises(BadInput):
            check_wait(bad, 45, 300)  # type: ignore[arg-type]
    busy = SessionBusy("r_abc", "take uploads")
    assert busy.code == "session_busy" and "r_abc" in busy.user_text() and "take uploads" in busy.message
    assert "get_run(run_id='r_abc')" in busy.hint


def test_a_run_row_with_a_json_value_too_deep_to_encode_keeps_the_rest() -> None:
    from code_interpreter_mcp.models import ContainerInfo, RunResult
    from code_interpreter_mcp.sessions import Registry

    deep: list[object] = []
    for _ in range(3000):
        deep = [deep]
    result = RunResult(
        session_id="s_1", container_id="c_1", backend="local", status="ok", result="1",
        container=ContainerInfo(id="c_1", expires_at=None), json=deep,
    )  # fmt: skip
    ((_, params),) = Registry._encoded([("UPDATE runs SET result = ?", (result,))])
    kept = RunResult.model_validate_json(params[0])
    assert kept.result == "1" and kept.json_ is None and kept.status == "ok"
