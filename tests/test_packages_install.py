"""PackageManager end to end with the real installers in the real installer sandbox, against wheels the tests build
and serve from a local folder or a loopback index. Nothing here needs the internet."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.errors import (
    PackageConflict,
    PackageIndexUnreachable,
    PackageInstallTimeout,
    PackageNotFound,
    PackageNoWheel,
    PackageRefused,
    PackageTooLarge,
    SandboxUnavailable,
)
from code_interpreter_mcp.packages import PackageManager, gather_requirements
from tests.wheels import serve_index, write_simple_index

pytestmark = pytest.mark.anyio
KIB = 1024
MIB = 1024 * 1024
MakeManager = Callable[..., PackageManager]


@pytest.fixture
async def make_manager(tmp_path: Path, wheels: Path, sandbox_ok: None) -> AsyncIterator[MakeManager]:
    made: list[PackageManager] = []

    def make(environ: dict[str, str] | None = None, **overrides: Any) -> PackageManager:
        values: dict[str, Any] = {"data_dir": tmp_path / "data", "package_find_links": str(wheels)}
        values.update(overrides)
        pm = PackageManager(Settings(**values), environ=environ)
        made.append(pm)
        return pm

    yield make
    for pm in made:
        await pm.aclose()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[float, float | None, str]] = []

    async def __call__(self, done: float, total: float | None, message: str) -> None:
        self.events.append((done, total, message))


def commands(pm: PackageManager) -> int:
    return pm._installer.commands_run if pm._installer is not None else 0


def leftovers(pm: PackageManager) -> list[str]:
    """Processes still running whose command line names this manager's cache (the installer, bwrap)."""
    root = str(pm.store.root)
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if root in cmdline:
                found.append(cmdline[:200])
    return found


def imports(path: Path, code: str) -> str:
    """Run `code` with the set first on sys.path, as the run's sandbox will."""
    script = f"import sys; sys.path.insert(0, {str(path)!r}); {code}"
    return subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, check=True).stdout


# ----------------------------------------------------------------------------------------------- install, reuse


async def test_install_with_a_dependency_then_reuse(make_manager: MakeManager) -> None:
    pm = make_manager()
    progress = Recorder()
    first = await pm.ensure(["beta"], progress)
    assert not first.reused
    assert first.distributions == [("alpha", "2.0"), ("beta", "1.0")]
    assert imports(first.path, "import alpha, beta; print(alpha.VERSION, beta.VERSION)").split() == ["2.0", "1.0"]
    assert [m.split()[0] for _, _, m in progress.events] == ["resolving", "downloading", "installing", "installed"]
    assert [d for d, _, _ in progress.events] == [0, 1, 2, 3] and all(t == 3 for _, t, _ in progress.events)
    assert not (first.path / ".lock").exists()
    meta = json.loads((first.path.parent / "meta.json").read_text())
    assert meta["pins"] == ["alpha==2.0", "beta==1.0"] and meta["isolation"] == "bubblewrap"
    assert meta["bytes"] == first.bytes > 0
    assert list(pm.store.tmp_dir.iterdir()) == []
    assert commands(pm) == 1  # no stored set has these names: resolved and installed by one command

    again = await pm.ensure(["beta"], progress)
    assert again.reused and again.key == first.key and again.path == first.path
    assert commands(pm) == 1  # nothing ran
    assert len(progress.events) == 4

    # Another server process on the same cache (or this one restarted) pays nothing either.
    other = make_manager()
    assert (await other.ensure(["beta"])).reused and commands(other) == 0

    # A different request over the same names is resolved first, and reuses the set it resolves to.
    pinned = await pm.ensure(["alpha==2.0", "beta"])
    assert pinned.reused and pinned.key == first.key and commands(pm) == 2
    # One that resolves to another set installs it from the pins.
    older = await pm.ensure(["alpha<2"])
    assert not older.reused and older.distributions == [("alpha", "1.0")] and commands(pm) == 4


