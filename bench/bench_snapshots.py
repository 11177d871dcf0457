"""Cost of namespace snapshots (local backend), measured side by side in one run, in-process through the Engine.

    python bench/bench_snapshots.py [--mb 200] [--runs 30] [--rounds 3]

With a session holding a DataFrame of `--mb` MiB of float64, prints:
1. latency of the next runs (`df.shape`, back to back) with snapshots on vs `snapshots="off"` (target <= 1.1x);
2. writing the snapshot: the run's result returning -> its manifest.json in place, vs a plain `dill.dump` of the
   same namespace from this host process into the same data dir (target <= 2x);
3. restoring after a SIGKILL of the worker: the result's `state_restored.seconds` vs a plain `dill.load` of the file
   from (2) in a fresh Python (which imports pandas as the load needs it, as a new worker must) (target <= 2x),
   and vs one in this process, with the whole run's wall time;
4. no rewrite when nothing changed: `print(1)` a few times writes no new run-<seq> and leaves the manifest alone.
The two engines and the host-side baselines are interleaved round by round (this 2-core VM is noisy).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import dill
import numpy as np
import pandas as pd

from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine

_RUN = re.compile(r"run-(\d+)")
COLS = 10


def rows_for(mb: float) -> int:
    return int(mb * 2**20 / 8 / COLS)


def snap_folder(data_dir: str, session_id: str) -> Path:
    return Path(data_dir) / "files" / "o_none" / "snapshots" / session_id


def latest(folder: Path) -> tuple[int, Path] | None:
    """The newest complete snapshot (a run-<seq> folder with its manifest.json)."""
    best: tuple[int, Path] | None = None
    if folder.is_dir():
        for p in folder.iterdir():
            m = _RUN.fullmatch(p.name)
            if m and (p / "manifest.json").exists() and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), p)
    return best


def seq_of(folder: Path) -> int:
    got = latest(folder)
    return got[0] if got else 0


async def wait_new(folder: Path, after: int, t0: float, timeout: float = 120.0) -> float | None:
    """Seconds from t0 until a snapshot newer than `after` is in place (polled every 5 ms); None on timeout."""
    while time.perf_counter() - t0 < timeout:
        if seq_of(folder) > after:
            return time.perf_counter() - t0
        await anyio.sleep(0.005)
    return None


async def settle(folder: Path, quiet: float = 1.0, timeout: float = 60.0) -> None:
    """Wait until no new snapshot has appeared for `quiet` seconds."""
    t_end = time.perf_counter() + timeout
    last, since = seq_of(folder), time.perf_counter()
    while time.perf_counter() < t_end and time.perf_counter() - since < quiet:
        await anyio.sleep(0.05)
        if (s := seq_of(folder)) != last:
            last, since = s, time.perf_counter()


async def run(engine: Engine, session: Any, code: str) -> Any:
    r = (await engine.run_code(session, code)).result
    if r.error is not None:
        raise RuntimeError(f"{code!r} failed: {r.error}")
    return r


async def timed_runs(engine: Engine, session: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await run(engine, session, "df.shape")
        out.append(time.perf_counter() - t)
    return out


def worker_pid(engine: Engine) -> int:
    containers = list(engine.ctx.backend._containers.live())
    assert len(containers) == 1, f"expected one container, got {len(containers)}"
    return containers[0].worker.worker_pid


def fresh_load_seconds(path: Path) -> float:
    """A plain `dill.load` of the file in a fresh interpreter, as a new worker must do it: the modules the pickle
    names (pandas, numpy) are imported by the load itself. Timed from `import dill` to the loaded object."""
    code = (
        "import time; t = time.perf_counter(); import dill\n"
        f"with open({str(path)!r}, 'rb') as fh: dill.load(fh)\n"
        "print(time.perf_counter() - t)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=200, help="DataFrame size in MiB (float64)")
    ap.add_argument("--runs", type=int, default=30, help="back-to-back runs per engine per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = rows_for(args.mb)
    make_df = f"df = pd.DataFrame(np.random.rand({rows}, {COLS}))"
    cap = max(256.0, args.mb * 2)
    with tempfile.TemporaryDirectory() as d_on, tempfile.TemporaryDirectory() as d_off:
        on = Engine(Settings(data_dir=d_on, memory_mb=4096, snapshot_max_mb=cap))
        off = Engine(Settings(data_dir=d_off, memory_mb=4096, snapshots="off"))
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; DataFrame {rows} x {COLS} float64 = "
            f"{rows * COLS * 8 / 2**20:.1f} MiB; snapshot_max_mb={cap:g}"
        )
        async with on.running(), off.running():
            s_on, s_off = await on.session_for(None), await off.session_for(None)
            folder = snap_folder(d_on, s_on.id)
            for e, s in ((on, s_on), (off, s_off)):
                await run(e, s, "import numpy as np, pandas as pd")
            await settle(folder)
            await run(off, s_off, make_df)
            host_ns = {"df": pd.DataFrame(np.random.rand(rows, COLS))}
            lat_on: list[float] = []
            lat_off: list[float] = []
            writes: list[float] = []
            dumps: list[float] = []
            restores: list[float] = []
            restore_walls: list[float] = []
            loads: list[float] = []
            imports: list[float] = []
            for r in range(args.rounds):
                # 2. the snapshot of a run that made a new DataFrame, vs dill.dump of the same shape from here
                before = seq_of(folder)
                await run(on, s_on, make_df)
                w = await wait_new(folder, before, time.perf_counter())
                if w is None:
                    print(f"  round {r + 1}: FAIL no snapshot appeared within 120 s")
                else:
                    writes.append(w)
                dump_path = Path(d_on) / "dill-baseline.pkl"
                t = time.perf_counter()
                with open(dump_path, "wb") as fh:
                    dill.dump(host_ns, fh)
                dumps.append(time.perf_counter() - t)
                await settle(folder, quiet=0.5)
                # 1. next runs, on vs off, alternating which goes first
                pair = [(on, s_on, lat_on), (off, s_off, lat_off)]
                for e, s, acc in pair if r % 2 == 0 else pair[::-1]:
                    acc += await timed_runs(e, s, args.runs)
                # 3. restore after SIGKILL vs dill.load
                await settle(folder, quiet=0.5)
                os.kill(worker_pid(on), signal.SIGKILL)
                await anyio.sleep(0.3)
                t = time.perf_counter()
                res = await run(on, s_on, "df.shape")
                wall = time.perf_counter() - t
                sr = res.container.state_restored
                if sr is None:
                    print(f"  round {r + 1}: FAIL no state_restored (state_lost={res.container.state_lost})")
                else:
                    restores.append(sr.seconds)
                    restore_walls.append(wall)
                    if "df" not in sr.restored or sr.skipped:
                        print(f"  round {r + 1}: restored={sr.restored} skipped={sr.skipped}")
                t = time.perf_counter()
                with open(dump_path, "rb") as fh:
                    dill.load(fh)
                loads.append(time.perf_counter() - t)
                imports.append(fresh_load_seconds(dump_path))
                print(
                    f"  round {r + 1}: next run on {med(lat_on[-args.runs :]) * 1e3:.2f} ms / off "
                    f"{med(lat_off[-args.runs :]) * 1e3:.2f} ms; write {(w or float('nan')):.3f} s / dump "
                    f"{dumps[-1]:.3f} s; restore {(restores[-1] if sr else float('nan')):.3f} s "
                    f"(run {wall:.3f} s) / load {loads[-1]:.3f} s"
                )
            # 4. nothing changed: no new snapshot, manifest untouched
            await settle(folder)
            got = latest(folder)
            assert got is not None, "no snapshot at all"
            seq0, path0 = got
            mtime0 = (path0 / "manifest.json").stat().st_mtime_ns
            for _ in range(5):
                await run(on, s_on, "print(1)")
            await anyio.sleep(2.0)
            got1 = latest(folder)
            dirs = sorted(p.name for p in folder.iterdir())
            same = got1 is not None and got1[0] == seq0 and (got1[1] / "manifest.json").stat().st_mtime_ns == mtime0

        lo, lf = med(lat_on), med(lat_off)
        print(f"over {args.rounds} rounds:")
        print(
            f"1. next run (df.shape, {len(lat_on)} runs each): on median {lo * 1e3:.2f} ms p95 "
            f"{sorted(lat_on)[int(0.95 * (len(lat_on) - 1))] * 1e3:.2f} ms; off median {lf * 1e3:.2f} ms p95 "
            f"{sorted(lat_off)[int(0.95 * (len(lat_off) - 1))] * 1e3:.2f} ms -> {ratio(lo, lf)} (target <= 1.1x)"
        )
        mw, md = med(writes), med(dumps)
        print(
            f"2. write: result -> manifest.json median {mw:.3f} s ({len(writes)}/{args.rounds} appeared); plain "
            f"dill.dump median {md:.3f} s -> {ratio(mw, md)} (target <= 2x)"
        )
        mr, ml, mi = med(restores), med(loads), med(imports)
        print(
            f"3. restore: state_restored.seconds median {mr:.3f} s (whole run after SIGKILL median "
            f"{med(restore_walls):.3f} s, new worker start included); plain dill.load in a fresh Python (its imports "
            f"of pandas/numpy included, as a new worker must) median {mi:.3f} s -> {ratio(mr, mi)} (target <= 2x); "
            f"dill.load in this process, pandas already imported, median {ml:.3f} s -> {ratio(mr, ml)}"
        )
        print(
            f"4. unchanged namespace, 5x print(1) + 2 s: {'PASS' if same else 'FAIL'} "
            f"(run-{seq0} before; folder now {dirs})"
        )


if __name__ == "__main__":
    anyio.run(main)
