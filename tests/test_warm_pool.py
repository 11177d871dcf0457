"""Warm spares (backends/local/workers/capacity.py): started right after the probe, adopted whole by a new container
(its first run spawns nothing), refilled in the background, within the live-worker cap; and BLAS threads."""

from __future__ import annotations

import os

import anyio
import pytest

from code_interpreter_mcp.backends.base import ContainerState, ExecOutcome, ExecRequest, no_progress
from code_interpreter_mcp.backends.local import LocalBackend
from tests.helpers import MakeBackend

pytestmark = pytest.mark.anyio


async def run(backend: LocalBackend, container: ContainerState, code: str) -> ExecOutcome:
    return await backend.execute(container, ExecRequest(code=code, timeout_s=20), no_progress)


async def spares_ready(backend: LocalBackend, n: int) -> None:
    assert backend._capacity is not None
    with anyio.fail_after(20):
        while len(backend._capacity.spares) < n:
            await anyio.sleep(0.02)


def count_spawns(backend: LocalBackend) -> list[object]:
    """The memory group (container id) of each worker started from now on."""
    pool = backend._pool
    assert pool is not None
    calls: list[object] = []
    original = pool.spawn

    async def spawn(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("group"))
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    pool.spawn = spawn  # type: ignore[method-assign]
    return calls


async def test_a_new_container_adopts_the_spare(make_backend: MakeBackend) -> None:
    backend = await make_backend(warm_workers=1)
    await spares_ready(backend, 1)
    assert backend._capacity is not None
    spare = backend._capacity.spares[0]
    calls = count_spawns(backend)
    c = await backend.create_container("s", 600)
    assert c.id == spare.folder.cid  # the spare's folder became the container's
    record = backend._containers.get(c.id)
    assert record is not None and record.worker is spare.worker
    out = await run(backend, c, "import os\nopen('made.txt', 'w').write('1')\nos.getcwd()")
    assert out.status == "ok" and out.result_repr == "'/mnt/data'" and not out.state_lost
    assert [f.path for f in await backend.list_files(c)] == ["made.txt"]
    assert c.id not in calls  # the only spawn is the background refill's, none for the container or its run
    await spares_ready(backend, 1)  # refilled
    assert backend._capacity.spares[0].folder.cid != c.id


async def test_no_spares_when_disabled(make_backend: MakeBackend) -> None:
    backend = await make_backend(warm_workers=0)
    await anyio.sleep(0.3)
    assert backend._capacity is not None and backend._capacity.spares == []
    c = await backend.create_container("s", 600)
    assert (await run(backend, c, "1+1")).result_repr == "2"


async def test_spares_count_against_the_cap(make_backend: MakeBackend) -> None:
    backend = await make_backend(max_live_containers=2, warm_workers=2)
    await spares_ready(backend, 2)
    a = await backend.create_container("a", 600)
    b = await backend.create_container("b", 600)
    await anyio.sleep(0.3)
    assert backend._capacity is not None
    assert backend._capacity.spares == []  # no room for a refill: live workers come first
    assert len(backend._capacity.live()) == 2
    await run(backend, a, "1")
    await run(backend, b, "1")
    await backend.create_container("c", 600)  # evicts a, the least recently used
    assert backend._containers.get(a.id).worker is None  # type: ignore[union-attr]


async def test_spare_folders_are_removed_at_close(make_backend: MakeBackend) -> None:
    backend = await make_backend(warm_workers=2)
    await spares_ready(backend, 2)
    assert backend._capacity is not None
    roots = [s.folder.root for s in backend._capacity.spares]
    await backend.aclose()
    assert not any(r.exists() for r in roots)


async def test_blas_threads_follow_the_cpus(make_backend: MakeBackend) -> None:
    backend = await make_backend(warm_workers=0)
    c = await backend.create_container("s", 600)
    out = await run(backend, c, "import os\nos.environ['OPENBLAS_NUM_THREADS'], os.environ['OMP_NUM_THREADS']")
    n = str(len(os.sched_getaffinity(0)))
    assert out.result_repr == repr((n, n))
    pinned = await make_backend(warm_workers=0, blas_threads=1)
    c1 = await pinned.create_container("s", 600)
    assert (await run(pinned, c1, "import os\nos.environ['OPENBLAS_NUM_THREADS']")).result_repr == "'1'"
    assert pinned.describe()["blas_threads"] == 1


async def test_the_first_container_after_start_waits_for_the_spare_being_started(make_backend: MakeBackend) -> None:
    backend = await make_backend(warm_workers=1)
    capacity = backend._capacity
    assert capacity is not None
    with anyio.fail_after(10):
        while not capacity._filling and not capacity.spares:
            await anyio.sleep(0)
    claimed: list[object] = []
    original = capacity.claim

    def claim() -> object:
        claimed.append(original())
        return claimed[-1]

    capacity.claim = claim  # type: ignore[method-assign]
    c = await backend.create_container("s", 600)  # the spare is still starting: finishing it beats a second start
    assert len(claimed) == 1 and claimed[0] is not None  # it got the spare, not a worker of its own
    assert (await run(backend, c, "1+1")).result_repr == "2"
