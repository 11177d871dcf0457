"""The per-session run queue: runs of one session go one after another, first in first out, as notebook cells.

It owns the order of a session's runs only: who is next, a run's place in line, admission against
`MAX_QUEUED_RUNS`, and taking a run out of the line. Each run's own call stays independent: a run that fails does
not touch the runs behind it. It knows nothing of how a run goes, nor of MCP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import anyio

from ..errors import SessionBusy


class Queued(Protocol):
    id: str


@dataclass
class _Line:
    runs: list[Queued] = field(default_factory=list)  # the first is running (or about to)
    turns: dict[str, anyio.Event] = field(default_factory=dict)


class RunQueue:
    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._lines: dict[str, _Line] = {}

    def admit(self, session_id: str, run: Queued) -> None:
        """Put `run` at the end of its session's line; SessionBusy when `max_waiting` runs already wait."""
        line = self._lines.setdefault(session_id, _Line())
        waiting = max(len(line.runs) - 1, 0)
        if line.runs and waiting >= self.max_waiting:
            raise SessionBusy(
                line.runs[0].id,
                f"queue another run ({waiting} already wait behind it; MAX_QUEUED_RUNS={self.max_waiting})",
            )
        line.runs.append(run)
        line.turns[run.id] = turn = anyio.Event()
        if len(line.runs) == 1:
            turn.set()

    async def wait_turn(self, session_id: str, run: Queued) -> None:
        """Until `run` is first in its line (at once when it is)."""
        await self._lines[session_id].turns[run.id].wait()

    def leave(self, session_id: str, run: Queued) -> None:
        """`run` ended or was taken out of the line: the next one's turn comes when the first one leaves."""
        line = self._lines.get(session_id)
        if line is None or run not in line.runs:
            return
        line.runs.remove(run)
        line.turns.pop(run.id, None)
        if not line.runs:
            del self._lines[session_id]
            return
        line.turns[line.runs[0].id].set()

    def position(self, session_id: str, run: Queued) -> tuple[int, str | None]:
        """(place among the waiting runs, 1 = next; the run just ahead); (0, None) for the running run."""
        line = self._lines.get(session_id)
        if line is None or run not in line.runs:
            return 0, None
        i = line.runs.index(run)
        return i, line.runs[i - 1].id if i > 0 else None

    def started(self, session_id: str, run: Queued) -> bool:
        line = self._lines.get(session_id)
        return line is not None and bool(line.runs) and line.runs[0] is run

    def of_session(self, session_id: str) -> list[Queued]:
        line = self._lines.get(session_id)
        return list(line.runs) if line is not None else []

    def all(self) -> list[Queued]:
        return [run for line in self._lines.values() for run in line.runs]
