"""What every hostile test needs: a real server with a bystander session, and the bystander's latency while a
hostile call runs. A new hostile case is one test in a `tests/test_hostile_*.py` module calling `during`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
from mcp import Client

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine
from tests.helpers import structured

T = TypeVar("T")

# Generous on purpose (two shared cores): a stalled event loop costs seconds, a busy machine tens of ms.
LATENCY_BOUND_S = 0.5


@dataclass
class Hostile:
    client: Client
    engine: Engine
    bystander: str  # a second session's id: its `1+1` must not wait on the hostile call

    async def call(self, tool: str, args: dict[str, Any]) -> Any:
        return await self.client.call_tool(tool, args)

    async def one_plus_one(self) -> float:
        started = time.monotonic()
        r = await self.client.call_tool("run_code", {"code": "1+1", "session_id": self.bystander})
        assert structured(r)["result"] == "2", r.content
        return time.monotonic() - started

    async def during(self, hostile: Callable[[], Awaitable[T]], *, min_probes: int = 3) -> tuple[T, float]:
        """Run `hostile()` while the bystander runs `1+1` again and again; its result and the worst round trip."""
        done = anyio.Event()
        worst = 0.0
        result: list[T] = []

        async def attack() -> None:
            try:
                result.append(await hostile())
            finally:
                done.set()

        async def probe() -> None:
            nonlocal worst
            probes = 0
            while not done.is_set() or probes < min_probes:
                worst = max(worst, await self.one_plus_one())
                probes += 1
                await anyio.sleep(0.02)

        async with anyio.create_task_group() as tg:
            tg.start_soon(attack)
            tg.start_soon(probe)
        return result[0], worst

    async def alive(self) -> None:
        """The server still answers, in the hostile call's own (default) session too."""
        r = await self.client.call_tool("run_code", {"code": "40 + 2"})
        assert structured(r)["result"] == "42", r.content


@asynccontextmanager
async def hostile_server(tmp_path: Path, **overrides: Any) -> AsyncIterator[Hostile]:
    """The real server over an in-memory MCP client, with a warm bystander session."""
    settings = Settings(**{"data_dir": tmp_path / "data", "default_timeout_s": 30, **overrides})
    engine = Engine(settings)
    async with Client(build_server(settings, engine=engine)) as client:
        await client.call_tool("run_code", {"code": "0"})  # the default session's worker is up
        bystander = (await engine.reg.create_session(None)).id
        h = Hostile(client, engine, bystander)
        await h.one_plus_one()  # its worker too: later round trips measure only waiting
        yield h
