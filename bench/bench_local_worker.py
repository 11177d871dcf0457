"""Benchmark of the local backend (bubblewrap worker): prints its figures, optionally saves them as JSON.

    python bench/bench_local_worker.py [--n 2000] [--containers 50] [--json bench/results/local.json]

Measures, through LocalBackend's public API:
- warm `1+1` execute, and execute + list_files (what the engine does per run), median / p95 / p99;
- create_container + first execute of a new container (worker start in bwrap included);
- the first matplotlib plot in a new container, with and without the prebuilt font cache;
- idle RSS/PSS of one worker and of bwrap's processes, and the total for N idle containers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from code_interpreter_mcp.backends.base import ExecRequest, no_progress
from code_interpreter_mcp.backends.local import LocalBackend
from code_interpreter_mcp.config import Settings


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values) * 1e3, 3),
        "p95_ms": round(pct(values, 0.95) * 1e3, 3),
        "p99_ms": round(pct(values, 0.99) * 1e3, 3),
        "n": len(values),
    }


def mem_of(pid: int | None) -> dict[str, int]:
    out = {"rss": 0, "pss": 0}
    if pid is None:
        return out
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    out["rss"] = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    out["pss"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def container_mem(backend: LocalBackend, cid: str) -> dict[str, dict[str, int]]:
    c = backend._containers.get(cid)
    assert c is not None and c.worker is not None
    return {name: mem_of(pid) for name, pid in c.worker.process.pids().items()}


async def bench(n: int, n_containers: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        backend = LocalBackend(settings)
        t0 = time.perf_counter()
        await backend.start()
        results["start_s"] = round(time.perf_counter() - t0, 3)
        results["describe"] = backend.describe()
        try:
            # Warm 1+1.
            c = await backend.create_container("bench", 3600)
            req = ExecRequest(code="1+1", timeout_s=30)
            for _ in range(200):
                await backend.execute(c, req, no_progress)
            times = []
            for _ in range(n):
                t = time.perf_counter()
                out = await backend.execute(c, req, no_progress)
                times.append(time.perf_counter() - t)
            assert out.result_repr == "2", out
            results["execute_1plus1"] = summary_ms(times)
            list_times = []
            both = []
            for _ in range(n):
                t = time.perf_counter()
                await backend.execute(c, req, no_progress)
                t1 = time.perf_counter()
                await backend.list_files(c)
                t2 = time.perf_counter()
                list_times.append(t2 - t1)
                both.append(t2 - t)
            results["list_files_empty"] = summary_ms(list_times)
            results["execute_plus_list_files"] = summary_ms(both)
            await backend.execute(
                c, ExecRequest(code="for i in range(5): open(f'f{i}.txt','w').write('x')", timeout_s=30), no_progress
            )
            list5 = []
            for _ in range(n):
                t = time.perf_counter()
                await backend.list_files(c)
                list5.append(time.perf_counter() - t)
            results["list_files_5_files"] = summary_ms(list5)
            results["idle_memory_one_container"] = container_mem(backend, c.id)
            await backend.destroy(c)

            # New container: create + first execute.
            firsts = []
            creates = []
            for _ in range(20):
                t = time.perf_counter()
                c = await backend.create_container("bench", 3600)
                t1 = time.perf_counter()
                await backend.execute(c, req, no_progress)
                firsts.append(time.perf_counter() - t)
                creates.append(t1 - t)
                await backend.destroy(c)
            results["create_container"] = summary_ms(creates)
            results["create_plus_first_execute"] = summary_ms(firsts)

            # First plot in a new container, with the prebuilt font cache (as configured) and without,
            # interleaved so page-cache warmth favours neither.
            plot = ExecRequest(code="import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\n'ok'", timeout_s=60)
            pool = backend._pool
            assert pool is not None
            saved = pool.mpl_cache
            timings: dict[bool, list[float]] = {True: [], False: []}
            for i in range(12):
                cached = i % 2 == 0
                pool.mpl_cache = saved if cached else None
                c = await backend.create_container("bench", 3600)
                t = time.perf_counter()
                await backend.execute(c, plot, no_progress)
                timings[cached].append(time.perf_counter() - t)
                await backend.destroy(c)
            pool.mpl_cache = saved
            results["first_plot_prebuilt_font_cache"] = summary_ms(timings[True])
            results["first_plot_fresh_font_cache"] = summary_ms(timings[False])

            # Many idle containers.
            many = []
            t = time.perf_counter()
            for _ in range(n_containers):
                many.append(await backend.create_container("bench", 3600))
            results["create_many_s"] = round(time.perf_counter() - t, 3)
            for c in many:
                await backend.execute(c, req, no_progress)
            total_rss = total_pss = 0
            for c in many:
                for m in container_mem(backend, c.id).values():
                    total_rss += m["rss"]
                    total_pss += m["pss"]
            results["idle_containers"] = {
                "count": n_containers,
                "total_rss_mib": round(total_rss / 2**20, 1),
                "total_pss_mib": round(total_pss / 2**20, 1),
            }
            for c in many:
                await backend.destroy(c)
        finally:
            await backend.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="iterations of the warm measurements")
    parser.add_argument("--containers", type=int, default=50, help="idle containers for the memory figure")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    results = anyio.run(bench, args.n, args.containers)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    one = results["idle_memory_one_container"]
    print(
        f"\nwarm 1+1 execute: {results['execute_1plus1']['median_ms']} ms median; "
        f"execute+list_files: {results['execute_plus_list_files']['median_ms']} ms; "
        f"create+first execute: {results['create_plus_first_execute']['median_ms']} ms; "
        f"idle worker RSS {one['worker']['rss'] / 2**20:.1f} MiB (bwrap "
        f"{sum(v['rss'] for k, v in one.items() if k != 'worker') / 2**20:.1f} MiB); "
        f"{results['idle_containers']['count']} idle containers: {results['idle_containers']['total_rss_mib']} MiB RSS"
        f" / {results['idle_containers']['total_pss_mib']} MiB PSS",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
