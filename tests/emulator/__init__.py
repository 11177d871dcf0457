"""An emulator of the OpenAI API surface the openai backend uses, for tests and benchmarks.

It executes the code it is sent for real (a persistent Python kernel per container, in a temp folder standing
for /mnt/data; the literal "/mnt/data" in the code is pointed at that folder), so logs and files are real, and
every payload parses with the openai SDK's own models under strict validation. Its "model" runs the first fenced
```python block of the request's input (see `model.py`), cites each new file as [name](sandbox:/mnt/data/name)
with a container_file_citation, and answers a ===BEGIN_JSON <nonce>=== block when the instructions ask for one
(JSON from `sentinel_json`, else the code's last expression, else a marker block the code printed).

In-process (the SDK talks to it through an httpx2 transport, in the caller's event loop):

    emu = Emulator()                                    # or Emulator(Behaviour(latency_s=0.2))
    backend = OpenAIBackend(emu.settings(tmp_path), http_client=emu.http_client())
    engine = Engine(emu.settings(tmp_path), backend=backend)
    client = emu.sdk_client()                           # AsyncOpenAI(..., _strict_response_validation=True)
    emu.behaviour.output_mode = "empty"                # behaviours apply from the next call on
    emu.add_fault("files.content", mode="drop")        # the next download drops mid-stream
    emu.add_fault("responses", 429, retry_after="0.01")
    emu.expire(container_id)
    emu.calls["files.list"], emu.requests[-1].json, emu.container_dir(cid), emu.max_inflight["files.content"]
    emu.close()

Over loopback HTTP: `ThreadServer(emu)` (uvicorn in a thread; `.base_url`, `.close()`), or a separate process
`EmulatorProcess(behaviour={...})` (= `python -m tests.emulator --port N`; `.base_url`, `.control(**changes)`,
`.expire(cid)`, `.state()`, `.reset()`, `.close()`, async `.acontrol()` / `.astate()`). Point a server at it with
OPENAI_BASE_URL=<base_url> OPENAI_API_KEY=<any key> CODE_INTERPRETER_BACKEND=openai. Control endpoints:
GET /_emulator/state, GET /_emulator/requests, POST /_emulator/behaviour (JSON of Behaviour fields),
POST /_emulator/reset, POST /_emulator/containers/{id}/expire.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2

from .control import KINDS, Behaviour, Fault
from .core import Emulator as _CoreEmulator
from .core import EmuRequest, EmuResponse, Recorded, StreamDropped
from .transports import EmulatorProcess, EmulatorTransport, ThreadServer, asgi_app

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from code_interpreter_mcp.config import Settings

BASE_URL = "http://emulator.test/v1"  # any host: the in-process transport answers everything
API_KEY = "emulator-test-key"


class Emulator(_CoreEmulator):
    """The emulator plus conveniences to connect the SDK or the backend to it in-process."""

    def transport(self) -> EmulatorTransport:
        return EmulatorTransport(self)

    def http_client(self, **kwargs: Any) -> httpx2.AsyncClient:
        """An httpx2 client served by this emulator: pass it as OpenAIBackend(..., http_client=...)."""
        return httpx2.AsyncClient(transport=self.transport(), **kwargs)

    def sdk_client(self, api_key: str = API_KEY, max_retries: int = 2, **kwargs: Any) -> AsyncOpenAI:
        """An AsyncOpenAI client with strict response validation, served by this emulator."""
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            base_url=BASE_URL,
            api_key=api_key,
            max_retries=max_retries,
            http_client=self.http_client(),
            _strict_response_validation=True,
            **kwargs,
        )

    def settings(self, data_dir: Path, base_url: str = BASE_URL, **overrides: Any) -> Settings:
        """Settings for the openai backend aimed at this emulator (in-process URL unless base_url is given,
        e.g. a ThreadServer's); overrides are Settings fields."""
        from code_interpreter_mcp.config import Settings

        values: dict[str, Any] = {
            "backend": "openai",
            "data_dir": data_dir,
            "openai_api_key": API_KEY,
            "openai_base_url": base_url,
            "openai_max_retries": 2,
        }
        values.update(overrides)
        return Settings(**values)


__all__ = [
    "API_KEY",
    "BASE_URL",
    "KINDS",
    "Behaviour",
    "EmuRequest",
    "EmuResponse",
    "Emulator",
    "EmulatorProcess",
    "EmulatorTransport",
    "Fault",
    "Recorded",
    "StreamDropped",
    "ThreadServer",
    "asgi_app",
]
