"""LocalBackend against real bubblewrap workers: state, output capture, errors, timeouts, death, files, lifecycle.

Escape attempts (network, host files, fork/memory bombs, uid, env) are in test_sandbox_escape.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from code_interpreter_mcp.backends.base import (
    Backend,
    ContainerState,
    ExecOutcome,
    ExecRequest,
    StructuredRequest,
    no_progress,
)
from code_interpreter_mcp.backends.local import LocalBackend
from code_interpreter_mcp.backends.local.sandbox import bubblewrap, uids
from code_interpreter_mcp.backends.local.sandbox import profile as sandbox_mod
from code_interpreter_mcp.backends.local.sandbox.profile import mount_table_path
from code_interpreter_mcp.backends.local.workers.process import WorkerProcess
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.errors import (
    BackendError,
    ContainerExpired,
    FileNotFound,
    FileTooLarge,
    PathRefused,
    SandboxUnavailable,
)
from tests.helpers import MakeBackend, snapshot_saved

pytestmark = pytest.mark.anyio


@pytest.fixture
async def backend(make_backend: MakeBackend) -> LocalBackend:
    return await make_backend()


@pytest.fixture
async def container(backend: LocalBackend) -> ContainerState:
    return await backend.create_container("session-1", 600)


async def run(
    backend: LocalBackend,
    container: ContainerState,
    code: str,
    timeout: float = 20.0,
    structured: bool = False,
    run_number: int = 1,
) -> ExecOutcome:
    sreq = StructuredRequest(schema={"type": "object"}, nonce="0" * 32) if structured else None
    request = ExecRequest(code=code, timeout_s=timeout, structured=sreq, run_number=run_number)
    return await backend.execute(container, request, no_progress)


def worker_of(backend: LocalBackend, container_id: str) -> WorkerProcess | None:
    c = backend._containers.get(container_id)
    assert c is not None
    return c.worker


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ------------------------------------------------------------------------------------------------ basics


async def test_protocol_conformance_and_describe(backend: LocalBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.name == "local"
    assert backend.isolation == "bubblewrap"
    facts = backend.describe()
    assert facts["isolation"] == "bubblewrap"
    assert facts["bwrap"] and facts["bwrap_version"]
    assert facts["limits"]["memory_mb"] == backend.settings.memory_mb
    assert facts["network"].startswith("none")
    assert await backend.repair_json({"type": "object"}, "{", ["bad"]) is None


async def test_container_id_and_data_folder(backend: LocalBackend, container: ContainerState) -> None:
    assert re.fullmatch(r"lc_[0-9a-f]{24}", container.id)
    assert container.status == "running" and container.backend == "local"
    assert container.usable()
    data = backend.settings.containers_dir / container.id / "data"
    assert data.is_dir()
    out = await run(backend, container, "import os\nopen('made.txt', 'w').write('hi')\nos.getcwd()")
    assert out.status == "ok", out
    assert out.result_repr == "'/mnt/data'"
    assert (data / "made.txt").read_text() == "hi"
    other = await backend.create_container("session-2", 600)
    assert other.id != container.id


async def test_live_folders_where_the_operator_puts_them(make_backend: MakeBackend, tmp_path: Path) -> None:
    """LOCAL_CONTAINERS_DIR (a tmpfs in practice): the live folders go there, not under the data dir, and the
    sandbox's mount table names them by their path within that filesystem, as doctor says."""
    live = tmp_path / "live"
    backend = await make_backend(local_containers_dir=live)
    container = await backend.create_container("s", 600)
    out = await run(backend, container, "open('made.txt', 'w').write('hi')")
    assert out.status == "ok", out
    assert (live / container.id / "data" / "made.txt").read_text() == "hi"
    assert not (backend.settings.data_dir / "containers" / container.id).exists()
    assert backend.describe()["data_folder_in_mount_table"] == mount_table_path(live) + "/<container>/data"


async def test_state_persists_between_runs(backend: LocalBackend, container: ContainerState) -> None:
    first = await run(backend, container, "import math\nx = 41\ndef f(v):\n    return v + 1")
    assert first.status == "ok" and first.result_repr is None and not first.state_lost
    second = await run(backend, container, "f(x), math.pi > 3")
    assert second.status == "ok"
    assert second.result_repr == "(42, True)"
    assert not second.state_lost


