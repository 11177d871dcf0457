"""Runs on the openai backend (the API emulator): the code's logs reach progress messages as soon as the stream
carries them, before the model's answer; a run longer than wait_s is collected with get_run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.emulator import Emulator
from tests.helpers import emulator_client, structured

pytestmark = pytest.mark.anyio


async def test_logs_arrive_in_progress_before_the_answer(emu: Emulator, tmp_path: Path) -> None:
    async with emulator_client(emu, tmp_path) as client:
        first = structured(await client.call_tool("run_code", {"code": "1"}))
        messages: list[tuple[float, str]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            messages.append((time.monotonic(), message or ""))

        emu.behaviour.answer_delay_s = 1.5  # the model takes a while to write its answer after the code ran
        r = await client.call_tool(
            "run_code",
            {"code": "print('from the container')", "session_id": first["session_id"]},
            progress_callback=on_progress,
        )
        answered = time.monotonic()
        assert structured(r)["stdout"] == "from the container\n"
        live = [at for at, m in messages if "from the container" in m]
        assert live, messages
        assert answered - live[0] > 0.7, "the logs are shown while the model still writes its answer"


async def test_openai_run_beyond_wait_s_is_collected(emu: Emulator, tmp_path: Path) -> None:
    async with emulator_client(emu, tmp_path) as client:
        emu.behaviour.latency_s = 1.5
        r = structured(await client.call_tool("run_code", {"code": "print('late')", "wait_s": 0.3}))
        assert r["status"] == "running" and r["backend"] == "openai"
        done = structured(await client.call_tool("get_run", {"run_id": r["run_id"], "wait_s": 20}))
        assert done["status"] == "ok" and done["stdout"] == "late\n"
