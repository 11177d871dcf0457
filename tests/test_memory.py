"""Memory limited per container, all its processes together (backends/local/sandbox/memory.py): a cgroup where one can
be had, else RLIMIT_AS per process plus the RSS sum checked during runs; the mechanism reported by describe()."""

from __future__ import annotations

import pytest

from code_interpreter_mcp.backends.base import ExecRequest, no_progress
from code_interpreter_mcp.backends.local.sandbox.memory import MemoryLimiter
from tests.helpers import MakeBackend

pytestmark = pytest.mark.anyio

HOG = "import time\nb = b'x' * (170 << 20)\ntime.sleep(3)\nprint('survived', flush=True)\n"
CODE = (
    f"open('/tmp/hog.py', 'w').write({HOG!r})\n"
    "import subprocess, sys\n"
    "ps = [subprocess.Popen([sys.executable, '/tmp/hog.py'], stdout=subprocess.PIPE) for _ in range(2)]\n"
    "outs = [p.communicate()[0].decode() for p in ps]\n"
    "[(p.returncode, o.strip()) for p, o in zip(ps, outs)]"
)


async def test_two_processes_together_stay_under_memory_mb(make_backend: MakeBackend) -> None:
    backend = await make_backend(memory_mb=256, warm_workers=0)
    mechanism = backend.describe()["memory"]["mechanism"]
    assert mechanism in ("cgroup2", "cgroup1", "rlimit")
    c = await backend.create_container("s", 600)
    one = await backend.execute(c, ExecRequest(code=CODE.replace("range(2)", "range(1)"), timeout_s=30), no_progress)
    assert one.status == "ok" and one.result_repr == "[(0, 'survived')]", one  # one alone fits
    both = await backend.execute(c, ExecRequest(code=CODE, timeout_s=30), no_progress)
    if both.status == "ok":
        results = eval(both.result_repr or "[]")  # our own repr of a list of tuples
        assert sum(1 for rc, out in results if rc == 0 and out == "survived") <= 1, results
        assert any(rc == -9 for rc, _ in results), results  # the kernel's OOM killer, inside the group
    else:
        assert both.error is not None and both.error.type in ("MemoryError", "WorkerDied"), both
        assert "memory" in both.error.message
    after = await backend.execute(c, ExecRequest(code="1+1", timeout_s=10), no_progress)
    assert after.status == "ok" and after.result_repr == "2"


async def test_the_mechanism_is_reported(make_backend: MakeBackend) -> None:
    backend = await make_backend(warm_workers=0)
    facts = backend.describe()["memory"]
    assert facts["mechanism"] in ("cgroup2", "cgroup1", "rlimit")
    if facts["mechanism"] == "rlimit":
        assert facts["why_fallback"] and facts["fallback"]
    else:
        assert facts["per"].startswith("container")


def test_fallback_when_no_group_can_be_made() -> None:
    limiter = MemoryLimiter(64 << 20, mechanism="rlimit")
    assert limiter.describe()["mechanism"] == "rlimit"
    import os

    assert limiter.over_rss(os.getpid()) is (limiter.usage("x", os.getpid()) > 64 << 20)
    limiter.place("x", [])  # no group: nothing to do, nothing raised
