"""Ways to reach an `Emulator`: an httpx2 transport (in-process, for the SDK's `http_client`), an ASGI app, a
uvicorn server on a loopback port in a thread, and a separate server process (`python -m tests.emulator`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx2

from .core import Emulator, EmuRequest, StreamDropped

ROOT = Path(__file__).resolve().parents[2]  # the repository root, where `tests` is importable


class _Body(httpx2.AsyncByteStream):
    def __init__(self, iterator: AsyncIterator[bytes]) -> None:
        self._iterator = iterator

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._iterator:
                yield chunk
        except StreamDropped as exc:
            raise httpx2.RemoteProtocolError(f"peer closed connection without sending complete body ({exc})") from None

    async def aclose(self) -> None:
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            await aclose()


class EmulatorTransport(httpx2.AsyncBaseTransport):
    """Serve httpx2 requests from an Emulator in the caller's event loop; bodies stream (no buffering)."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        query = parse_qsl(request.url.query.decode(), keep_blank_values=True)
        headers = {k.lower(): v for k, v in request.headers.items()}
        resp = await self.emulator.handle(EmuRequest(request.method, request.url.path, query, headers, body))
        if isinstance(resp.body, bytes):
            return httpx2.Response(resp.status, headers=resp.headers, content=resp.body)
        return httpx2.Response(resp.status, headers=resp.headers, stream=_Body(resp.body))


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def asgi_app(emulator: Emulator) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A raw ASGI app over the emulator. A dropped download raises, so the server cuts the connection."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = parse_qsl(scope["query_string"].decode(), keep_blank_values=True)
        req = EmuRequest(scope["method"], scope["path"], query, headers, b"".join(chunks))
        resp = await emulator.handle(req)
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers]
        await send({"type": "http.response.start", "status": resp.status, "headers": raw_headers})
        if isinstance(resp.body, bytes):
            await send({"type": "http.response.body", "body": resp.body})
            return
        async for chunk in resp.body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket for uvicorn. proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted
    sockets whose proto says TCP, and without it Nagle + delayed ACKs add 40 ms to every reused connection."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class ThreadServer:
    """uvicorn serving an Emulator on a loopback port, in a daemon thread. Use as a context manager."""

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.emulator = emulator
        self._sock = bind(host, port)
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        config = uvicorn.Config(asgi_app(emulator), log_level="critical", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the emulator server did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def __enter__(self) -> ThreadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmulatorProcess:
    """`python -m tests.emulator` in a child process on a loopback port, driven over its control endpoints."""

    def __init__(self, behaviour: dict[str, Any] | None = None, port: int = 0, host: str = "127.0.0.1") -> None:
        cmd = [sys.executable, "-m", "tests.emulator", "--host", host, "--port", str(port)]
        if behaviour:
            cmd += ["--behaviour", json.dumps(behaviour)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("EMULATOR_URL="):
            self.proc.kill()
            raise RuntimeError(f"the emulator process did not start: {line!r}")
        self.base_url = line.split("=", 1)[1]
        self.control_url = self.base_url.rsplit("/v1", 1)[0] + "/_emulator"

    def control(self, **changes: Any) -> dict[str, Any]:
        """Change behaviours (same names as `Behaviour`); returns the emulator's state."""
        return self._post("/behaviour", changes)

    def expire(self, container_id: str) -> dict[str, Any]:
        return self._post(f"/containers/{container_id}/expire", {})

    def reset(self) -> dict[str, Any]:
        return self._post("/reset", {})

    def state(self) -> dict[str, Any]:
        return httpx2.get(self.control_url + "/state", timeout=30).raise_for_status().json()

    async def acontrol(self, **changes: Any) -> dict[str, Any]:
        async with httpx2.AsyncClient(timeout=30) as client:
            return (await client.post(self.control_url + "/behaviour", json=changes)).raise_for_status().json()

    async def astate(self) -> dict[str, Any]:
        async with httpx2.AsyncClient(timeout=30) as client:
            return (await client.get(self.control_url + "/state")).raise_for_status().json()

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return httpx2.post(self.control_url + path, json=payload, timeout=30).raise_for_status().json()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