async def test_two_sessions_asking_at_once_install_once(make_manager: MakeManager) -> None:
    pm = make_manager()
    results = []

    async def ask(reqs: list[str]) -> None:
        results.append(await pm.ensure(reqs))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, ["beta"])
        tg.start_soon(ask, ["beta"])
        tg.start_soon(ask, ["beta", "alpha>=2"])
    assert len({r.key for r in results}) == 1
    assert sorted(r.reused for r in results) == [False, True, True]
    assert commands(pm) == 2  # the same request waits for the first and runs nothing
    assert pm.store.leased() == {results[0].key: 3}


async def test_pep723_block(make_manager: MakeManager) -> None:
    code = '# /// script\n# requires-python = ">=3.8"\n# dependencies = ["beta"]\n# ///\nimport beta\n'
    reqs = gather_requirements(["withpth"], code)
    got = await make_manager().ensure(reqs)
    assert [n for n, _ in got.distributions] == ["alpha", "beta", "withpth"]
    meta = json.loads((got.path.parent / "meta.json").read_text())
    # Kept but listed: the run's sandbox puts the folder on sys.path directly, so it is never executed.
    assert meta["pth_files"] == ["withpth.pth"]


# ----------------------------------------------------------------------------------------------- clear errors


async def test_conflict_missing_package_and_missing_wheel(make_manager: MakeManager) -> None:
    pm = make_manager()
    with pytest.raises(PackageConflict) as conflict:
        await pm.ensure(["beta", "gamma"])
    assert "alpha<2" in conflict.value.message and "alpha>=2" in conflict.value.message
    with pytest.raises(PackageNotFound, match="'nosuch'"):
        await pm.ensure(["nosuch"])
    with pytest.raises(PackageNotFound, match="alpha>=3"):
        await pm.ensure(["alpha>=3"])
    with pytest.raises(PackageNoWheel, match="no usable wheels") as sdist:
        await pm.ensure(["srconly"])
    assert "ALLOW_BUILDS" in sdist.value.hint
    with pytest.raises(PackageNoWheel, match="platform"):
        await pm.ensure(["winonly"])
    assert pm.store.all_sets() == [] and list(pm.store.tmp_dir.iterdir()) == []
    # The manager is untouched by all that.
    assert (await pm.ensure(["alpha"])).distributions == [("alpha", "2.0")]


async def test_policy_off_and_allowlist(make_manager: MakeManager) -> None:
    off = make_manager(packages="off")
    with pytest.raises(PackageRefused, match="turned off"):
        await off.ensure(["alpha"])
    assert off._installer is None  # refused before anything was set up
    http = make_manager(transport="http")
    with pytest.raises(PackageRefused):
        await http.ensure(["alpha"])
    allow = make_manager(packages="allowlist", package_allowlist=["Alpha"])
    assert (await allow.ensure(["alpha"])).distributions == [("alpha", "2.0")]
    with pytest.raises(PackageRefused, match="beta"):
        await allow.ensure(["alpha", "beta"])


async def test_size_limit(make_manager: MakeManager) -> None:
    pm = make_manager(package_set_max_mb=1)
    with pytest.raises(PackageTooLarge, match="over this server's limit of 1 MiB"):
        await pm.ensure(["big"])
    assert pm.store.all_sets() == [] and list(pm.store.tmp_dir.iterdir()) == []
    assert (await pm.ensure(["mid-a"])).bytes < MIB


# ----------------------------------------------------------------------------------------------- index over HTTP


@pytest.fixture
def index_url(wheels: Path, tmp_path: Path) -> Iterator[str]:
    write_simple_index(wheels, tmp_path / "index")
    with serve_index(tmp_path / "index") as url:
        yield url


