"""Side-by-side latency and memory of code-interpreter-mcp (local backend) and a minimal mcp 2.3 server, both
over stdio with the stock Python MCP client. Prints the figures the local-backend issue asks for.

    python bench/bench_mcp.py [--calls 300] [--rounds 4] [--starts 5] [--sessions 50] [--warm-only]
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
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


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
    """N sessions, each with a live worker, in one engine (this process stands in for the server)."""
    from code_interpreter_mcp.config import Settings
    from code_interpreter_mcp.engine import Engine

    engine = Engine(Settings(data_dir=data_dir))
    async with engine.running():
        before, _ = tree_rss_kib(os.getpid())
        for _ in range(sessions):
            session = await engine.session_for(None)
            r = (await engine.run_code(session, "1+1")).result
            assert r.result == "2"
        await anyio.sleep(1.0)
        total, by_name = tree_rss_kib(os.getpid())
        print(
            f"{sessions} idle sessions: whole tree {total / 1024:.1f} MiB (server process alone before: "
            f"{before / 1024:.1f} MiB); per session {(total - before) / sessions / 1024:.1f} MiB "
            f"(target: worker <= 20 MB, all <= 1536 MiB); by process name: "
            + ", ".join(f"{k}={v / 1024:.1f} MiB" for k, v in sorted(by_name.items()))
        )
        worker_rss = _worker_rss_kib(os.getpid())
        if worker_rss:
            print(
                f"worker python RSS: median {statistics.median(worker_rss) / 1024:.1f} MiB, "
                f"max {max(worker_rss) / 1024:.1f} MiB over {len(worker_rss)} workers"
            )


def _worker_rss_kib(root_pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == root_pid:
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            status = Path(f"/proc/{d}/status").read_text()
        except OSError:
            continue
        if b"worker" in cmd and b"bwrap" not in cmd.split(b"\0")[0]:
            rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            out.append(rss)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--warm-only", action="store_true", help="only the side-by-side warm 1+1 figures")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as data:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
        # Alternate the two servers over several rounds: this 2-core VM drifts between runs (CPU placement of
        # the client, server and worker processes), and alternating spreads the drift over both.
        m: list[float] = []
        o: list[float] = []
        for r in range(args.rounds):
            mr = await warm_calls(minimal(), args.calls)
            orr = await warm_calls(ours(data), args.calls)
            m += mr
            o += orr
            print(
                f"  round {r + 1}: minimal {statistics.median(mr):.3f} ms, ours {statistics.median(orr):.3f} ms "
                f"({statistics.median(orr) / statistics.median(mr):.2f}x)"
            )
        m_med, m_p95 = statistics.median(m), pct(m, 0.95)
        o_med, o_p95 = statistics.median(o), pct(o, 0.95)
        print(f"warm 1+1 over {args.rounds} alternating rounds of {args.calls} calls")
        print(f"warm 1+1  minimal: median {m_med:.3f} ms p95 {m_p95:.3f} ms")
        print(
            f"warm 1+1  ours:    median {o_med:.3f} ms p95 {o_p95:.3f} ms  "
            f"-> {o_med / m_med:.2f}x median (target <= 1.3x), {o_p95 / m_p95:.2f}x p95 (target <= 1.5x)"
        )
        if args.warm_only:
            return
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