async def test_last_expression_and_print(backend: LocalBackend, container: ContainerState) -> None:
    out = await run(backend, container, "print('hello')\ny = 6 * 7\ny")
    assert (out.stdout, out.stderr, out.result_repr) == ("hello\n", "", "42")
    none = await run(backend, container, "print('only print')")
    assert none.result_repr is None and none.stdout == "only print\n"
    underscore = await run(backend, container, "_ + 1")
    assert underscore.result_repr == "43"
    hidden = await run(backend, container, "z = 'é'\nz * 2;  # Jupyter: a trailing semicolon hides the value")
    assert hidden.status == "ok" and hidden.result_repr is None
    shown = await run(backend, container, "z = 'é'; z * 2")
    assert shown.result_repr == "'éé'"
    top_await = await run(backend, container, "import asyncio\nawait asyncio.sleep(0)\n'awaited'")
    assert top_await.status == "ok" and top_await.result_repr == "'awaited'"
    main = await run(
        backend, container, "class P: pass\nimport pickle\npickle.loads(pickle.dumps(P())).__class__.__name__"
    )
    assert main.result_repr == "'P'", main


async def test_exception_traceback_trimmed(backend: LocalBackend, container: ContainerState) -> None:
    out = await run(backend, container, "def g():\n    return 1 / 0\nprint('before')\ng()")
    assert out.status == "error"
    assert out.stdout == "before\n"
    assert out.error is not None
    assert out.error.type == "ZeroDivisionError"
    assert out.error.message == "division by zero"
    tb = out.error.traceback or ""
    assert tb.startswith("Traceback (most recent call last):")
    assert '"<cell 1>", line 4' in tb and "return 1 / 0" in tb
    assert "worker.py" not in tb and "protocol.py" not in tb
    # The worker survives errors with its state.
    assert (await run(backend, container, "2 + 2")).result_repr == "4"


async def test_syntax_error(backend: LocalBackend, container: ContainerState) -> None:
    out = await run(backend, container, "x = 1\ndef broken(:\n    pass")
    assert out.status == "error" and out.error is not None
    assert out.error.type == "SyntaxError"
    assert "line 2" in (out.error.traceback or "")
    assert "worker.py" not in (out.error.traceback or "")
    # Nothing of the cell ran.
    assert (await run(backend, container, "'x' in dir()")).result_repr == "False"


async def test_system_exit(backend: LocalBackend, container: ContainerState) -> None:
    ok = await run(backend, container, "import sys\nprint('bye')\nsys.exit(0)")
    assert ok.status == "ok" and ok.stdout == "bye\n"
    bad = await run(backend, container, "import sys\nsys.exit(3)")
    assert bad.status == "error" and bad.error is not None and bad.error.type == "SystemExit"
    assert (await run(backend, container, "'still here'")).result_repr == "'still here'"


async def test_fd_level_capture(backend: LocalBackend, container: ContainerState) -> None:
    code = (
        "import os, subprocess, sys, ctypes\n"
        "print('py-out')\n"
        "os.write(1, b'fd-out\\n')\n"
        "os.write(2, b'fd-err\\n')\n"
        "subprocess.run(['echo', 'sub-out'])\n"
        "subprocess.run(['sh', '-c', 'echo sub-err >&2'])\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.printf(b'c-printf\\n')\n"
        "print('py-err', file=sys.stderr)\n"
    )
    out = await run(backend, container, code)
    assert out.status == "ok", out
    assert out.stdout == "py-out\nfd-out\nsub-out\nc-printf\n"
    assert out.stderr == "fd-err\nsub-err\npy-err\n"
    # Nothing leaks into the next run.
    nxt = await run(backend, container, "1")
    assert (nxt.stdout, nxt.stderr) == ("", "")


async def test_output_truncated(make_backend: MakeBackend) -> None:
    backend = await make_backend(output_cap_chars=2000)
    c = await backend.create_container("s", 600)
    out = await run(backend, c, "print('HEAD')\nfor i in range(20000):\n    print('line', i)\nprint('TAIL')")
    assert out.status == "ok"
    assert out.truncated
    assert len(out.stdout) <= 2000
    assert out.stdout.startswith("HEAD\n") and out.stdout.endswith("TAIL\n")
    assert "truncated" in out.stdout
    both = await run(backend, c, "import sys\nprint('o' * 5000)\nprint('e' * 5000, file=sys.stderr)\n'r' * 5000")
    assert both.truncated
    assert len(both.stdout) + len(both.stderr) <= 2000
    assert both.stdout and both.stderr
    assert both.result_repr is not None and len(both.result_repr) <= 2000
    small = await run(backend, c, "print('fits')")
    assert not small.truncated and small.stdout == "fits\n"