async def test_loopback_index(make_manager: MakeManager, index_url: str) -> None:
    pm = make_manager(package_find_links=None, package_index_url=index_url)
    got = await pm.ensure(["beta"])
    assert got.distributions == [("alpha", "2.0"), ("beta", "1.0")]
    with pytest.raises(PackageNotFound, match="package registry"):
        await pm.ensure(["nosuch"])
    with pytest.raises(PackageNoWheel):
        await pm.ensure(["srconly"])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_index_unreachable(make_manager: MakeManager) -> None:
    url = f"http://127.0.0.1:{closed_port()}/simple/"
    for installer, env in (("uv", {"UV_HTTP_RETRIES": "0"}), ("pip", {"PIP_RETRIES": "1"})):
        pm = make_manager(environ=env, package_find_links=None, package_index_url=url, package_installer=installer)
        with pytest.raises(PackageIndexUnreachable) as info:
            await pm.ensure(["beta"])
        assert "CODE_INTERPRETER_PACKAGE_FIND_LINKS" in info.value.hint


# ----------------------------------------------------------------------------------------------- time, cancellation


@pytest.fixture
def hanging_index() -> Iterator[str]:
    """An index that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}/simple/"


async def test_timeout_stops_the_installer(make_manager: MakeManager, hanging_index: str) -> None:
    pm = make_manager(package_find_links=None, package_index_url=hanging_index, package_install_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(PackageInstallTimeout, match="longer than 1 s"):
        await pm.ensure(["beta"])
    assert time.monotonic() - started < 5
    assert leftovers(pm) == []
    assert list(pm.store.tmp_dir.iterdir()) == []


async def test_cancellation_kills_the_installer(make_manager: MakeManager, hanging_index: str) -> None:
    pm = make_manager(package_find_links=None, package_index_url=hanging_index)
    progress = Recorder()
    with anyio.move_on_after(0.8) as scope:
        await pm.ensure(["beta"], progress)
    assert scope.cancelled_caught
    assert progress.events and progress.events[0][2].startswith("resolving")
    assert leftovers(pm) == []
    assert list(pm.store.tmp_dir.iterdir()) == []


# ----------------------------------------------------------------------------------------------- eviction


async def test_quota_evicts_the_least_recently_used_set(make_manager: MakeManager) -> None:
    pm = make_manager(package_cache_quota_mb=1)
    a = await pm.ensure(["mid-a"])
    pm.release(a.key)
    b = await pm.ensure(["mid-b"])
    # mid-a + mid-b + the installer's cache of both exceed 1 MiB: the older, released set goes.
    assert pm.store.lookup(a.key) is None and not a.path.exists()
    assert pm.store.lookup(b.key) is not None
    # Asked again, it is installed again (its request is forgotten with it).
    assert not (await pm.ensure(["mid-a"])).reused


async def test_leased_sets_are_never_evicted(make_manager: MakeManager) -> None:
    pm = make_manager(package_cache_quota_mb=1)
    a = await pm.ensure(["mid-a"])  # leased by this process: a live container mounts it
    b = await pm.ensure(["mid-b"])
    pm.release(b.key)
    # mid-b is held by another process sharing the cache (a shared flock on its lease file).
    fd = os.open(pm.store.locks_dir / f"{b.key}.use", os.O_RDWR)
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        c = await pm.ensure(["mid-c"])
        assert {m.key for m in pm.store.all_sets()} == {a.key, b.key, c.key}
    finally:
        os.close(fd)
    pm.release(a.key)
    pm.release(c.key)
    pm.store.quota_bytes = 1
    assert sorted(await anyio.to_thread.run_sync(pm.store.evict, set())) == sorted([a.key, b.key, c.key])


async def test_eviction_order_is_least_recently_used(make_manager: MakeManager) -> None:
    pm = make_manager()
    sets = [await pm.ensure([name]) for name in ("mid-a", "mid-b", "mid-c")]
    for s in sets:
        pm.release(s.key)
    await pm.ensure(["mid-a"])  # mid-a used last: mid-b is now the least recently used
    pm.release(sets[0].key)
    store = pm.store
    store.quota_bytes = sets[0].bytes + sets[2].bytes + store.tool_cache_bytes() + 1000
    dropped = await anyio.to_thread.run_sync(store.evict, set())
    assert dropped == [sets[1].key]


# ----------------------------------------------------------------------------------------------- configurations


async def test_pip_fallback(make_manager: MakeManager, index_url: str) -> None:
    over_http = make_manager(package_installer="pip", package_find_links=None, package_index_url=index_url)
    assert (await over_http.ensure(["beta"])).distributions == [("alpha", "2.0"), ("beta", "1.0")]
    pm = make_manager(package_installer="pip", data_dir=over_http.settings.data_dir.parent / "data-pip")
    got = await pm.ensure(["beta"])
    assert got.distributions == [("alpha", "2.0"), ("beta", "1.0")]
    assert imports(got.path, "import beta; print(beta.VERSION)").strip() == "1.0"
    with pytest.raises(PackageConflict, match="alpha<2"):
        await pm.ensure(["beta", "gamma"])
    with pytest.raises(PackageNotFound):
        await pm.ensure(["nosuch"])


async def test_the_users_own_uv_and_pip_config_are_read_inside_the_sandbox(
    make_manager: MakeManager, wheels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / ".config" / "uv").mkdir(parents=True)
    (home / ".config" / "uv" / "uv.toml").write_text(f'find-links = ["{wheels}"]\nno-index = true\n')
    (home / ".config" / "pip").mkdir(parents=True)
    (home / ".config" / "pip" / "pip.conf").write_text(f"[global]\nfind-links = {wheels}\nno-index = true\n")
    monkeypatch.setenv("HOME", str(home))
    env = {"XDG_CONFIG_DIRS": str(tmp_path / "none")}
    for installer in ("uv", "pip"):
        pm = make_manager(
            environ=env, package_find_links=None, package_installer=installer, data_dir=tmp_path / installer
        )
        got = await pm.ensure(["beta"])
        assert got.distributions == [("alpha", "2.0"), ("beta", "1.0")]
        info = await pm.describe()
        assert info["index"]["source"] in ("uv configuration", "pip configuration")  # type: ignore[index]


async def test_no_sandbox_means_no_installs_unless_the_operator_opts_out(make_manager: MakeManager) -> None:
    with pytest.raises(SandboxUnavailable, match="only inside a sandbox"):
        await make_manager(bwrap_path="/nonexistent/bwrap").ensure(["alpha"])
    pm = make_manager(bwrap_path="/nonexistent/bwrap", unsafe_no_sandbox=True)
    got = await pm.ensure(["beta"])
    assert got.distributions == [("alpha", "2.0"), ("beta", "1.0")]
    assert json.loads((got.path.parent / "meta.json").read_text())["isolation"] == "none"


async def test_describe_for_doctor(make_manager: MakeManager) -> None:
    pm = make_manager()
    await pm.ensure(["alpha"])
    info = await pm.describe()
    assert info["policy"] == "any" and info["isolation"] == "bubblewrap"
    assert str(info["installer"]).startswith("uv ")
    assert info["index"] == {"source": "settings", "locations": [pm.settings.package_find_links],  # type: ignore[comparison-overlap]
                             "config_files": [], "offline": True}  # fmt: skip
    cache = info["cache"]
    assert isinstance(cache, dict) and cache["sets"] == 1 and cache["quota_bytes"] == 5120 * MIB
    off = await make_manager(packages="off").describe()
    assert off["policy"] == "off" and "installer" not in off


async def test_set_files_are_readable_whatever_the_servers_umask(make_manager: MakeManager) -> None:
    old = os.umask(0o077)
    try:
        got = await make_manager().ensure(["alpha"])
    finally:
        os.umask(old)
    module = got.path / "alpha" / "__init__.py"
    assert module.stat().st_mode & 0o044 == 0o044  # the run sandbox's own uid reads the set
    assert (got.path / "alpha").stat().st_mode & 0o055 == 0o055
