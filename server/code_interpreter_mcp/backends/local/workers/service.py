"""The backend's own background work on the event loop: a task group that outlives `start()`.

The Backend protocol has no long-running hook (the engine awaits `start()` and later `aclose()`), yet the local
backend needs work that runs between calls: reading inotify events (the disk quota must hold while no call is
made), refilling the warm pool, reaping workers stopped by the quota or an eviction. So `start()` hands one
coroutine to the event loop from a helper thread (`anyio.from_thread.run` with the loop's token); that task opens a
task group and serves `spawn()` requests until `aclose()` cancels it. The helper thread only waits for it: it is
blocked the whole time and costs nothing. Work runs on the event-loop thread itself, which matters for workers: bwrap's
--die-with-parent fires when the thread that forked it exits (launcher.popen).

Owns: that task group and the queue feeding it. Must not know what the work is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import TaskGroup

logger = logging.getLogger(__name__)

Job = Callable[[], Awaitable[Any]]


class Service:
    """Background jobs of one backend, run as tasks on the event loop that called `start()`."""

    def __init__(self, name: str = "ci-local-service") -> None:
        self.name = name
        self._tg: TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._backlog: list[tuple[str, Job]] = []

    async def start(self) -> None:
        token = anyio.lowlevel.current_token()

        def host() -> None:
            try:
                anyio.from_thread.run(self._serve, token=token)
            except BaseException:  # the loop ended without aclose(): nothing left to serve
                logger.debug("background service ended with its event loop", exc_info=True)
            finally:
                self._ready.set()
                self._done.set()

        self._thread = threading.Thread(target=host, name=self.name, daemon=True)
        self._thread.start()
        await anyio.to_thread.run_sync(self._ready.wait, 10.0)

    async def _serve(self) -> None:
        with anyio.CancelScope() as scope:
            self._scope = scope
            async with anyio.create_task_group() as tg:
                self._tg = tg
                backlog, self._backlog = self._backlog, []
                for name, job in backlog:
                    tg.start_soon(self._guarded, name, job)
                self._ready.set()
                await anyio.sleep_forever()
        self._tg = None

    @property
    def running(self) -> bool:
        return self._tg is not None

    def spawn(self, name: str, job: Job) -> None:
        """Run `job()` as a background task (on the event-loop thread only). Its exceptions are logged."""
        if self._tg is None:
            self._backlog.append((name, job))
            return
        self._tg.start_soon(self._guarded, name, job)

    async def _guarded(self, name: str, job: Job) -> None:
        try:
            await job()
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            logger.exception("background job %s failed", name)

    async def aclose(self) -> None:
        scope, self._scope = self._scope, None
        if scope is not None:
            scope.cancel()
        if self._thread is not None:
            await anyio.to_thread.run_sync(self._done.wait, 10.0)
            self._thread = None
