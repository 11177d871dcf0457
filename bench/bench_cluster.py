"""Replicas side by side in one run (issue "Beyond one machine"): two real replicas sharing a real PostgreSQL and
a folder store, talked to over HTTP by the real MCP client.

- forwarded / direct: a warm `run_code("1+1")` of a session homed on A, sent to A (direct) and to B (forwarded to A),
  interleaved call by call so both see the same machine; median and p95 of each, and their ratios;
- adoption: A holds a session with 100 files and a 50 MB namespace, is killed (SIGKILL), and B's first call after
  the lease ran out adopts it: the time of that call (files from the store, variables from the snapshot).
- capacity: with `MAX_LIVE_CONTAINERS=--cap` on every replica, 3 x cap + 3 sessions made through one replica and
  then through haproxy in front of three; the live sessions held (those whose next run finds its worker still
  there, probed newest first) by one replica and by three, and their ratio.

    . .venv/bin/activate && python bench/bench_cluster.py --calls 200 --cap 4
"""

from __future__ import annotations

import argparse
import secrets
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import structured
from tests.infra import haproxy, postgres
from tests.test_cluster import LEASE_S, client, replica
from tests.test_e2e_http import free_port


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def main(calls: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    store = root / "store"
    store.mkdir()
    with postgres() as pg, ExitStack() as stack:
        shared = {
            "DATABASE_URL": pg.create_database("bench_" + secrets.token_hex(4)),
            "STORE_URL": store.as_uri(),
            "CLUSTER_SECRET": secrets.token_hex(32),
        }
        a = stack.enter_context(replica(root / "a", free_port(), shared))
        b = stack.enter_context(replica(root / "b", free_port(), shared))
        async with client(a.mcp) as ca, client(b.mcp) as cb:
            sid = structured(await ca.call_tool("run_code", {"code": "1+1"}))["session_id"]
            args = {"code": "1+1", "session_id": sid}
            for _ in range(20):  # warm both paths
                await ca.call_tool("run_code", args)
                await cb.call_tool("run_code", args)
            direct: list[float] = []
            forwarded: list[float] = []
            for _ in range(calls):
                t = time.perf_counter()
                await ca.call_tool("run_code", args)
                direct.append(time.perf_counter() - t)
                t = time.perf_counter()
                await cb.call_tool("run_code", args)
                forwarded.append(time.perf_counter() - t)
        dm, fm = statistics.median(direct), statistics.median(forwarded)
        d95, f95 = pct(direct, 0.95), pct(forwarded, 0.95)
        print(f"warm run_code 1+1, {calls} calls each, interleaved")
        print(f"  direct    median {dm * 1000:7.2f} ms  p95 {d95 * 1000:7.2f} ms")
        print(f"  forwarded median {fm * 1000:7.2f} ms  p95 {f95 * 1000:7.2f} ms")
        print(f"  ratio     median {fm / dm:5.2f}x       p95 {f95 / d95:5.2f}x   (target median <= 1.3x)")

        code = (
            "import numpy as np\nbig = np.random.default_rng(1).random(50 * 2**20 // 8)\n"
            "for i in range(100): open(f'/mnt/data/f{i:03d}.txt', 'w').write(str(i) * 100)\n"
        )
        async with client(a.mcp) as ca:
            r = structured(await ca.call_tool("run_code", {"code": code}))
            sid = r["session_id"]
            assert r["status"] == "ok", r
        deadline = time.monotonic() + 60
        while not list(store.glob(f"*/snapshots/{sid}/run-*/manifest.json")):
            assert time.monotonic() < deadline, "no snapshot reached the store"
            await anyio.sleep(0.1)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(5)
        await anyio.sleep(LEASE_S + 0.5)
        async with client(b.mcp) as cb:
            t = time.perf_counter()
            r = structured(await cb.call_tool("run_code", {"code": "float(big.sum()) > 0", "session_id": sid}))
            took = time.perf_counter() - t
            assert r["result"] == "True" and r["container"]["state_restored"], r
            every = {"session_id": sid, "limit": 1000, "all_containers": True}
            listed = structured(await cb.call_tool("list_container_files", every))
        print(f"adoption of an idle session, 100 files + 50 MB namespace: first call on B {took:.2f} s (target <= 3 s)")
        print(f"  files listed on B afterwards: {len(listed['files'])}")


async def live_held(url: str, made: int) -> int:
    """Make `made` sessions through `url`, then count those whose worker is still live (newest first: probing a
    live one evicts nothing, and the first evicted one of a replica comes after all of its live ones)."""
    sids = []
    async with client(url) as c:
        for i in range(made):
            r = structured(await c.call_tool("run_code", {"code": f"v = {i}"}))
            assert r["status"] == "ok", r
            sids.append(r["session_id"])
        live = 0
        for sid in reversed(sids):
            r = structured(await c.call_tool("run_code", {"code": "v", "session_id": sid}))
            evicted = r["container"]["state_restored"] is not None or any("make room" in w for w in r["warnings"])
            live += not evicted
    return live


async def capacity(cap: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    made = 3 * cap + 3
    env = {"CODE_INTERPRETER_MAX_LIVE_CONTAINERS": str(cap), "CODE_INTERPRETER_WARM_WORKERS": "0"}
    with postgres() as pg, ExitStack() as stack:
        for name in ("one", "three"):
            (root / name).mkdir()
        one = {"DATABASE_URL": pg.create_database("cap1_" + secrets.token_hex(4)), **env}
        alone = stack.enter_context(replica(root / "one" / "a", free_port(), one))
        single = await live_held(alone.mcp, made)
        alone.proc.terminate()
        store = root / "three" / "store"
        store.mkdir()
        shared = {
            "DATABASE_URL": pg.create_database("cap3_" + secrets.token_hex(4)),
            "STORE_URL": store.as_uri(),
            "CLUSTER_SECRET": secrets.token_hex(32),
            **env,
        }
        group = [stack.enter_context(replica(root / "three" / f"r{i}", free_port(), shared)) for i in range(3)]
        proxy = stack.enter_context(haproxy([r.url.removeprefix("http://") for r in group]))
        three = await live_held(f"http://127.0.0.1:{proxy.port}/mcp", made)
    print(f"live sessions held, MAX_LIVE_CONTAINERS={cap} each, {made} sessions made:")
    print(f"  one replica {single}, three replicas behind haproxy {three}: {three / single:.2f}x (target 3x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--cap", type=int, default=4, help="MAX_LIVE_CONTAINERS of each replica (capacity part)")
    parser.add_argument("--only", choices=["latency", "capacity"], default=None)
    args = parser.parse_args()
    if args.only != "capacity":
        anyio.run(main, args.calls)
    if args.only != "latency":
        anyio.run(capacity, args.cap)
