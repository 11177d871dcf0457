"""Units of the per-session run queue (engine/queue.py): order, admission against MAX_QUEUED_RUNS, leaving."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import pytest

from code_interpreter_mcp.engine.queue import RunQueue
from code_interpreter_mcp.errors import SessionBusy

pytestmark = pytest.mark.anyio


@dataclass(eq=False)
class _Run:
    id: str


async def test_runs_take_turns_first_in_first_out() -> None:
    queue = RunQueue(max_waiting=32)
    runs = [_Run(f"r{i}") for i in range(5)]
    for run in runs:
        queue.admit("s", run)
    order: list[str] = []

    async def go(run: _Run) -> None:
        await queue.wait_turn("s", run)
        order.append(run.id)
        await anyio.sleep(0.01)
        queue.leave("s", run)

    async with anyio.create_task_group() as tg:
        for run in reversed(runs):  # started in the opposite order: the line decides, not the scheduler
            tg.start_soon(go, run)
    assert order == [r.id for r in runs]
    assert queue.all() == []


def test_admission_refuses_past_max_waiting_naming_the_running_run() -> None:
    queue = RunQueue(max_waiting=2)
    runs = [_Run(f"r{i}") for i in range(5)]
    for run in runs[:3]:
        queue.admit("s", run)
    for run in runs[3:]:
        with pytest.raises(SessionBusy) as info:
            queue.admit("s", run)
        assert info.value.run_id == "r0"
    queue.admit("other", runs[3])  # another session has its own line
    assert queue.position("s", runs[2]) == (2, "r1")
    assert queue.position("s", runs[0]) == (0, None)


def test_leaving_from_the_middle_keeps_the_order_and_the_next_starts_when_the_first_leaves() -> None:
    queue = RunQueue(max_waiting=8)
    a, b, c = _Run("a"), _Run("b"), _Run("c")
    for run in (a, b, c):
        queue.admit("s", run)
    queue.leave("s", b)  # a queued run taken out: it never ran
    assert queue.position("s", c) == (1, "a")
    assert not queue.started("s", c)
    queue.leave("s", a)  # the running one ends, however it ended
    assert queue.started("s", c)
