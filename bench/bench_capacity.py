"""The capacity figures of the local backend (issue 8's local half, issue 12's quota and memory points), printed
from one run, each side by side with its reference, alternating the two sides where there are two.

    python bench/bench_capacity.py [--files 10000] [--trials 200] [--sessions 60] [--cap 20] [--idle-s 10]

- warm `1+1` in a session holding N files against the same in an empty session, same engine, alternating;
- the backend's listing of those N files, and `list_container_files` (one page) over stdio with the stock client;
- idle CPU of the server process (and its workers) with that session open;
- a new session's first `run_code("1+1")` against a warm one (a warm spare adopted; sessions a client-like 0.3 s
  apart so the pool refills), and the first call after start against the minimal server's (`minimal_server.py`),
  both over stdio from process start to the first tool result, alternating;
- S sessions that import pandas against MAX_LIVE_CONTAINERS=C: live workers (sampled after every call) and the
  process tree's RSS, and every session answering a second run;
- numpy matmul inside the sandbox against this process, alternating;
- the disk quota margin: posix_fallocate, 1 MiB writes and four writer processes past a 64 MiB quota.
The engine runs in this process for the in-process figures (so the MCP transport's constant cost does not dilute
the ratios).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mcp import tree_rss_kib

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def tree_rss_mib(root: int) -> float:
    return tree_rss_kib(root)[0] / 1024


def cpu_seconds_of_tree(root: int) -> float:
    """utime+stime of `root` and its live descendants (clock ticks to seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    pids = [root]
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != root:
            pids.append(int(d))
    for pid in pids:
        try:
            rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if pid != root and int(rest[1]) != root and not _below(pid, root):
            continue
        total += int(rest[11]) + int(rest[12])
    return total / tick


def _below(pid: int, root: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == root:
            return True
        seen += 1
    return False


async def run(engine: Engine, session: Any, code: str) -> Any:
    out = await engine.run_code(session, code)
    return out.result


async def warm_ratio_and_idle(data: str, n: int, trials: int, idle_s: float) -> None:
    engine = Engine(Settings(data_dir=data))
    async with engine.running():
        empty = await engine.session_for(None)
        full = await engine.session_for(None)
        made = (
            f"import os\nfor d in range({n // 1000 + 1}):\n    os.makedirs(f'd{{d}}', exist_ok=True)\n"
            f"for i in range({n}):\n    open(f'd{{i // 1000}}/f{{i}}.txt', 'w').write(str(i))\n'made'"
        )
        t = time.perf_counter()
        r = await run(engine, full, made)
        print(f"writing {n} files in one run: {(time.perf_counter() - t) * 1000:.0f} ms ({r.status})")
        for s in (empty, full):
            for _ in range(20):
                await run(engine, s, "1+1")
        e_times: list[float] = []
        f_times: list[float] = []
        for i in range(trials):
            order = [(empty, e_times), (full, f_times)] if i % 2 == 0 else [(full, f_times), (empty, e_times)]
            for s, bucket in order:
                t = time.perf_counter()
                out = await run(engine, s, "1+1")
                bucket.append((time.perf_counter() - t) * 1000)
                assert out.result == "2"
        print(
            f"warm 1+1: empty session median {med(e_times):.2f} ms, {n}-file session {med(f_times):.2f} ms "
            f"-> {med(f_times) / med(e_times):.2f}x (target <= 1.2x)"
        )
        backend = engine.backend
        rec = engine.reg.container_of(full, None)
        assert rec is not None
        lists = []
        for _ in range(20):
            t = time.perf_counter()
            files = await backend.list_files(rec.state)
            lists.append((time.perf_counter() - t) * 1000)
        print(f"backend list_files of {len(files)} files: median {med(lists):.2f} ms")
        elists = []
        for _ in range(10):
            t = time.perf_counter()
            listed = await engine.list_files(full)
            elists.append((time.perf_counter() - t) * 1000)
        print(
            f"engine list_files of the same ({len(listed.files)} FileInfo, harvest check included): median "
            f"{med(elists):.1f} ms"
        )
        await anyio.sleep(1.0)
        pid = os.getpid()
        c0, w0 = cpu_seconds_of_tree(pid), time.monotonic()
        await anyio.sleep(idle_s)
        used = cpu_seconds_of_tree(pid) - c0
        wall = time.monotonic() - w0
        print(
            f"idle server (this process + workers) with the {n}-file session open: {used / wall * 100:.2f}% of a "
            f"core over {wall:.0f} s (target < 1%)"
        )


async def stdio_listing(data: str, n: int) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "code_interpreter_mcp", "serve", "--data-dir", data]
    )
    async with Client(params) as c:
        made = (
            f"import os\nos.makedirs('m', exist_ok=True)\nfor i in range({n}):\n    open(f'm/f{{i}}', 'w').write('x')"
        )
        await c.call_tool("run_code", {"code": made, "timeout_s": 300})
        tool = next(t for t in (await c.list_tools()).tools if t.name == "list_container_files")
        args = {"limit": 100} if "limit" in tool.input_schema.get("properties", {}) else {}
        times = []
        for _ in range(10):
            t = time.perf_counter()
            r = await c.call_tool("list_container_files", args)
            times.append((time.perf_counter() - t) * 1000)
            assert not r.is_error, r.content
        sc = r.structured_content or {}
        shown = sc.get("total", len(sc.get("files", [])))
        print(
            f"list_container_files over stdio, {len(sc.get('files', []))} files in the result of {shown}: median "
            f"{med(times):.1f} ms (target for one page: <= 50 ms)"
        )


