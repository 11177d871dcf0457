"""Benchmark of the data folder's change tracking (inotify) against full stat scans: prints its figures.

    python bench/bench_changes.py [--files 10000] [--trials 60] [--idle-s 10] [--json out.json]

Measures, side by side in one run:
- finding the changes of a run that touched 1 file in a folder of N files: `ChangeTracker.drain()` against the
  current full stat scan (`files.scan`, what list_files does today) and the new full-scan fallback
  (`tree.scan` + `diff`), alternating which goes first in each trial; medians and ratios;
- idle CPU over `--idle-s` seconds: a tracker whose quota watch waits on its inotify fd, against the polling
  quota monitor of today (a `files.scan` of the folder every 0.5 s), each in this process (`time.process_time`);
- quota margin: a separate process grows a file past a 128 MiB quota by fallocate (16 MiB a call), by a byte
  written per 4 KiB block (glibc's posix_fallocate when the syscall is refused), then by 1 MiB writes; the time
  from the call that crossed the quota to the callback, and how far past the quota the folder was when the
  callback fired and once the writer was stopped by it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from code_interpreter_mcp.backends.local.tracking import files, tree
from code_interpreter_mcp.backends.local.tracking.changes import ChangeTracker

MiB = 1024 * 1024


def make_folder(root: Path, n: int) -> None:
    for d in range(n // 1000 + 1):
        (root / f"d{d}").mkdir()
    for i in range(n):
        (root / f"d{i // 1000}" / f"f{i}.txt").write_bytes(b"data %d\n" % i)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_one_change(root: Path, n: int, trials: int) -> dict[str, Any]:
    tracker = ChangeTracker(root)
    tracker.start()
    rng = random.Random(1)
    previous = tree.scan(root).entries
    times: dict[str, list[float]] = {"tracker": [], "files_scan": [], "folder_scan_diff": []}
    try:
        for trial in range(trials):
            i = rng.randrange(n)
            with open(root / f"d{i // 1000}" / f"f{i}.txt", "ab") as f:
                f.write(b"+")
            found: dict[str, Any] = {}

            def by_tracker(found: dict[str, Any] = found) -> None:
                found["tracker"] = tracker.drain().changed

            def by_files_scan() -> None:
                files.scan(root)

            def by_folder_scan(found: dict[str, Any] = found) -> None:
                nonlocal previous
                now = tree.scan(root).entries
                found["scan"] = tree.diff(previous, now).changed
                previous = now

            order = [("tracker", by_tracker), ("files_scan", by_files_scan), ("folder_scan_diff", by_folder_scan)]
            if trial % 2:
                order.reverse()
            for name, fn in order:
                times[name].append(timed(fn))
            if found["tracker"] != found["scan"] or len(found["tracker"]) != 1:
                raise SystemExit(f"disagreement: tracker {found['tracker']} vs scan {found['scan']}")
    finally:
        tracker.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "files": n,
        "trials": trials,
        "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "ratio_files_scan_over_tracker": round(med["files_scan"] / med["tracker"], 1),
        "ratio_folder_scan_over_tracker": round(med["folder_scan_diff"] / med["tracker"], 1),
    }


def idle_tracker_cpu(root: Path, seconds: float) -> float:
    async def main() -> float:
        tracker = ChangeTracker(root)
        await anyio.to_thread.run_sync(tracker.start)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(tracker.watch_quota, 1 << 40, lambda used: None)
                await anyio.sleep(0.2)
                cpu = time.process_time()
                await anyio.sleep(seconds)
                cpu = time.process_time() - cpu
                tg.cancel_scope.cancel()
        finally:
            tracker.close()
        return cpu

    return anyio.run(main)


def idle_polling_cpu(root: Path, seconds: float) -> float:
    stop = threading.Event()

    def monitor() -> None:
        while not stop.wait(0.5):
            files.scan(root, with_files=False)

    thread = threading.Thread(target=monitor, daemon=True)
    cpu = time.process_time()
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join()
    return time.process_time() - cpu


_WRITER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
step, steps, how = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
chunk = b"w" * step
for i in range(steps):
    if how == "fallocate":
        os.posix_fallocate(fd, i * step, step)
    elif how == "blocks":  # what glibc's posix_fallocate does when the syscall is refused: a byte per block
        for offset in range(i * step, (i + 1) * step, 4096):
            os.pwrite(fd, b"\\0", offset)
    else:
        os.write(fd, chunk)
    os.write(1, b"%d %d\\n" % (time.monotonic_ns(), (i + 1) * step))
"""


