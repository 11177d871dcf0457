"""Harvest cost and harvested storage of code-interpreter-mcp (local backend), through the real server over stdio
with the stock Python MCP client. Prints the figures the storage half of issue 8 asks for.

    python bench/bench_harvest.py [--files 1000] [--rounds 5] [--mib 50] [--rewrites 5] [--fresh-bytes]
                                  [--containers-dir /dev/shm]

- 1,000 small files written in one run into /mnt/data (harvested) against the same writes into the sandbox's
  /tmp (not harvested): same server, same session, alternating; medians and their ratio (target <= 3x). Two more
  sides say where the time goes: the writes into /mnt/data deleted before the run ends (the sandbox's own cost of
  that disk, nothing harvested) and plain Python making the same files on the host's disk. The files' bytes are
  the same every round (so from the second round on the owner's store holds them and no copy is written);
  `--fresh-bytes` makes them new every round, so every file costs a copy created on the host.
- `--containers-dir` puts the live container folders (each one's /mnt/data) there, e.g. on a tmpfs, while the
  harvested copies stay on the data folder's disk.
- one file of 50 MiB written and then rewritten five times with other bytes: the host storage of the harvested
  copies after (allocated blocks under the data folder's files/), against the file's size (target <= 2x).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

from code_interpreter_mcp.storage.copying import tree_disk_bytes

WRITES = (
    "import os\nos.makedirs({folder!r}, exist_ok=True)\n"
    "for k in range({n}):\n    open(f'{folder}/f{{k}}.txt', 'w').write('row,value\\n' + str(k) * 20)\n"
)
FRESH_WRITES = WRITES.replace("str(k) * 20)", "str(k) * 20 + {folder!r})")


def server(data_dir: str, containers_dir: str | None) -> StdioServerParameters:
    env = {"CODE_INTERPRETER_LOCAL_CONTAINERS_DIR": containers_dir} if containers_dir else None
    return StdioServerParameters(
        command=sys.executable, args=["-m", "code_interpreter_mcp", "serve", "--data-dir", data_dir], env=env
    )


async def timed_run(client: Client, session_id: str, code: str) -> tuple[float, dict]:
    started = time.perf_counter()
    r = await client.call_tool("run_code", {"code": code, "session_id": session_id})
    elapsed = time.perf_counter() - started
    assert r.structured_content is not None and not r.is_error, r.content
    return elapsed, r.structured_content


def host_writes(folder: str, n: int) -> float:
    """The same writes by plain Python on the host, on the data folder's disk: what that disk costs."""
    started = time.perf_counter()
    exec(WRITES.format(folder=folder, n=n), {})
    return time.perf_counter() - started


async def small_files(client: Client, session_id: str, data_dir: Path, n: int, rounds: int, fresh: bool) -> None:
    writes = FRESH_WRITES if fresh else WRITES
    harvested, tmp, host, unharvested = [], [], [], []
    for i in range(rounds):  # a new folder each round: every file is new, as in a fresh run
        t_tmp, _ = await timed_run(client, session_id, writes.format(folder=f"/tmp/r{i}", n=n))
        t_data, res = await timed_run(client, session_id, writes.format(folder=f"/mnt/data/r{i}", n=n))
        assert res["files"] or res["warnings"]
        gone = writes.format(folder=f"/mnt/data/g{i}", n=n) + f"import shutil\nshutil.rmtree('/mnt/data/g{i}')\n"
        t_gone, _ = await timed_run(client, session_id, gone)
        unharvested.append(t_gone)
        host.append(await anyio.to_thread.run_sync(host_writes, str(data_dir / f"host-r{i}"), n))
        tmp.append(t_tmp)
        harvested.append(t_data)
    a, b, c = statistics.median(harvested), statistics.median(tmp), statistics.median(host)
    d = statistics.median(unharvested)
    kind = "new bytes every round" if fresh else "the same bytes every round"
    print(f"{n} small files in one run ({kind}), {rounds} alternating rounds (medians):")
    print(f"  into /mnt/data (harvested) {a * 1e3:8.1f} ms   ({a / n * 1e6:.0f} us a file)")
    print(f"  into /tmp (not harvested)  {b * 1e3:8.1f} ms")
    print(f"  into /mnt/data, removed    {d * 1e3:8.1f} ms   (written and deleted in the run: the sandbox's own")
    print("                                          disk cost, nothing to harvest)")
    print(f"  plain Python, host disk    {c * 1e3:8.1f} ms   (the same writes outside the server)")
    print(f"  ratio to /tmp              {a / b:8.2f}x   (target <= 3x)")
    print(f"  ratio to the host disk     {a / c:8.2f}x")
    print(f"  harvest's share            {max(a - d, 0) / n * 1e6:8.0f} us a file (harvested minus removed)")


async def rewrites(client: Client, session_id: str, files_dir: Path, mib: int, times: int) -> None:
    before = tree_disk_bytes(files_dir)
    code = f"import os\nopen('/mnt/data/big.bin', 'wb').write(os.urandom({mib} << 20))\n"
    for _ in range(times + 1):
        await timed_run(client, session_id, code)
    grown = tree_disk_bytes(files_dir) - before
    size = mib << 20
    print(f"one {mib} MiB file written, then rewritten {times} times with other bytes:")
    print(f"  harvested host storage     {grown / 2**20:8.1f} MiB = {grown / size:.2f}x the file   (target <= 2x)")


async def main(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-harvest-"))
        live = None
        if args.containers_dir:
            live = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-live-", dir=args.containers_dir))
            print(f"live container folders in {live} (LOCAL_CONTAINERS_DIR), harvested files in {data_dir}")
        async with Client(server(data_dir, live)) as client:
            first = await client.call_tool("run_code", {"code": "1+1"})
            assert first.structured_content is not None
            session_id = first.structured_content["session_id"]
            await small_files(client, session_id, Path(data_dir), args.files, args.rounds, args.fresh_bytes)
            other = (await client.call_tool("run_code", {"code": "1"})).structured_content
            assert other is not None
            await rewrites(client, other["session_id"], Path(data_dir) / "files", args.mib, args.rewrites)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--rewrites", type=int, default=5)
    parser.add_argument("--fresh-bytes", action="store_true", help="new bytes in every round's files")
    parser.add_argument(
        "--containers-dir", help="where the live container folders go (LOCAL_CONTAINERS_DIR), e.g. /dev/shm"
    )
    anyio.run(main, parser.parse_args())