async def test_huge_output_bounded(make_backend: MakeBackend) -> None:
    backend = await make_backend(max_file_bytes=8 * 1024 * 1024)
    c = await backend.create_container("s", 600)
    out = await run(backend, c, "import sys\nfor i in range(1500):\n    sys.stdout.write('x' * 4096 + '\\n')")
    assert out.status == "ok"
    assert out.truncated
    assert len(out.stdout) <= backend.settings.output_cap_chars
    # Past the file size limit, writes fail in the code (not in the server), and the result says why.
    flood = await run(backend, c, "import sys\nwhile True:\n    sys.stdout.write('y' * 4096 + '\\n')", timeout=20)
    assert flood.status == "error" and flood.error is not None and "File too large" in flood.error.message
    assert any("file size limit" in w for w in flood.warnings)
    assert flood.truncated and len(flood.stdout) <= backend.settings.output_cap_chars
    assert not flood.state_lost
    assert (await run(backend, c, "print('small')")).stdout == "small\n"


async def test_structured_last_value(backend: LocalBackend, container: ContainerState) -> None:
    out = await run(backend, container, "import numpy as np\n{'a': [1, 2.5, None], 'n': np.int64(3)}", structured=True)
    assert out.status == "ok", out
    assert out.last_value_json is not None
    assert json.loads(out.last_value_json) == {"a": [1, 2.5, None], "n": 3}
    assert out.sentinel_sources == [out.stdout]
    unserialisable = await run(backend, container, "object()", structured=True)
    assert unserialisable.last_value_json is None and unserialisable.result_repr
    nan = await run(backend, container, "float('nan')", structured=True)
    assert nan.last_value_json is None
    plain = await run(backend, container, "{'a': 1}")
    assert plain.last_value_json is None and plain.sentinel_sources == []


async def test_structured_sentinel_block(make_backend: MakeBackend) -> None:
    backend = await make_backend(output_cap_chars=1000)
    c = await backend.create_container("s", 600)
    code = (
        "import json\n"
        "for i in range(3000):\n"
        "    print('before', i)\n"
        "print('===BEGIN_JSON===')\n"
        "print(json.dumps({'total': 12, 'pad': 'y' * 3000}))\n"
        "print('===END_JSON===')\n"
        "for i in range(3000):\n"
        "    print('noise', i)\n"
    )
    out = await run(backend, c, code, structured=True)
    assert out.truncated
    assert "===BEGIN_JSON===" not in out.stdout  # cut out of the kept text...
    assert len(out.sentinel_sources) == 1  # ...but the whole block is still offered
    block = out.sentinel_sources[0]
    assert block.startswith("===BEGIN_JSON===") and block.rstrip().endswith("===END_JSON===")
    body = block.split("\n", 1)[1].rsplit("===END_JSON===", 1)[0]
    assert json.loads(body)["total"] == 12
    short = await run(backend, c, "print('===BEGIN_JSON===')\nprint('[1]')\nprint('===END_JSON===')", structured=True)
    assert short.sentinel_sources == [short.stdout]


