"""Progress of runs: one relay per run turns the backend's messages and a ticker into strictly increasing values
for the caller's sink; `Relays` holds the runs in progress so the engine's housekeeping loop can tick them.

It knows nothing of how the sink reaches a client (the MCP face passes a coroutine) nor of runs themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

ProgressSink = Callable[[float, float | None, str], Awaitable[None]]


class ProgressRelay:
    """Turns backend messages and a 1 s ticker into strictly increasing progress values for the client."""

    def __init__(self, sink: ProgressSink | None, limit_s: float | None = None) -> None:
        self.sink = sink
        # Progress counts seconds, whose total is unknown: the time limit is a ceiling, not the run's length, so it
        # goes in the message and `total` stays None.
        self.limit_s = limit_s
        self.start = time.monotonic()
        self.last = 0.0
        self.message = "running"

    async def emit(self, message: str | None = None) -> None:
        if message:
            self.message = message
        if self.sink is None:
            return
        value = max(time.monotonic() - self.start, self.last + 0.001)
        self.last = value
        try:
            limit = f" of at most {self.limit_s:g} s" if self.limit_s else ""
            await self.sink(round(value, 3), None, f"{self.message} ({value:.0f} s{limit})")
        except Exception:  # a client that went away must not fail the run
            logger.debug("progress notification failed", exc_info=True)

    async def backend_progress(self, done: float, total: float | None, message: str) -> None:
        await self.emit(message)

    def due(self) -> bool:
        """Runs shorter than a second send nothing; longer ones get a tick about every second."""
        elapsed = time.monotonic() - self.start
        return elapsed >= 1.0 and elapsed - self.last >= 0.9


class Relays:
    """The relays of the runs in progress that have a sink."""

    def __init__(self) -> None:
        self._relays: set[ProgressRelay] = set()

    def add(self, relay: ProgressRelay) -> None:
        if relay.sink is not None:  # nobody listens: no ticks to send
            self._relays.add(relay)

    def discard(self, relay: ProgressRelay) -> None:
        self._relays.discard(relay)

    async def tick(self) -> None:
        for relay in list(self._relays):
            if relay.due():
                await relay.emit()
