"""Shared fixtures: the anyio plugin runs every async test on asyncio; a factory of local backends; the OpenAI API
emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from code_interpreter_mcp.backends.local import LocalBackend
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.errors import SandboxUnavailable
from tests.helpers import MakeBackend

if TYPE_CHECKING:
    from tests.emulator import Emulator


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def make_backend(tmp_path: Path) -> AsyncIterator[MakeBackend]:
    """Started local backends with their own data folders (settings overridable), all closed at the end."""
    made: list[LocalBackend] = []

    async def make(**overrides: Any) -> LocalBackend:
        values: dict[str, Any] = {"data_dir": tmp_path / f"data{len(made)}", "interrupt_grace_s": 1.0}
        values.update(overrides)
        backend = LocalBackend(Settings(**values))
        try:
            await backend.start()
        except SandboxUnavailable as exc:
            if values.get("unsafe_no_sandbox"):
                raise
            pytest.skip(f"bubblewrap is not usable on this machine: {exc.message}")
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


@pytest.fixture
def emu() -> Iterator[Emulator]:
    from tests.emulator import Emulator  # only the tests that use it pay for importing openai

    emulator = Emulator()
    yield emulator
    emulator.close()