async def test_matplotlib_figures_saved(backend: LocalBackend, container: ContainerState) -> None:
    fresh = await run(backend, container, "import sys\n'matplotlib' in sys.modules")
    assert fresh.result_repr == "False"  # never imported unless the code does
    code = (
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\n"
        "fig2 = plt.figure()\n"
        "plt.bar(['a', 'b'], [3, 4])\n"
        "plt.show()\n"
        "import matplotlib\n"
        "matplotlib.get_backend()\n"
    )
    out = await run(backend, container, code, run_number=7)
    assert out.status == "ok", out
    assert out.result_repr is not None and out.result_repr.lower() == "'agg'"
    assert "Warning" not in out.stderr
    names = {f.path: f for f in await backend.list_files(container)}
    assert {"figure_7_1.png", "figure_7_2.png"} <= set(names)
    data = backend.settings.containers_dir / container.id / "data"
    assert (data / "figure_7_1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Figures were closed: the next run saves nothing new.
    again = await run(backend, container, "import matplotlib.pyplot as plt\nlen(plt.get_fignums())", run_number=8)
    assert again.result_repr == "0"
    assert not any(p.startswith("figure_8_") for p in (f.path for f in await backend.list_files(container)))


async def test_forked_child_never_answers(backend: LocalBackend, container: ContainerState) -> None:
    out = await run(backend, container, "import os\nz = 5\npid = os.fork()\nif pid == 0:\n    print('child')\n'parent'")
    assert out.status == "ok" and out.result_repr == "'parent'"
    for i in range(3):
        nxt = await run(backend, container, f"z + {i}")
        assert nxt.result_repr == str(5 + i)


async def test_background_thread_output_does_not_leak(backend: LocalBackend, container: ContainerState) -> None:
    code = "import threading, time\ndef chatter():\n    while True:\n        print('bg')\n        time.sleep(0.01)\n"
    code += "threading.Thread(target=chatter, daemon=True).start()"
    assert (await run(backend, container, code)).status == "ok"
    await anyio.sleep(0.1)
    out = await run(backend, container, "import time\ntime.sleep(0.1)\n'done'")
    assert out.status == "ok" and out.result_repr == "'done'"
    assert set(out.stdout.split()) <= {"bg"}  # only the thread's own lines, interleaved with nothing else


# ------------------------------------------------------------------------------------------------ time limits


async def test_timeout_interrupts_and_keeps_state(backend: LocalBackend, container: ContainerState) -> None:
    await run(backend, container, "kept = 'yes'")
    started = time.monotonic()
    out = await run(backend, container, "print('working')\nwhile True:\n    pass", timeout=0.5)
    elapsed = time.monotonic() - started
    assert out.status == "timeout"
    assert out.error is not None and out.error.type == "TimeoutError"
    assert "0.5 s" in out.error.message and "kept" in out.error.message
    assert "KeyboardInterrupt" in (out.error.traceback or "")
    assert out.stdout == "working\n"
    assert not out.state_lost
    assert elapsed < 0.5 + backend.settings.interrupt_grace_s + 2.0  # interrupted, not waited out and killed
    after = await run(backend, container, "kept")
    assert after.result_repr == "'yes'" and not after.state_lost
    sleeper = await run(backend, container, "import time\ntime.sleep(100)", timeout=0.3)
    assert sleeper.status == "timeout" and not sleeper.state_lost


async def test_sigint_ignored_gets_killed_and_respawned(make_backend: MakeBackend) -> None:
    backend = await make_backend(interrupt_grace_s=0.5)
    c = await backend.create_container("s", 600)
    await run(backend, c, "kept = 1")
    await snapshot_saved(backend, "s")
    old_pid = worker_of(backend, c.id).worker_pid  # type: ignore[union-attr]
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('stubborn')\nwhile True:\n    pass"
    out = await run(backend, c, code, timeout=0.3)
    assert out.status == "timeout"
    assert out.state_lost
    assert out.error is not None and out.error.type == "TimeoutError" and "restarted" in out.error.message
    assert out.stdout == "stubborn\n"  # read from the host's copy of the capture file
    assert old_pid is not None and not pid_alive(old_pid)
    nxt = await run(backend, c, "'kept' in dir()")
    assert nxt.status == "ok" and nxt.result_repr == "True"  # the new worker loaded the snapshot
    assert not nxt.state_lost and nxt.state_restored is not None and nxt.state_restored["restored"] == ["kept"]


async def test_cancellation_interrupts_the_run(backend: LocalBackend, container: ContainerState) -> None:
    await run(backend, container, "kept = 'state'")
    with anyio.move_on_after(0.4) as scope:
        await run(backend, container, "while True:\n    pass", timeout=60)
    assert scope.cancelled_caught
    started = time.monotonic()
    out = await run(backend, container, "kept")
    assert out.result_repr == "'state'" and not out.state_lost
    assert time.monotonic() - started < 10.0  # not stuck behind the 60 s loop


async def test_cancellation_kills_a_stubborn_run(make_backend: MakeBackend) -> None:
    backend = await make_backend(interrupt_grace_s=0.3)
    c = await backend.create_container("s", 600)
    await run(backend, c, "kept = 1")
    await snapshot_saved(backend, "s")
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
    with anyio.move_on_after(0.3) as scope:
        await run(backend, c, code, timeout=60)
    assert scope.cancelled_caught
    out = await run(backend, c, "'kept' in dir()")
    assert out.status == "ok" and out.result_repr == "True"  # killed, then its variables loaded again
    assert not out.state_lost and out.state_restored is not None


async def test_cpu_budget_exhausted(make_backend: MakeBackend) -> None:
    backend = await make_backend(cpu_seconds=1)
    c = await backend.create_container("s", 600)
    out = await run(backend, c, "while True:\n    pass", timeout=30)
    assert out.status == "error"
    assert out.error is not None and out.error.type == "WorkerDied"
    assert "CPU" in out.error.message
    assert out.state_lost
    assert (await run(backend, c, "'alive again'")).result_repr == "'alive again'"


# ------------------------------------------------------------------------------------------------ worker death


async def test_worker_exit_reported_and_respawned(backend: LocalBackend, container: ContainerState) -> None:
    await run(backend, container, "kept = 1")
    out = await run(backend, container, "import os, sys\nprint('last words')\nsys.stdout.flush()\nos._exit(3)")
    assert out.status == "error"
    assert out.error is not None and out.error.type == "WorkerDied"
    assert "code 3" in out.error.message
    assert out.state_lost
    assert out.stdout == "last words\n"
    nxt = await run(backend, container, "'kept' in dir()")
    assert nxt.status == "ok" and nxt.result_repr == "False" and not nxt.state_lost


async def test_segfault_reported(backend: LocalBackend, container: ContainerState) -> None:
    out = await run(backend, container, "import ctypes\nctypes.string_at(0)")
    assert out.status == "error" and out.error is not None
    assert out.error.type == "WorkerDied"
    assert "SIGSEGV" in out.error.message
    assert (await run(backend, container, "1 + 1")).result_repr == "2"


async def test_worker_killed_between_runs_respawns(backend: LocalBackend, container: ContainerState) -> None:
    await run(backend, container, "kept = 1")
    worker = worker_of(backend, container.id)
    assert worker is not None
    await worker.kill()
    out = await run(backend, container, "'kept' in dir()")
    assert out.status == "ok" and out.result_repr == "False"
    assert out.state_lost


async def test_forged_frame_kills_only_that_worker(backend: LocalBackend, container: ContainerState) -> None:
    # User code shares the worker's process and can write to its pipe; the host must treat that as a broken worker.
    code = (
        "import os, stat\n"
        "for fd in map(int, os.listdir('/proc/self/fd')):\n"
        "    try:\n"
        "        if stat.S_ISFIFO(os.fstat(fd).st_mode) and os.get_blocking(fd) and fd > 2:\n"
        "            os.write(fd, b'\\xff\\xff\\xff\\xff' + b'x' * 16)\n"
        "    except OSError:\n"
        "        pass\n"
        "'forged'"
    )
    out = await run(backend, container, code)
    assert out.status == "error" and out.error is not None and out.error.type == "WorkerDied"
    assert out.state_lost
    assert (await run(backend, container, "40 + 2")).result_repr == "42"


# ------------------------------------------------------------------------------------------------ files


async def test_list_files(backend: LocalBackend, container: ContainerState) -> None:
    assert await backend.list_files(container) == []
    code = (
        "import os\n"
        "os.makedirs('sub/deeper', exist_ok=True)\n"
        "open('a.txt', 'w').write('abc')\n"
        "open('sub/deeper/b.bin', 'wb').write(b'0' * 1000)\n"
        "os.symlink('/etc/passwd', 'link')\n"
        "os.symlink('sub', 'dirlink')\n"
        "os.mkfifo('fifo')\n"
    )
    assert (await run(backend, container, code)).status == "ok"
    listing = await backend.list_files(container)
    by_path = {f.path: f for f in listing if not f.skipped}
    assert set(by_path) == {"a.txt", "sub/deeper/b.bin"}
    assert {f.path: f.skipped for f in listing if f.skipped} == {
        "link": "a symbolic link",
        "dirlink": "a symbolic link",
        "fifo": "not a regular file",
    }
    a = by_path["a.txt"]
    assert a.bytes == 3 and a.source == "generated" and a.created_at > 0
    assert re.fullmatch(r"\d+:3:\d+", a.version)
    await run(backend, container, "open('a.txt', 'w').write('abcd')")
    changed = {f.path: f for f in await backend.list_files(container)}["a.txt"]
    assert changed.version != a.version and changed.bytes == 4


async def test_fetch_file(backend: LocalBackend, container: ContainerState, tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    await backend.put_file(container, src, "in/payload.bin")
    out = await run(backend, container, "open('out.bin', 'wb').write(open('in/payload.bin', 'rb').read()[::-1])")
    assert out.status == "ok", out
    remote = {f.path: f for f in await backend.list_files(container)}["out.bin"]
    dest = tmp_path / "harvest" / "out.bin"
    res = await backend.fetch_file(container, remote, dest, 10 * 1024 * 1024)
    assert res.bytes == len(payload)
    assert res.sha256 == hashlib.sha256(payload[::-1]).hexdigest()
    assert dest.read_bytes() == payload[::-1]
    with pytest.raises(FileTooLarge):
        await backend.fetch_file(container, remote, tmp_path / "small" / "x", 1024)
    assert not (tmp_path / "small" / "x").exists()
    missing = dataclass_copy(remote, path="nope.txt")
    with pytest.raises(FileNotFound):
        await backend.fetch_file(container, missing, tmp_path / "m", 1024)
    for bad in ("../registry.sqlite3", "/etc/passwd", "a/../../x", ""):
        with pytest.raises(PathRefused):
            await backend.fetch_file(container, dataclass_copy(remote, path=bad), tmp_path / "bad", 1024)


async def test_put_file(backend: LocalBackend, container: ContainerState, tmp_path: Path) -> None:
    src = tmp_path / "input.csv"
    src.write_text("a,b\n1,2\n")
    remote = await backend.put_file(container, src, "inputs/input.csv")
    assert remote.path == "inputs/input.csv" and remote.bytes == 8 and remote.source == "user"
    also = await backend.put_file(container, src, "/mnt/data/top.csv")
    assert also.path == "top.csv"
    out = await run(
        backend, container, "open('inputs/input.csv', 'a').write('3,4\\n')\nopen('inputs/input.csv').read()"
    )
    assert out.status == "ok", out  # the sandbox's uid owns uploaded files
    assert out.result_repr == repr("a,b\n1,2\n3,4\n")
    listing = {f.path: f for f in await backend.list_files(container)}
    assert listing["top.csv"].source == "user"  # unchanged upload
    assert listing["inputs/input.csv"].source == "generated"  # changed by the code
    for bad in ("../escape.txt", "/etc/x", "a/../../b", "."):
        with pytest.raises(PathRefused):
            await backend.put_file(container, src, bad)
    await run(backend, container, "import os\nos.mkdir('adir')")
    with pytest.raises(PathRefused):
        await backend.put_file(container, src, "adir")


async def test_put_file_replaces_a_planted_symlink(
    backend: LocalBackend, container: ContainerState, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("host secret")
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    await run(
        backend, container, f"import os\nos.symlink({str(victim)!r}, 'up.txt')\nos.symlink({str(other_dir)!r}, 'd')"
    )
    src = tmp_path / "src.txt"
    src.write_text("upload")
    await backend.put_file(container, src, "up.txt")
    assert victim.read_text() == "host secret"
    data = backend.settings.containers_dir / container.id / "data"
    assert not (data / "up.txt").is_symlink() and (data / "up.txt").read_text() == "upload"
    with pytest.raises(PathRefused):
        await backend.put_file(container, src, "d/planted.txt")
    assert list(other_dir.iterdir()) == []


async def test_disk_quota_interrupts_a_writer(make_backend: MakeBackend) -> None:
    backend = await make_backend(box_size_mb=16)
    c = await backend.create_container("s", 600)
    await run(backend, c, "kept = 1")
    code = (
        "import time\n"
        "i = 0\n"
        "while True:\n"
        "    with open(f'blob{i}.bin', 'wb') as fh:\n"
        "        fh.write(b'x' * (1024 * 1024))\n"
        "    i += 1\n"
        "    time.sleep(0.05)\n"
    )
    out = await run(backend, c, code, timeout=30)
    assert out.status == "error"
    assert out.error is not None and out.error.type == "DiskQuotaExceeded"
    assert not out.state_lost
    data = backend.settings.containers_dir / c.id / "data"
    used = sum(p.stat().st_size for p in data.iterdir())
    assert 16 * 2**20 < used < 48 * 2**20  # stopped within about a second of crossing the quota
    # Over quota, the folder stays usable so code can clean up.
    await backend.list_files(c)
    still = await run(backend, c, "kept")
    assert still.status == "ok" and any("quota" in w for w in still.warnings)  # still over: said after each run
    cleanup = await run(backend, c, "import glob, os\nfor p in glob.glob('blob*'):\n    os.remove(p)\nkept")
    assert cleanup.status == "ok" and cleanup.result_repr == "1"
    assert not any("quota" in w for w in cleanup.warnings)  # the usage is known when the run returns
    calm = await run(backend, c, "'calm'")
    assert not any("quota" in w for w in calm.warnings)


async def test_put_file_respects_quota(make_backend: MakeBackend, tmp_path: Path) -> None:
    backend = await make_backend(box_size_mb=16)
    c = await backend.create_container("s", 600)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (17 * 1024 * 1024))
    with pytest.raises(FileTooLarge):
        await backend.put_file(c, big, "big.bin")
    assert await backend.list_files(c) == []


async def test_file_size_limit(make_backend: MakeBackend) -> None:
    backend = await make_backend(max_file_bytes=1024 * 1024)
    c = await backend.create_container("s", 600)
    out = await run(backend, c, "open('big.bin', 'wb').write(b'x' * (2 * 1024 * 1024))")
    assert out.status == "error" and out.error is not None
    assert out.error.type == "OSError" and "File too large" in out.error.message
    assert not out.state_lost


# ------------------------------------------------------------------------------------------------ lifecycle


async def test_last_active_and_expiry(backend: LocalBackend) -> None:
    c = await backend.create_container("s", 1.5)
    before = c.last_active_at
    await anyio.sleep(0.05)
    out = await run(backend, c, "1")
    assert out.container is not None
    assert out.container.last_active_at > before
    assert out.container.id == c.id and out.container.status == "running"
    fresh = await backend.refresh(out.container)
    assert fresh.status == "running"
    await anyio.sleep(1.6)
    expired = await backend.refresh(out.container)
    assert expired.status == "expired"
    with pytest.raises(ContainerExpired):
        await run(backend, out.container, "1")


async def test_destroy(backend: LocalBackend, container: ContainerState) -> None:
    await run(backend, container, "open('f.txt', 'w').write('x')")
    worker = worker_of(backend, container.id)
    assert worker is not None and worker.worker_pid is not None
    pids = list(worker.process.pids().values())
    root = backend.settings.containers_dir / container.id
    await backend.destroy(container)
    assert not root.exists()
    assert not any(pid_alive(p) for p in pids if p is not None)
    await backend.destroy(container)  # idempotent
    assert (await backend.refresh(container)).status == "deleted"
    with pytest.raises(ContainerExpired):
        await run(backend, container, "1")
    with pytest.raises(ContainerExpired):
        await backend.list_files(container)


async def test_aclose_kills_every_worker(make_backend: MakeBackend) -> None:
    backend = await make_backend()
    containers = [await backend.create_container("s", 600) for _ in range(3)]
    pids = []
    for c in containers:
        w = worker_of(backend, c.id)
        assert w is not None
        pids += list(w.process.pids().values())
    await backend.aclose()
    assert not any(pid_alive(p) for p in pids if p is not None)
    for p in pids:  # reaped, not zombies
        assert p is not None and not os.path.exists(f"/proc/{p}")


async def test_resume_container_after_restart(make_backend: MakeBackend, tmp_path: Path) -> None:
    first = await make_backend(data_dir=tmp_path / "shared")
    c = await first.create_container("s", 600)
    await run(first, c, "x = 1\nopen('kept.txt', 'w').write('on disk')")
    await first.aclose()
    second = await make_backend(data_dir=tmp_path / "shared")
    assert (await second.refresh(c)).status == "running"
    out = await run(second, c, "import os\n('x' in dir(), open('kept.txt').read(), os.getuid())")
    assert out.status == "ok", out
    assert not out.state_lost and out.state_restored is not None  # saved at the stop, loaded after the start
    assert out.result_repr is not None and out.result_repr.startswith("(True, 'on disk',")
    again = await run(second, c, "1")
    assert not again.state_lost


async def test_containers_run_concurrently_and_apart(backend: LocalBackend) -> None:
    a = await backend.create_container("a", 600)
    b = await backend.create_container("b", 600)
    results: dict[str, ExecOutcome] = {}

    async def go(name: str, c: ContainerState) -> None:
        results[name] = await run(
            backend, c, f"import time, os\ntime.sleep(1.0)\nopen('{name}.txt','w').write('1')\nsorted(os.listdir('.'))"
        )

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(go, "a", a)
        tg.start_soon(go, "b", b)
    assert time.monotonic() - started < 1.8  # one after the other would take 2 s
    assert results["a"].result_repr == "['a.txt']"
    assert results["b"].result_repr == "['b.txt']"


async def test_unsandboxed_only_when_allowed(
    make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bubblewrap, "find_bwrap", lambda explicit=None: None)
    with pytest.raises(SandboxUnavailable) as refused:
        await LocalBackend(Settings(data_dir=tmp_path / "refused")).start()
    assert "bwrap is not installed" in refused.value.message
    backend = await make_backend(unsafe_no_sandbox=True)
    assert backend.isolation == "none"
    assert backend.describe()["isolation"] == "none"
    c = await backend.create_container("s", 600)
    assert c.isolation == "none"
    out = await run(backend, c, "import os\nopen('here.txt', 'w').write('1')\nos.getcwd()")
    assert out.status == "ok", out
    assert any("UNSANDBOXED" in w for w in out.warnings)
    data = backend.settings.containers_dir / c.id / "data"
    assert out.result_repr == repr(str(data))
    assert (data / "here.txt").exists()
    assert [f.path for f in await backend.list_files(c)] == ["here.txt"]
    timed = await run(backend, c, "while True:\n    pass", timeout=0.3)
    assert timed.status == "timeout" and any("UNSANDBOXED" in w for w in timed.warnings)


def dataclass_copy(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


async def test_user_namespace_fallback(make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where dedicated uids are impossible (e.g. inside a rootless container), plain bwrap --unshare-user is used.
    monkeypatch.setattr(uids, "uid_range_mapped", lambda *a, **k: False)
    backend = await make_backend()
    assert backend.isolation == "bubblewrap"
    facts = backend.describe()
    assert facts["mode"] == "bwrap-userns"
    c = await backend.create_container("s", 600)
    out = await run(
        backend,
        c,
        "import socket, os\nopen('f.txt', 'w').write('1')\ntry:\n"
        "    socket.create_connection(('127.0.0.1', 9), timeout=1)\n    net = 'open'\n"
        "except OSError:\n    net = 'blocked'\nnet, os.listdir('/mnt/data')",
    )
    assert out.status == "ok", out
    assert out.result_repr == "('blocked', ['f.txt'])"


async def test_background_writer_over_quota_is_stopped(make_backend: MakeBackend) -> None:
    backend = await make_backend(box_size_mb=16)
    c = await backend.create_container("s", 600)
    code = (
        "import threading, time\n"
        "def fill():\n"
        "    i = 0\n"
        "    while True:\n"
        "        open(f'bg{i}.bin', 'wb').write(b'x' * (1024 * 1024))\n"
        "        i += 1\n"
        "        time.sleep(0.05)\n"
        "threading.Thread(target=fill, daemon=True).start()\n"
        "kept = 1"
    )
    assert (await run(backend, c, code)).status == "ok"
    data = backend.settings.containers_dir / c.id / "data"
    with anyio.fail_after(20):
        while worker_of(backend, c.id) is not None:
            await anyio.sleep(0.1)
    used = sum(p.stat().st_size for p in data.iterdir())
    await anyio.sleep(0.3)
    assert sum(p.stat().st_size for p in data.iterdir()) == used  # the writer is gone
    assert 16 * 2**20 < used < 48 * 2**20
    out = await run(backend, c, "import glob, os\nfor p in glob.glob('bg*'):\n    os.remove(p)\n'kept' in dir()")
    assert out.status == "ok" and out.result_repr == "True"  # the stopped worker's variables came back
    assert not out.state_lost and out.state_restored is not None
    assert any("background writer" in w for w in out.warnings)


async def test_large_code_and_unencodable_text(backend: LocalBackend, container: ContainerState) -> None:
    big = "x = '" + "a" * 600_000 + "'\nlen(x)"  # far larger than a pipe buffer
    out = await run(backend, container, big)
    assert out.status == "ok" and out.result_repr == "600000"
    odd = await run(
        backend, container, "s = chr(0xD800)\nprint('bad', s.encode('utf-8', 'replace'))\nraise ValueError(s)"
    )
    assert odd.status == "error" and odd.error is not None and odd.error.type == "ValueError"
    for text in (odd.stdout, odd.error.message, odd.error.traceback or ""):
        text.encode("utf-8")  # no lone surrogates reach the engine (they would break JSON-RPC)
    assert odd.stdout.startswith("bad ")


async def test_worker_start_failure_is_reported(make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = await make_backend(warm_workers=0)  # no spare: the container's own start must fail
    real = sandbox_mod.worker_command
    monkeypatch.setattr(sandbox_mod, "worker_command", lambda path, cfg: real(path + ".missing", cfg))
    with pytest.raises(BackendError) as failed:
        await backend.create_container("s", 600)
    assert "did not start" in failed.value.message and "worker.py.missing" in failed.value.message
    assert list(backend.settings.containers_dir.iterdir()) == []  # nothing left behind
    monkeypatch.setattr(sandbox_mod, "worker_command", real)
    c = await backend.create_container("s", 600)
    assert (await run(backend, c, "1")).result_repr == "1"


async def test_a_stop_that_lands_before_the_cell_began_still_interrupts_it(
    make_backend: MakeBackend,
) -> None:
    """The worker ignores SIGINT between runs, so a stop sent right after the request (before the cell began)
    would leave the cell spinning until the kill at the grace's end; the interrupt is repeated until it answers."""
    backend = await make_backend(interrupt_grace_s=3.0)
    container = await backend.create_container("session-1", 600)
    await run(backend, container, "kept = 5")
    c = backend._containers.get(container.id)
    assert c is not None
    for _ in range(5):
        worker = c.worker
        assert worker is not None
        await worker.send({"op": "exec", "code": "while True:\n    pass", "run": 2, "structured": False, "cap": 1000})
        started = time.monotonic()
        await backend._pool.abort(c, worker, 3.0)  # its first SIGINT usually reaches the worker before the cell
        assert c.worker is worker and time.monotonic() - started < 2.0  # interrupted, not killed at 3 s
    assert (await run(backend, container, "kept")).result_repr == "5"
