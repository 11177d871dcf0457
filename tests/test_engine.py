"""The engine's one run flow over the capabilities a backend declares, through the engine's own surface (no MCP).

The openai backend on the in-process emulator stands in for any backend with a model; a subclass that declares
it cannot tell when the code finished must still get every file, listed once, after its answer.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from code_interpreter_mcp.backends.base import Capabilities
from code_interpreter_mcp.backends.openai import OpenAIBackend
from code_interpreter_mcp.engine import Engine
from tests.emulator import Emulator

pytestmark = pytest.mark.anyio

ANSWER_DELAY_S = 1.0  # the model's time to write its answer after the code ran
MAKES_THREE = "for i in range(3):\n    open(f'/mnt/data/f{i}.txt', 'w').write('x' * (i + 1))\n"


class NoCodeDoneSignal(OpenAIBackend):
    capabilities = Capabilities(model=True, signals_code_done=False)


async def harvest_timings(
    emu: Emulator, tmp_path: Path, cls: type[OpenAIBackend]
) -> tuple[list[str], float, float, int]:
    """The paths one run harvested, how long after the run's request the container was first listed and how
    long before the run returned, and how many times it was listed."""
    settings = emu.settings(tmp_path / "data")
    engine = Engine(settings, backend=cls(settings, http_client=emu.http_client(), retry_base_s=0.01))
    async with engine.running():
        session = await engine.session_for(None)
        await engine.run_code(session, "print('warm')")
        emu.behaviour.annotations = "never"  # nothing cited: only the listing finds the files
        emu.behaviour.answer_delay_s = ANSWER_DELAY_S
        before = len(emu.requests)
        out = await engine.run_code(session, MAKES_THREE)
        returned = time.monotonic()
    new = emu.requests[before:]
    started = next(r.at for r in new if r.kind == "responses")
    listed = [r.at for r in new if r.kind == "files.list"]
    return [f.path for f in out.result.files], min(listed) - started, returned - min(listed), len(listed)


async def test_a_backend_that_signals_code_done_is_listed_while_the_model_writes(emu: Emulator, tmp_path: Path) -> None:
    paths, _after_request, before_return, listings = await harvest_timings(emu, tmp_path, OpenAIBackend)
    assert paths == ["f0.txt", "f1.txt", "f2.txt"]
    assert before_return > ANSWER_DELAY_S / 2 and listings == 1


async def test_a_backend_without_the_signal_is_listed_once_after_its_answer(emu: Emulator, tmp_path: Path) -> None:
    paths, after_request, _before_return, listings = await harvest_timings(emu, tmp_path, NoCodeDoneSignal)
    assert paths == ["f0.txt", "f1.txt", "f2.txt"]
    assert after_request >= ANSWER_DELAY_S and listings == 1
