"""The command line: `serve` (the MCP server), `run` (one run through the same engine), `doctor` (what works).

Logs go to stderr only: on stdio, stdout belongs to the protocol.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
from pydantic import ValidationError

from . import __version__
from .config import Settings, load_settings
from .errors import CIError

ANALYSIS_MODULES = ("numpy", "pandas", "matplotlib", "openpyxl")  # the `analysis` extra


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["local", "openai"], help="where code runs (default: local)")
    p.add_argument("--data-dir", help="where sessions and harvested files are kept")
    p.add_argument("--config", help="a TOML file with settings")
    p.add_argument(
        "--unsafe-no-sandbox",
        action="store_true",
        default=None,
        help="run code WITHOUT isolation when no sandbox works (dangerous)",
    )
    p.add_argument("--model", dest="openai_model", help="openai backend: the model")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default), ERROR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="code-interpreter-mcp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    _common(serve)
    serve.add_argument("--transport", choices=["stdio", "http"])
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--expiry-minutes", type=float, dest="expiry_minutes")

    run = sub.add_parser("run", help="run a Python file once and print the RunResult JSON")
    _common(run)
    run.add_argument("file", help="the Python file to run ('-' reads standard input)")
    run.add_argument("--schema", help="a JSON Schema file; the run's JSON result is validated against it")
    run.add_argument("--out", help="copy the files the run produced into this directory")
    run.add_argument("--timeout", type=float, dest="timeout_s", help="wall-clock limit in seconds")
    run.add_argument("--input", action="append", default=[], help="a host file to copy into /mnt/data first")
    run.add_argument("--json-strategy", choices=["two_pass_sentinel", "single_pass"])
    run.add_argument(
        "--package", action="append", default=[], dest="packages", help="a requirement to install first (repeatable)"
    )
    run.add_argument("--quiet", action="store_true", help="do not echo the run's output live on stderr")

    doctor = sub.add_parser("doctor", help="print the detected isolation, backend, data folder and limits")
    _common(doctor)

    config = sub.add_parser("config", help="print a ready-to-paste client configuration with absolute paths")
    config.add_argument("client", choices=["claude-desktop", "cursor", "vscode", "claude-code"])
    config.add_argument("--backend", choices=["local", "openai"], default="local")
    return parser


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {
        "backend": args.backend,
        "data_dir": args.data_dir,
        "unsafe_no_sandbox": args.unsafe_no_sandbox,
        "openai_model": args.openai_model,
        "log_level": args.log_level,
        **extra,
    }
    return load_settings(overrides, config_file=args.config)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def _serve_stdio(server: Any, engine: Any) -> None:
    """stdio until the client closes the pipe, or until SIGTERM/SIGHUP. On a signal the engine is closed first
    (workers stopped, remote containers deleted instead of being left to expire and bill), then the process
    exits: the transport's blocking read of stdin cannot be cancelled."""

    async def stop_on_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                logging.getLogger(__name__).warning("signal %s: shutting down", signum)
                with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                    await engine.aclose()
                logging.shutdown()
                os._exit(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal)
        await server.run_stdio_async()
        tg.cancel_scope.cancel()


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(
        args, transport=args.transport, host=args.host, port=args.port, expiry_minutes=args.expiry_minutes
    )
    _setup_logging(settings.log_level)
    from .app import build_server
    from .engine import Engine

    engine = Engine(settings)
    server = build_server(settings, engine=engine)
    # The start-up heap (modules, models, schemas: some 90,000 objects) lives as long as the process: kept out
    # of the cyclic collector's full passes, which otherwise walk it all again every few runs (80 ms each).
    gc.collect()
    gc.freeze()
    if settings.transport == "stdio":
        anyio.run(_serve_stdio, server, engine)
    else:
        server.run("streamable-http", host=settings.host, port=settings.port)
    return 0


def _copy_out(src: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)


async def _run_once(
    settings: Settings,
    code: str,
    schema: dict[str, Any] | None,
    inputs: list[str],
    timeout_s: float | None,
    strategy: str | None,
    out_dir: Path | None,
    packages: list[str] | None = None,
    live: bool = True,
) -> tuple[dict[str, Any], int]:
    from .engine import Engine
    from .models import dump

    engine = Engine(settings)
    async with engine.running():
        session = await engine.session_for(None)
        result = (
            await engine.run_code(
                session,
                code,
                files=inputs,
                output_schema=schema,
                timeout_s=timeout_s,
                json_strategy=strategy,
                packages=packages or None,
                on_output=_echo if live else None,
            )
        ).result
        payload = dump(result)
        if out_dir is not None:
            for f in result.files:
                if f.local_path:
                    await anyio.to_thread.run_sync(_copy_out, Path(f.local_path), out_dir / f.path)
            payload["out_dir"] = str(out_dir)
        await engine.close_session(session)
    return payload, 0 if result.status == "ok" and result.json_error is None else 1