async def first_runs(data: str, n: int) -> None:
    """Over stdio with the stock client: close_session, then the default session's next run is a new session's
    first (a spare adopted); the run after it is warm. A client-like 0.3 s between sessions lets the pool refill."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "code_interpreter_mcp", "serve", "--data-dir", data]
    )
    async with Client(params) as c:
        await c.call_tool("run_code", {"code": "1"})
        firsts, warms = [], []
        for _ in range(n):
            await c.call_tool("close_session", {})
            await anyio.sleep(0.3)
            for bucket in (firsts, warms):
                t = time.perf_counter()
                r = await c.call_tool("run_code", {"code": "1+1"})
                bucket.append((time.perf_counter() - t) * 1000)
                assert (r.structured_content or {}).get("result") == "2", r.content
        print(
            f"new session first run_code over stdio: median {med(firsts):.2f} ms, warm {med(warms):.2f} ms -> "
            f"{med(firsts) / med(warms):.2f}x (target <= 2x)"
        )


async def first_call(params: StdioServerParameters) -> float:
    t = time.perf_counter()
    async with Client(params) as c:
        r = await c.call_tool("run_code", {"code": "1+1"})
        assert not r.is_error, r.content
        return (time.perf_counter() - t) * 1000


async def first_call_vs_minimal(starts: int) -> None:
    minimal = StdioServerParameters(command=sys.executable, args=[str(HERE / "minimal_server.py")])
    m, o = [], []
    for _ in range(starts):
        with tempfile.TemporaryDirectory() as data:
            ours = StdioServerParameters(
                command=sys.executable, args=["-m", "code_interpreter_mcp", "serve", "--data-dir", data]
            )
            m.append(await first_call(minimal))
            o.append(await first_call(ours))
    print(
        f"start -> first run_code result: minimal {med(m):.0f} ms, ours {med(o):.0f} ms -> {med(o) / med(m):.2f}x "
        "(target <= 1.5x)"
    )


async def many_sessions(data: str, sessions: int, cap: int) -> None:
    engine = Engine(Settings(data_dir=data, max_live_containers=cap))
    async with engine.running():
        await engine.ready()
        cap_obj = engine.backend._capacity  # type: ignore[attr-defined]
        peak_live, peak_rss = 0, 0.0
        base = tree_rss_mib(os.getpid())
        made = []
        for _ in range(sessions):
            s = await engine.session_for(None)
            out = await run(engine, s, "import pandas as pd\nlen(pd.DataFrame({'a': [1, 2]}))")
            assert out.status == "ok", out
            made.append(s)
            peak_live = max(peak_live, len(cap_obj.live()))
            peak_rss = max(peak_rss, tree_rss_mib(os.getpid()))
        lost = 0
        for s in made:
            out = await run(engine, s, "1+1")
            assert out.result == "2"
            lost += bool(out.container and out.container.state_lost)
            peak_live = max(peak_live, len(cap_obj.live()))
            peak_rss = max(peak_rss, tree_rss_mib(os.getpid()))
        print(
            f"{sessions} sessions with pandas, MAX_LIVE_CONTAINERS={cap}: live workers peak {peak_live} "
            f"(cap {cap}), process tree peak {peak_rss:.0f} MiB (server alone {base:.0f} MiB; target < "
            f"{cap} x 100 MB + server), every session answered, {lost} second runs said state_lost"
        )


async def matmul(data: str, trials: int) -> None:
    import numpy as np

    code = (
        "import numpy as np, time\nif 'A' not in globals():\n    A = np.random.rand(1500, 1500)\n"
        "t = time.perf_counter(); A @ A; (time.perf_counter() - t) * 1000"
    )
    engine = Engine(Settings(data_dir=data))
    async with engine.running():
        s = await engine.session_for(None)
        await run(engine, s, code)
        a = np.random.rand(1500, 1500)
        a @ a
        inside, outside = [], []
        for i in range(trials):
            for side in ("in", "out") if i % 2 == 0 else ("out", "in"):
                if side == "in":
                    inside.append(float((await run(engine, s, code)).result))
                else:
                    t = time.perf_counter()
                    a @ a
                    outside.append((time.perf_counter() - t) * 1000)
        threads = engine.backend.describe().get("blas_threads")
        print(
            f"numpy 1500x1500 matmul: inside {med(inside):.1f} ms, outside {med(outside):.1f} ms -> "
            f"{med(inside) / med(outside):.2f}x (target <= 1.1x; {threads} BLAS threads in the sandbox)"
        )


async def quota_margin(data: str) -> None:
    quota_mb = 64
    engine = Engine(Settings(data_dir=data, box_size_mb=quota_mb))
    cases = {
        "posix_fallocate 90 MiB": "import os\nfd = os.open('f.bin', os.O_CREAT | os.O_WRONLY)\n"
        "os.posix_fallocate(fd, 0, 90 << 20)",
        "1 MiB writes": "i = 0\nwhile True:\n    open(f'w{i}', 'wb').write(b'x' * (1 << 20)); i += 1",
        "4 writer processes": 'import subprocess, sys\nw = "import itertools\\nfor i in itertools.count():\\n'
        "    open('p{}_%d' % i, 'wb').write(b'x' * (1 << 20))\"\n"
        "ps = [subprocess.Popen([sys.executable, '-c', w.format(n)]) for n in range(4)]\n[p.wait() for p in ps]",
    }
    async with engine.running():
        for name, code in cases.items():
            s = await engine.session_for(None)
            out = await run(engine, s, code)
            rec = engine.reg.container_of(s, None)
            assert rec is not None
            folder = Path(data) / "containers" / rec.state.id / "data"
            used = sum(os.lstat(os.path.join(dp, f)).st_blocks * 512 for dp, _, fs in os.walk(folder) for f in fs)
            err = out.error.type if out.error else None
            print(
                f"quota {quota_mb} MiB, {name}: {err}, folder ended {used / MiB - quota_mb:+.1f} MiB past it "
                f"(state_lost={out.container.state_lost if out.container else None})"
            )
            await engine.close_session(s)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--sessions", type=int, default=60)
    ap.add_argument("--cap", type=int, default=20)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--starts", type=int, default=5)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, affinity {len(os.sched_getaffinity(0))}")
    with tempfile.TemporaryDirectory() as data:
        await warm_ratio_and_idle(data, args.files, args.trials, args.idle_s)
    with tempfile.TemporaryDirectory() as data:
        await stdio_listing(data, args.files)
    with tempfile.TemporaryDirectory() as data:
        await first_runs(data, 30)
    await first_call_vs_minimal(args.starts)
    with tempfile.TemporaryDirectory() as data:
        await matmul(data, 20)
    with tempfile.TemporaryDirectory() as data:
        await quota_margin(data)
    with tempfile.TemporaryDirectory() as data:
        await many_sessions(data, args.sessions, args.cap)


if __name__ == "__main__":
    anyio.run(main)