def quota_margin(root: Path, limit: int, step: int, steps: int, how: str) -> dict[str, Any]:
    """A writer process allocates `step` bytes per call (fallocate or write) towards steps*step; the quota
    callback kills it. The writer logs CLOCK_MONOTONIC after each call, so the reaction time is measured from the
    call that crossed the limit to the callback."""

    async def main() -> dict[str, Any]:
        target = root / "grow.bin"
        tracker = ChangeTracker(root)
        tracker.start()
        base = tracker.usage_bytes
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(target), str(step), str(steps), how], stdout=subprocess.PIPE
        )
        fired: list[tuple[int, int]] = []
        hit = anyio.Event()

        def exceeded(used: int) -> None:
            if not fired:
                proc.kill()
                fired.append((used, time.monotonic_ns()))
                hit.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(tracker.watch_quota, base + limit, exceeded)
                with anyio.fail_after(60):
                    await hit.wait()
                tg.cancel_scope.cancel()
        finally:
            proc.kill()
            log = proc.communicate()[0].decode().split()
            tracker.close()
        final = os.lstat(target).st_blocks * 512
        target.unlink()
        calls = [(int(t), int(n)) for t, n in zip(log[::2], log[1::2], strict=True)]
        crossed = next((t for t, n in calls if n > limit), None)
        used, at = fired[0]
        return {
            "how": how,
            "limit_mib": limit // MiB,
            "step_mib": step / MiB,
            "over_at_callback_mib": round((used - base - limit) / MiB, 1),
            "over_when_stopped_mib": round((final - limit) / MiB, 1),
            # None: stopped inside the call that crossed the limit, before it returned
            "reaction_ms": round((at - crossed) / 1e6, 3) if crossed is not None else None,
            "writer_would_reach_mib": step * steps // MiB,
        }

    return anyio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-changes-") as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        started = time.perf_counter()
        make_folder(root, args.files)
        print(f"folder of {args.files} files made in {time.perf_counter() - started:.1f} s", flush=True)

        one = bench_one_change(root, args.files, args.trials)
        results["one_change"] = one
        m = one["median_ms"]
        print(
            f"changes of a run that touched 1 file of {args.files}, median of {args.trials} alternating trials:\n"
            f"  tracker.drain()        {m['tracker']:9.3f} ms\n"
            f"  files.scan (today)     {m['files_scan']:9.3f} ms  ({one['ratio_files_scan_over_tracker']}x)\n"
            f"  tree.scan + diff     {m['folder_scan_diff']:9.3f} ms  ({one['ratio_folder_scan_over_tracker']}x)",
            flush=True,
        )

        tracked = idle_tracker_cpu(root, args.idle_s)
        polled = idle_polling_cpu(root, args.idle_s)
        results["idle_cpu"] = {
            "seconds": args.idle_s,
            "tracker_cpu_s": round(tracked, 4),
            "polling_cpu_s": round(polled, 4),
            "tracker_core_pct": round(100 * tracked / args.idle_s, 3),
            "polling_core_pct": round(100 * polled / args.idle_s, 2),
        }
        i = results["idle_cpu"]
        print(
            f"idle CPU over {args.idle_s:g} s with {args.files} files: tracker (quota watch waiting on its fd) "
            f"{i['tracker_cpu_s']} s = {i['tracker_core_pct']}% of a core; polling scan every 0.5 s "
            f"{i['polling_cpu_s']} s = {i['polling_core_pct']}%",
            flush=True,
        )

        results["quota_margin"] = []
        for how, step in (("fallocate", 16 * MiB), ("blocks", 16 * MiB), ("write", MiB)):
            q = quota_margin(root, 128 * MiB, step, 1024 * MiB // step, how)
            results["quota_margin"].append(q)
            when = (
                f"callback {q['reaction_ms']} ms after the call that crossed it returned"
                if q["reaction_ms"] is not None
                else "callback before the call that crossed it returned"
            )
            print(
                f"quota {q['limit_mib']} MiB, a process doing {how} of {q['step_mib']:g} MiB per call (would reach "
                f"{q['writer_would_reach_mib']} MiB): {when}, {q['over_at_callback_mib']} MiB over then, "
                f"{q['over_when_stopped_mib']} MiB over once stopped",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
