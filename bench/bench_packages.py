"""Benchmark of a first package install: `PackageManager.ensure` (policy, resolution, installer sandbox, set store)
against `uv pip install --target` of the same wheel alone, unsandboxed, both from a local wheel folder and both with
a cold cache (a new store, a new uv cache: uv queries the interpreter again), alternating over rounds. The manager
is started first, as a server does at start-up. Prints the medians and their ratio (the issue asks for <= 1.5x).

Then runs through the engine on the local backend: a run in a session whose package set is installed (the steady
state: every later run of a session that asked for packages) against the same run in a session without packages,
alternating; and the first run of a new session whose set is already in the cache against a new session without
packages (both pay for a new container). The issue asks for <= 1.5x.

    python bench/bench_packages.py [--rounds 15] [--runs 300] [--json bench/results/packages.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine
from code_interpreter_mcp.packages import PackageManager
from code_interpreter_mcp.packages.installer import find_tool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.wheels import build_wheel


async def ensure_once(root: Path, wheels: Path, name: str = "benchpkg", pm: PackageManager | None = None) -> float:
    own = pm is None
    if pm is None:
        pm = PackageManager(Settings(data_dir=root, package_find_links=str(wheels)))
        await pm.start()  # what a server does once at start-up: find the installer, probe its sandbox
    started = time.perf_counter()
    got = await pm.ensure([name])
    elapsed = time.perf_counter() - started
    assert not got.reused and got.distributions == [(name, "1.0")]
    if own:
        await pm.aclose()
    return elapsed


def uv_once(uv: str, root: Path, wheels: Path, name: str = "benchpkg", cache: Path | None = None) -> float:
    cache = cache or root / "cache"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root), "UV_CACHE_DIR": str(cache)}
    argv = [uv, "pip", "install", "--target", str(root / "target"), "--python", sys.executable, "--no-index"]
    argv += ["--find-links", str(wheels), "--no-progress", name]
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def small_wheel(folder: Path, name: str) -> None:
    build_wheel(folder, name, "1.0", extra_files={f"{name}/m{i}.py": b"X = 1\n" * 50 for i in range(20)})


async def run_figures(base: Path, wheels: Path, runs: int) -> dict[str, object]:
    """Engine runs with an installed set vs without packages, alternating; medians in ms and their ratios."""
    settings = Settings(data_dir=base / "engine", package_find_links=str(wheels))
    engine = Engine(settings)
    code = plain_code = "x = sum(range(100))\nx"  # the same run; the set is on the first session's sys.path
    async with engine.running():
        await engine.ready()
        plain = await engine.session_for(None)
        with_pkgs = await engine.reg.create_session(None)
        first = await engine.run_code(with_pkgs, "import benchpkg", packages=["benchpkg"])
        assert first.result.packages is not None and first.result.status == "ok", first.result
        await engine.run_code(plain, plain_code)

        async def timed(session: object, text: str, **kw: object) -> float:
            started = time.perf_counter()
            out = await engine.run_code(session, text, **kw)  # type: ignore[arg-type]
            elapsed = time.perf_counter() - started
            assert out.result.status == "ok", out.result
            return elapsed

        steady_pkgs: list[float] = []
        steady_plain: list[float] = []
        for i in range(runs):
            if i % 2 == 0:
                steady_pkgs.append(await timed(with_pkgs, code))
                steady_plain.append(await timed(plain, plain_code))
            else:
                steady_plain.append(await timed(plain, plain_code))
                steady_pkgs.append(await timed(with_pkgs, code))
        new_pkgs: list[float] = []
        new_plain: list[float] = []
        for i in range(max(runs // 20, 5)):
            sessions = [await engine.reg.create_session(None) for _ in range(2)]
            pair = [(new_pkgs, sessions[0], code, ["benchpkg"]), (new_plain, sessions[1], plain_code, None)]
            for sink, session, text, packages in pair if i % 2 == 0 else reversed(pair):
                sink.append(await timed(session, text, packages=packages))
            for session in sessions:
                await engine.close_session(session)

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs) * 1e3, 3)

    return {
        "runs": runs,
        "steady": {"with_set_median_ms": med(steady_pkgs), "without_median_ms": med(steady_plain),
                   "ratio": round(statistics.median(steady_pkgs) / statistics.median(steady_plain), 3)},
        "new_session": {"with_set_median_ms": med(new_pkgs), "without_median_ms": med(new_plain),
                        "ratio": round(statistics.median(new_pkgs) / statistics.median(new_plain), 3),
                        "rounds": len(new_pkgs)},
    }  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tool = find_tool("uv")
    if tool is None:
        raise SystemExit("uv is not installed")
    uv = tool.command[0]
    with tempfile.TemporaryDirectory(prefix="bench-packages-") as tmp:
        base = Path(tmp)
        wheels = base / "wheels"
        small_wheel(wheels, "benchpkg")
        # One warm-up of each, so that the page cache and the bwrap probe are not in the first figure.
        await ensure_once(base / "warm-ensure", wheels)
        uv_once(uv, base / "warm-uv", wheels)
        ours: list[float] = []
        theirs: list[float] = []
        for i in range(args.rounds):
            # Alternate which goes first so that neither always runs on the other's warm caches.
            if i % 2 == 0:
                ours.append(await ensure_once(base / f"e{i}", wheels))
                theirs.append(uv_once(uv, base / f"u{i}", wheels))
            else:
                theirs.append(uv_once(uv, base / f"u{i}", wheels))
                ours.append(await ensure_once(base / f"e{i}", wheels))
        # Warm: a running server's store and a user's uv cache both know the interpreter; each round installs a
        # package neither has seen.
        warm_ours: list[float] = []
        warm_theirs: list[float] = []
        names = [f"warmpkg{i}" for i in range(args.rounds)]
        for name in names:
            small_wheel(wheels, name)
        pm = PackageManager(Settings(data_dir=base / "warm-store", package_find_links=str(wheels)))
        await pm.start()
        await ensure_once(base, wheels, "benchpkg", pm)
        uv_cache = base / "warm-uv-cache"
        uv_once(uv, base / "warm-uv-first", wheels, "benchpkg", uv_cache)
        for i, name in enumerate(names):
            first_ours = i % 2 == 0
            if first_ours:
                warm_ours.append(await ensure_once(base, wheels, name, pm))
            warm_theirs.append(uv_once(uv, base / f"w{i}", wheels, name, uv_cache))
            if not first_ours:
                warm_ours.append(await ensure_once(base, wheels, name, pm))
        await pm.aclose()
        runs = await run_figures(base, wheels, args.runs)

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs) * 1e3, 2)

    result = {
        "rounds": args.rounds,
        "cold": {"ensure_median_ms": med(ours), "uv_install_median_ms": med(theirs),
                 "ratio": round(statistics.median(ours) / statistics.median(theirs), 3)},
        "warm": {"ensure_median_ms": med(warm_ours), "uv_install_median_ms": med(warm_theirs),
                 "ratio": round(statistics.median(warm_ours) / statistics.median(warm_theirs), 3)},
    }  # fmt: skip
    cold, warm = result["cold"], result["warm"]
    print(
        f"first install of a small pure-Python wheel from a local folder, {args.rounds} rounds, alternating\n"
        f"  cold caches:  PackageManager.ensure {cold['ensure_median_ms']:7.2f} ms   "
        f"uv pip install --target {cold['uv_install_median_ms']:7.2f} ms  ratio {cold['ratio']:.2f}x (<= 1.5x)\n"
        f"  warm caches:  PackageManager.ensure {warm['ensure_median_ms']:7.2f} ms   "
        f"uv pip install --target {warm['uv_install_median_ms']:7.2f} ms   ratio {warm['ratio']:.2f}x"
    )
    steady, new = runs["steady"], runs["new_session"]  # type: ignore[index]
    print(
        f"a run with an already-installed set vs the same run without packages (engine, local backend, alternating)\n"
        f"  steady, {args.runs} runs:     with the set {steady['with_set_median_ms']:7.3f} ms   "
        f"without {steady['without_median_ms']:7.3f} ms   ratio {steady['ratio']:.2f}x (<= 1.5x)\n"
        f"  new session, {new['rounds']} rounds: with the set {new['with_set_median_ms']:7.3f} ms   "
        f"without {new['without_median_ms']:7.3f} ms   ratio {new['ratio']:.2f}x (<= 1.5x)"
    )
    result["runs_with_packages"] = runs
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    anyio.run(main)
