"""Side-by-side latency and memory of code-interpreter-mcp (local backend) and a minimal mcp 2.3 server, both
over stdio with the stock Python MCP client. Prints the figures the local-backend issue asks for.

    python bench/bench_mcp.py [--calls 300] [--starts 5] [--sessions 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

HERE = Path(__file__).resolve().parent


def ours(data_dir: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "code_interpreter_mcp", "serve", "--data-dir", data_dir]
    )


def minimal() -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[str(HERE / "minimal_server.py")])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def warm_calls(params: StdioServerParameters, n: int) -> list[float]:
    async with Client(params) as c:
        for _ in range(20):
            await c.call_tool("run_code", {"code": "1+1"})
        out = []
        for _ in range(n):
            t = time.perf_counter()
            r = await c.call_tool("run_code", {"code": "1+1"})
            out.append((time.perf_counter() - t) * 1000)
            assert not r.is_error, r.content
        return out


async def start_to_list(params: StdioServerParameters) -> float:
    t = time.perf_counter()
    async with Client(params) as c:
        await c.list_tools()
        return (time.perf_counter() - t) * 1000


async def first_runs(data_dir: str, n: int) -> list[float]:
    async with Client(ours(data_dir)) as c:
        await c.call_tool("run_code", {"code": "1"})
        out = []
        for _ in range(n):
            await c.call_tool("close_session", {})
            t = time.perf_counter()
            r = await c.call_tool("run_code", {"code": "1+1"})
            out.append((time.perf_counter() - t) * 1000)
            assert r.structured_content["result"] == "2"
        return out


def tree_rss_kib(root_pid: int) -> tuple[int, dict[str, int]]:
    """Total RSS of a process tree and per command name."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, by_name, stack = 0, {}, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        name = next(line.split()[1] for line in status.splitlines() if line.startswith("Name:"))
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        total += rss
        by_name[name] = by_name.get(name, 0) + rss
    return total, by_name


async def idle_memory(data_dir: str, sessions: int) -> None:
    from mcp.client.stdio import stdio_client  # noqa: F401 - same transport as Client(params)

    async with Client(ours(data_dir)) as c:
        ids = []
        for _ in range(sessions):
            await c.call_tool("close_session", {}) if ids else None
            r = await c.call_tool("run_code", {"code": "1+1"})
            ids.append(r.structured_content["session_id"])
        # Keep every session's worker: the closes above only closed the default session before each new one,
        # so re-open N live sessions by passing explicit ids is impossible after close; instead start fresh ones.
        live = []
        for _ in range(sessions):
            r = await c.call_tool("run_code", {"code": "1+1", "session_id": None})
            live.append(r.structured_content["session_id"])
            await c.call_tool("close_session", {}) if False else None
        await anyio.sleep(1.0)
        server_pid = _server_pid()
        total, by_name = tree_rss_kib(server_pid)
        print(
            f"idle tree RSS with live workers: {total / 1024:.1f} MiB; by process: "
            + ", ".join(f"{k}={v / 1024:.1f} MiB" for k, v in sorted(by_name.items()))
        )


def _server_pid() -> int:
    me = os.getpid()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me and b"code_interpreter_mcp" in cmd:
                return int(d)
    raise RuntimeError("server process not found")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as data:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
        m = await warm_calls(minimal(), args.calls)
        o = await warm_calls(ours(data), args.calls)
        m_med, m_p95 = statistics.median(m), pct(m, 0.95)
        o_med, o_p95 = statistics.median(o), pct(o, 0.95)
        print(f"warm 1+1  minimal: median {m_med:.3f} ms p95 {m_p95:.3f} ms")
        print(
            f"warm 1+1  ours:    median {o_med:.3f} ms p95 {o_p95:.3f} ms  "
            f"-> {o_med / m_med:.2f}x median (target <= 1.5x), {o_p95 / m_p95:.2f}x p95 (target <= 2x)"
        )
        ms = [await start_to_list(minimal()) for _ in range(args.starts)]
        os_ = [await start_to_list(ours(data)) for _ in range(args.starts)]
        print(
            f"start->tools/list minimal: median {statistics.median(ms):.0f} ms; ours: median "
            f"{statistics.median(os_):.0f} ms -> {statistics.median(os_) / statistics.median(ms):.2f}x "
            "(target <= 1.3x)"
        )
        f = await first_runs(data, 20)
        print(
            f"new session first run_code (worker start in bwrap incl.): median {statistics.median(f):.1f} ms "
            f"p95 {pct(f, 0.95):.1f} ms (target median <= 150 ms)"
        )
    with tempfile.TemporaryDirectory() as data:
        await idle_memory(data, args.sessions)


if __name__ == "__main__":
    anyio.run(main)
