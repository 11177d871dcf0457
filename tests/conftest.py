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
from tests.wheels import build_sdist, build_wheel

KIB = 1024
MIB = 1024 * 1024

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


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package tests' own distributions, in one folder (a `find-links` index)."""
    w = tmp_path_factory.mktemp("wheels")
    build_wheel(w, "alpha", "1.0")
    build_wheel(w, "alpha", "2.0")
    build_wheel(w, "beta", "1.0", requires=["alpha>=2"])
    build_wheel(w, "gamma", "1.0", requires=["alpha<2"])
    build_wheel(w, "delta", "1.0")
    build_sdist(w, "srconly", "1.0")
    build_wheel(w, "winonly", "1.0", tag="cp311-cp311-win_amd64")
    build_wheel(w, "big", "1.0", payload_bytes=2 * MIB)
    for name in ("mid-a", "mid-b", "mid-c"):
        build_wheel(w, name, "1.0", payload_bytes=300 * KIB)
    build_wheel(w, "withpth", "1.0", extra_files={"withpth.pth": b"import builtins; builtins.PTH_RAN = True\n"})
    return w


@pytest.fixture(scope="session")
def sandbox_ok() -> None:
    """Skip unless bubblewrap can build the installer sandbox here."""
    from code_interpreter_mcp.packages.sandbox import Bwrap, find_bwrap, probe_bwrap

    path = find_bwrap()
    if path is None or not isinstance(probe_bwrap(path), Bwrap):
        pytest.skip("bubblewrap cannot build the installer sandbox on this machine")