def _echo(stream: str, text: str) -> None:
    """Live output on stderr as the code prints it (the run waits for completion; stdout gets the JSON)."""
    sys.stderr.write(text)
    sys.stderr.flush()


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging(settings.log_level)
    code = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    schema = None
    if args.schema:
        schema = json.loads(Path(args.schema).read_text(encoding="utf-8"))
    out_dir = Path(args.out).resolve() if args.out else None
    inputs = [os.path.abspath(i) for i in args.input]
    payload, rc = anyio.run(
        _run_once,
        settings,
        code,
        schema,
        inputs,
        args.timeout_s,
        args.json_strategy,
        out_dir,
        args.packages,
        not args.quiet,
    )
    print(json.dumps(payload, indent=2, ensure_ascii=False))
    return rc


async def _doctor(settings: Settings) -> dict[str, Any]:
    from .backends import create_backend

    backend = create_backend(settings)
    report: dict[str, Any] = {
        "version": __version__,
        "python": sys.version.split()[0],
        "data_dir": str(settings.data_dir),
        "backend": settings.backend,
    }
    try:
        await backend.start()
        report["ok"] = True
    except CIError as exc:
        report["ok"] = False
        report["error"] = exc.as_dict()
    try:
        report["details"] = backend.describe()
    finally:
        await backend.aclose()
    report["packages"] = await _packages_report(settings, backend.capabilities)
    report["settings"] = settings.public_view()
    missing = [m for m in ANALYSIS_MODULES if importlib.util.find_spec(m) is None]
    if missing and settings.backend == "local":
        report["warnings"] = [
            f"The sandbox cannot import {', '.join(missing)}: it sees the server's own Python packages. "
            "Install the analysis libraries with: pip install 'code-interpreter-mcp[analysis]'."
        ]
    return report


async def _packages_report(settings: Settings, capabilities: Any) -> dict[str, Any]:
    """Policy, installer, index and cache of packages on demand (the backend's refusal when it has none)."""
    if not capabilities.packages:
        return {"policy": "unsupported", "backend": settings.backend, "preinstalled": capabilities.preinstalled}
    from .packages import PackageManager

    manager = PackageManager(settings)
    try:
        return await manager.describe()
    finally:
        await manager.aclose()


def cmd_doctor(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging(settings.log_level)
    report = anyio.run(_doctor, settings)
    print(json.dumps(report, indent=2, default=str))
    return 0 if report.get("ok") else 1


def client_config(client: str, backend: str) -> str:
    """The snippet for one client, pointing at this interpreter (hosts start servers with a minimal PATH)."""
    command, args = sys.executable, ["-m", "code_interpreter_mcp", "serve"]
    env = {"CODE_INTERPRETER_BACKEND": backend}
    if backend == "openai":
        env["OPENAI_API_KEY"] = "sk-..."
    if client == "claude-code":
        env_flags = " ".join(f"-e {k}={v}" for k, v in env.items())
        return f"claude mcp add code-interpreter {env_flags} -- {command} {' '.join(args)}"
    server = {"command": command, "args": args, "env": env}
    if client == "vscode":
        return json.dumps({"servers": {"code-interpreter": {"type": "stdio", **server}}}, indent=2)
    return json.dumps({"mcpServers": {"code-interpreter": server}}, indent=2)


def cmd_config(args: argparse.Namespace) -> int:
    print(client_config(args.client, args.backend))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *(argv or sys.argv[1:])])
    handlers = {"serve": cmd_serve, "run": cmd_run, "doctor": cmd_doctor, "config": cmd_config}
    try:
        rc = handlers[args.command](args)
    except CIError as exc:
        print(json.dumps({"error": exc.as_dict()}), file=sys.stderr)
        rc = 2
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"code-interpreter-mcp: invalid setting: {problems}", file=sys.stderr)
        rc = 2
    except (OSError, json.JSONDecodeError) as exc:
        print(f"code-interpreter-mcp: {exc}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        rc = 130
    sys.exit(rc)
