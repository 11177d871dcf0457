"""Helpers several test modules share: reading tool results, and an MCP client over the openai backend on the
in-process API emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcp import Client
from mcp.types import CallToolResult, TextContent

if TYPE_CHECKING:
    from code_interpreter_mcp.backends.local import LocalBackend
    from tests.emulator import Emulator

MakeBackend = Callable[..., Awaitable["LocalBackend"]]


def structured(r: CallToolResult) -> dict[str, Any]:
    assert r.structured_content is not None, r.content
    return r.structured_content


def text_of(r: CallToolResult) -> str:
    return "\n".join(c.text for c in r.content if isinstance(c, TextContent))


def kernel_module(name: str) -> Any:
    """One of the sandbox's kernel modules, loaded by file path under a private name, as the worker loads it."""
    import importlib.util

    from code_interpreter_mcp.backends.local.kernel import KERNEL_DIR

    spec = importlib.util.spec_from_file_location(f"_test_{name}", KERNEL_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def emulator_client(emu: Emulator, tmp_path: Path, **overrides: Any) -> AsyncIterator[Client]:
    """A real in-memory MCP client over the real server, whose engine runs on OpenAIBackend + the emulator."""
    from code_interpreter_mcp.app import build_server
    from code_interpreter_mcp.backends.openai import OpenAIBackend
    from code_interpreter_mcp.engine import Engine

    settings = emu.settings(tmp_path / "data", **{"reaper_interval_s": 0.2, **overrides})
    backend = OpenAIBackend(settings, http_client=emu.http_client(), retry_base_s=0.01, retry_cap_s=0.05)
    async with Client(build_server(settings, engine=Engine(settings, backend=backend)), raise_exceptions=True) as c:
        yield c


async def snapshot_saved(backend: LocalBackend, session_id: str, run: int = 1, within: float = 20.0) -> None:
    """Wait until the session's namespace snapshot of its `run`-th run (or a later one) is on disk."""
    import anyio

    with anyio.fail_after(within):
        while True:
            snap = backend.snapshots.latest("o_none", session_id)
            if snap is not None and (snap.manifest.get("run") or 0) >= run:
                return
            await anyio.sleep(0.02)
