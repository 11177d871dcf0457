"""Run the OpenAI API emulator on a loopback port: `python -m tests.emulator --port 8790`.

Prints `EMULATOR_URL=http://HOST:PORT/v1` on stdout once it listens (port 0 picks a free one), then serves until
SIGTERM/SIGINT. Behaviours: `--behaviour JSON` and the env var CI_EMULATOR_BEHAVIOUR (JSON), overridden by the
flags; change them later with `POST /_emulator/behaviour`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from types import FrameType

import uvicorn

from .control import Behaviour
from .core import Emulator
from .transports import asgi_app, bind


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--behaviour", help="JSON object of Behaviour fields")
    parser.add_argument("--latency", type=float, help="seconds added to every API call")
    parser.add_argument("--download-latency", type=float, help="seconds added to every file download")
    parser.add_argument("--page-size-cap", type=int)
    parser.add_argument("--idle-expiry", type=float, help="idle seconds before a container expires")
    parser.add_argument("--annotations", choices=["auto", "always", "never"])
    parser.add_argument("--api-key", help="the only key accepted (others get 401)")
    args = parser.parse_args(argv)

    data = json.loads(os.environ.get("CI_EMULATOR_BEHAVIOUR") or "{}")
    data.update(json.loads(args.behaviour or "{}"))
    for flag, name in (
        ("latency", "latency_s"),
        ("download_latency", "download_latency_s"),
        ("page_size_cap", "page_size_cap"),
        ("idle_expiry", "idle_expiry_s"),
        ("annotations", "annotations"),
        ("api_key", "api_key"),
    ):
        if getattr(args, flag) is not None:
            data[name] = getattr(args, flag)
    emulator = Emulator(Behaviour.from_json(data))

    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    print(f"EMULATOR_URL=http://{args.host}:{port}/v1", flush=True)
    config = uvicorn.Config(asgi_app(emulator), log_level="critical", lifespan="off", access_log=False)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown: turn them into SystemExit so the kernels and
    # the temp folder are cleaned up below instead of the process dying on the default handler.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        emulator.close()


if __name__ == "__main__":
    main()
