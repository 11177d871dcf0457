"""`run_code(packages=...)` through a real in-memory MCP client on the real local backend: install and import in
the sandbox, the set shared and remembered, errors that leave the session working, policy, a set added to a live
worker, and a wheel whose import-time code tries to escape. Wheels are built by the tests (tests/wheels.py) and
served from a local folder or a loopback index; nothing needs the internet."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from code_interpreter_mcp.app import build_server
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine import Engine
from code_interpreter_mcp.engine.packages import merge_requirements
from code_interpreter_mcp.models import RunResult
from code_interpreter_mcp.packages.installer import Installer
from code_interpreter_mcp.sessions import Registry
from tests.helpers import structured, text_of
from tests.wheels import build_wheel, serve_index, write_simple_index

pytestmark = pytest.mark.anyio


def settings_for(tmp_path: Path, wheels: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "package_find_links": str(wheels),
        "default_timeout_s": 30,
        "reaper_interval_s": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


class Served:
    """An in-memory client and the engine behind it."""

    def __init__(self, client: Client, engine: Engine) -> None:
        self.client = client
        self.engine = engine

    async def run(self, code: str, **kw: Any) -> dict[str, Any]:
        r = await self.client.call_tool("run_code", {"code": code, **kw})
        s = structured(r)
        RunResult.model_validate(s)
        return s

    async def fail(self, code: str, **kw: Any) -> str:
        r = await self.client.call_tool("run_code", {"code": code, **kw})
        assert r.is_error and r.structured_content is None, r.content
        return text_of(r)


async def serve(settings: Settings) -> AsyncIterator[Served]:
    engine = Engine(settings)
    async with Client(build_server(settings, engine=engine), raise_exceptions=True) as client:
        yield Served(client, engine)


@pytest.fixture
async def served(tmp_path: Path, wheels: Path, sandbox_ok: None) -> AsyncIterator[Served]:
    async for s in serve(settings_for(tmp_path, wheels)):
        yield s


@pytest.fixture
def installer_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every installer command run (resolve or install), by name."""
    runs: list[str] = []
    for name in ("install", "resolve"):
        original = getattr(Installer, name)

        def spy(self: Installer, *args: Any, _original: Any = original, _name: str = name, **kw: Any) -> Any:
            runs.append(_name)
            return _original(self, *args, **kw)

        monkeypatch.setattr(Installer, name, spy)
    return runs


def dists(result: dict[str, Any]) -> dict[str, str]:
    return {d["name"]: d["version"] for d in result["packages"]["distributions"]}


async def test_install_import_progress_and_a_second_session_reuses_the_set(
    served: Served, installer_runs: list[str]
) -> None:
    seen: list[str] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")

    r = await served.client.call_tool(
        "run_code",
        {"code": "import alpha, sys\n(alpha.VERSION, alpha.__file__, sys.path[0])", "packages": ["beta"]},
        progress_callback=progress,
    )
    first = structured(r)
    assert first["status"] == "ok", first
    assert dists(first) == {"alpha": "2.0", "beta": "1.0"}  # the dependency came along
    version, where, head = eval(first["result"])
    assert version == "2.0" and where.startswith("/opt/packages/") and head == str(Path(where).parent.parent)
    assert first["packages"]["reused"] is False and first["packages"]["seconds"] > 0
    assert first["packages"]["requirements"] == ["beta"]
    assert "packages: alpha 2.0, beta 1.0 (installed in" in text_of(r)
    assert any("resolving" in m for m in seen) and any("installing" in m for m in seen), seen
    assert installer_runs

    again = await served.run("import beta; beta.VERSION", session_id=first["session_id"])
    assert again["result"] == "'1.0'" and again["packages"]["reused"] is True and again["packages"]["seconds"] == 0

    installer_runs.clear()
    fresh = await served.engine.reg.create_session(None)
    second = await served.run("import beta; beta.VERSION", packages=["beta"], session_id=fresh.id)
    assert second["session_id"] != first["session_id"] and second["container_id"] != first["container_id"]
    assert second["result"] == "'1.0'" and second["packages"]["reused"] is True
    assert installer_runs == []  # the second session paid nothing: no installer command ran


async def test_pth_files_of_a_set_never_run(served: Served) -> None:
    r = await served.run("import builtins, withpth\nhasattr(builtins, 'PTH_RAN')", packages=["withpth"])
    assert r["status"] == "ok" and r["result"] == "False", r


async def test_the_sandbox_stays_offline_after_installing_from_a_loopback_index(
    tmp_path: Path, wheels: Path, sandbox_ok: None
) -> None:
    index = write_simple_index(wheels, tmp_path / "index")
    with serve_index(index.parent) as url:
        settings = settings_for(tmp_path, wheels, package_find_links=None, package_index_url=url)
        async for s in serve(settings):
            probe = (
                "import socket, urllib.request\n"
                "try:\n"
                f"    urllib.request.urlopen({url!r}, timeout=3).read(); reached = True\n"
                "except OSError as exc:\n"
                "    reached = type(exc).__name__\n"
                "import alpha\n"
                "(alpha.VERSION, reached, sorted(n for _, n in socket.if_nameindex()))"
            )
            r = await s.run(probe, packages=["alpha==1.0"])
            assert r["status"] == "ok", r
            version, reached, interfaces = eval(r["result"])
            assert version == "1.0"
            assert reached is not True  # the index the installer used is not reachable from the sandbox
            assert interfaces == ["lo"]


async def test_pep723_block_and_later_packages_keep_the_variables(served: Served) -> None:
    block = '# /// script\n# dependencies = ["gamma"]\n# ///\n'
    code = block + "import gamma, alpha\nx = 41\n(gamma.VERSION, alpha.VERSION)"
    first = await served.run(code)
    assert first["result"] == "('1.0', '1.0')", first
    assert dists(first) == {"alpha": "1.0", "gamma": "1.0"}
    sid = first["session_id"]

    added = await served.run("import delta\nx += 1\n(x, delta.VERSION)", packages=["delta"], session_id=sid)
    assert added["result"] == "(42, '1.0')", added
    assert added["container"]["state_lost"] is False and added["warnings"] == []
    assert added["packages"]["requirements"] == ["delta", "gamma"]


async def test_a_new_version_of_an_imported_module_is_reported_not_mixed(served: Served) -> None:
    first = await served.run("import alpha\nx = 1\nalpha.VERSION", packages=["alpha<2"])
    sid = first["session_id"]
    assert first["result"] == "'1.0'"
    upgraded = await served.run("import alpha, sys\n(x, alpha.VERSION)", packages=["alpha>=2"], session_id=sid)
    assert upgraded["result"] == "(1, '1.0')", upgraded  # variables kept; the imported module is not swapped
    assert upgraded["container"]["state_lost"] is False
    assert any("'alpha' was already imported" in w and "restarts" in w for w in upgraded["warnings"]), upgraded
    assert dists(upgraded) == {"alpha": "2.0"}
    fresh = await served.run("import importlib.util\nimportlib.util.find_spec('alpha').origin", session_id=sid)
    assert "/opt/packages/" in fresh["result"] and fresh["warnings"] == []
    await served.client.call_tool("close_session", {"session_id": sid})
    restarted = await served.engine.reg.create_session(None)
    assert restarted.packages == []


async def test_errors_are_clear_and_leave_the_session_working(served: Served) -> None:
    first = await served.run("x = 7\nimport alpha\nalpha.VERSION", packages=["alpha"])
    sid = first["session_id"]
    cases = {
        "package_conflict": ["beta", "gamma"],
        "package_not_found": ["no-such-project"],
        "package_no_wheel": ["winonly"],
        "bad_requirement": ["alpha @ https://example.com/alpha.whl"],
    }
    for code, packages in cases.items():
        message = await served.fail("x", packages=packages, session_id=sid)
        assert f"[{code}]" in message and "Hint:" in message, message
    bad_block = await served.fail("# /// script\n# dependencies = 'alpha'\n# ///\n1", session_id=sid)
    assert "[bad_requirement]" in bad_block
    after = await served.run("import alpha\n(x, alpha.VERSION)", session_id=sid)
    assert after["result"] == "(7, '2.0')" and after["container"]["state_lost"] is False
    assert after["packages"]["requirements"] == ["alpha"]  # the failed asks were not remembered


async def test_policy_off_and_allowlist(tmp_path: Path, wheels: Path, sandbox_ok: None) -> None:
    async for s in serve(settings_for(tmp_path / "off", wheels, packages="off")):
        message = await s.fail("1", packages=["alpha"])
        assert "[package_refused]" in message and "turned off" in message
        block = await s.fail('# /// script\n# dependencies = ["alpha"]\n# ///\n1')
        assert "[package_refused]" in block
        assert (await s.run("import os\nos.path.exists('/opt/packages')"))["result"] == "False"  # nothing bound
    allow = settings_for(tmp_path / "allow", wheels, packages="allowlist", package_allowlist=["alpha", "beta"])
    async for s in serve(allow):
        ok = await s.run("import beta; beta.VERSION", packages=["beta"])
        assert ok["result"] == "'1.0'"  # its dependency (alpha) comes from the index the operator chose
        message = await s.fail("1", packages=["delta"], session_id=ok["session_id"])
        assert "[package_refused]" in message and "delta" in message and "alpha, beta" in message
        assert (await s.run("beta.VERSION", session_id=ok["session_id"]))["result"] == "'1.0'"


async def test_the_set_comes_back_in_a_replacement_container_even_after_eviction(
    tmp_path: Path, wheels: Path, sandbox_ok: None
) -> None:
    settings = settings_for(tmp_path, wheels, expiry_minutes=0.02)
    async for s in serve(settings):
        first = await s.run("import alpha\nx = 1\nalpha.VERSION", packages=["alpha<2"])
        sid = first["session_id"]
        store = s.engine.packages.manager.store
        key = next(iter(store.leased()))
        with anyio.fail_after(10):
            while store.leased():  # the reaper retires the idle container: its lease is given back
                await anyio.sleep(0.1)
        store.quota_bytes = 0
        assert key in await anyio.to_thread.run_sync(store.evict, set())  # dropped from the cache meanwhile
        again = await s.run("import alpha\nalpha.VERSION", session_id=sid)
        assert again["container_id"] != first["container_id"]
        # The package set is installed before the session's variables are loaded from their snapshot.
        assert again["container"]["state_lost"] is False and again["container"]["state_restored"]["restored"] == [
            "alpha",
            "x",
        ]
        assert again["result"] == "'1.0'"  # remembered, installed again without being asked
        assert again["packages"]["reused"] is False and again["packages"]["requirements"] == ["alpha<2"]
        assert not any("alpha" in w for w in again["warnings"])


async def test_a_wheel_cannot_read_another_session_or_write_into_the_store(
    tmp_path: Path, wheels: Path, sandbox_ok: None
) -> None:
    (tmp_path / "snoop-wheels").mkdir()  # the wheel is built below, once the victim's path is known
    settings = settings_for(tmp_path, tmp_path / "snoop-wheels")
    async for s in serve(settings):
        victim = await s.run("open('secret.txt', 'w').write('victim data')")
        victim_data = settings.containers_dir / victim["container_id"] / "data"
        assert (victim_data / "secret.txt").read_text() == "victim data"
        sets = settings.package_sets_path
        probe = (
            "import os\n"
            "HERE = os.path.dirname(__file__)\n"
            "def attempt(fn):\n"
            "    try:\n"
            "        fn()\n"
            "        return 'yes'\n"
            "    except OSError as exc:\n"
            "        return type(exc).__name__\n"
            f"READ = attempt(lambda: open({str(victim_data / 'secret.txt')!r}).read())\n"
            f"LIST = attempt(lambda: os.listdir({str(settings.containers_dir)!r}))\n"
            "WRITE_SET = attempt(lambda: open(os.path.join(HERE, 'pwned.py'), 'w').write('x'))\n"
            "WRITE_STORE = attempt(lambda: os.mkdir(os.path.join(HERE, '..', '..', 'evil')))\n"
            f"WRITE_HOST_STORE = attempt(lambda: open({str(sets / 'evil.txt')!r}, 'w').write('x'))\n"
        )
        build_wheel(tmp_path / "snoop-wheels", "snoop", "1.0", extra_files={"snoop/__init__.py": probe.encode()})
        fresh = await s.engine.reg.create_session(None)
        r = await s.run(
            "import snoop\n(snoop.READ, snoop.LIST, snoop.WRITE_SET, snoop.WRITE_STORE, snoop.WRITE_HOST_STORE)",
            packages=["snoop"],
            session_id=fresh.id,
        )
        assert r["status"] == "ok", r
        outcomes = eval(r["result"])
        assert "yes" not in outcomes, outcomes
        site = next(sets.glob("*/site/snoop")).parent
        assert not (site / "snoop" / "pwned.py").exists() and not (sets / "evil").exists()
        assert not (sets / "evil.txt").exists()


async def test_openai_backend_refuses_packages_and_keeps_the_session(tmp_path: Path, emu: Any) -> None:
    from tests.helpers import emulator_client

    async with emulator_client(emu, tmp_path) as client:
        r = await client.call_tool("run_code", {"code": "print(1)", "packages": ["tabulate"]})
        assert r.is_error
        message = text_of(r)
        assert "[packages_unsupported]" in message and "openai" in message and "scikit-learn" in message
        block = await client.call_tool("run_code", {"code": '# /// script\n# dependencies = ["x"]\n# ///\n1'})
        assert "[packages_unsupported]" in text_of(block)
        ok = await client.call_tool("run_code", {"code": "print(1)"})
        assert structured(ok)["status"] == "ok" and structured(ok)["packages"] is None


async def test_a_crashed_worker_gets_the_set_again(served: Served) -> None:
    first = await served.run("import alpha\nalpha.VERSION", packages=["alpha<2"])
    sid = first["session_id"]
    crashed = await served.run("import os\nos._exit(3)", session_id=sid)
    assert crashed["status"] == "error" and crashed["container"]["state_lost"] is True  # the run that saw it says so
    again = await served.run("import alpha\nalpha.VERSION", session_id=sid)
    assert again["result"] == "'1.0'"  # a new worker, the same set
    assert again["container_id"] == first["container_id"] and again["packages"]["reused"] is True


async def test_a_slow_install_times_out_or_is_cancelled_with_the_call(
    tmp_path: Path, wheels: Path, sandbox_ok: None
) -> None:
    with socket.socket() as hanging:  # accepts connections and never answers
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(64)
        url = f"http://127.0.0.1:{hanging.getsockname()[1]}/simple/"
        settings = settings_for(
            tmp_path, wheels, package_find_links=None, package_index_url=url, package_install_timeout_s=1.5
        )
        async for s in serve(settings):
            first = await s.run("x = 5")
            sid = first["session_id"]
            message = await s.fail("x", packages=["alpha"], session_id=sid)
            assert "[package_timeout]" in message and "1.5 s" in message
            with anyio.move_on_after(0.7) as scope:
                await s.client.call_tool("run_code", {"code": "x", "packages": ["beta"], "session_id": sid})
            assert scope.cancelled_caught
            # The call is gone, its run is not (clients cancel on their own timeouts): the install times out.
            # In memory no notifications/cancelled is sent, so the run goes on and the next one queues behind it.
            queued = structured(await s.client.call_tool("run_code", {"code": "x", "session_id": sid, "wait_s": 0}))
            assert queued["status"] == "queued"
            ended = await s.client.call_tool("get_run", {"run_id": queued["waits_for"], "wait_s": 20})
            assert ended.is_error and "[package_timeout]" in text_of(ended)
            after = await s.run("x", session_id=sid)
            assert after["result"] == "5" and after["packages"] is None


def test_merge_requirements_takes_the_latest_constraint_per_name() -> None:
    assert merge_requirements([], ["Tabulate"]) == ["tabulate"]
    assert merge_requirements(["alpha<2", "gamma"], ["alpha>=2", "delta"]) == ["alpha>=2", "delta", "gamma"]
    assert merge_requirements(["scikit-learn>=1.5"], ["scikit_learn"]) == ["scikit-learn"]


def test_an_older_registry_gets_the_packages_column(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite3"
    old = sqlite3.connect(db)
    old.executescript(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, owner TEXT, created_at REAL NOT NULL, "
        "last_used_at REAL NOT NULL, closed INTEGER NOT NULL DEFAULT 0, current_container TEXT);"
        "INSERT INTO sessions (id, owner, created_at, last_used_at) VALUES ('s_" + "0" * 32 + "', NULL, 1, 1);"
    )
    old.commit()
    old.close()

    async def check() -> None:
        reg = Registry(db)
        try:
            session = await reg.get_session("s_" + "0" * 32, None)
            assert session.packages == []
            await reg.save_packages(session, ["alpha<2"])
        finally:
            reg.close()
        again = Registry(db)
        try:
            assert (await again.get_session(session.id, None)).packages == ["alpha<2"]
        finally:
            again.close()

    anyio.run(check)


async def test_a_container_found_expired_mid_call_hands_its_set_to_the_new_one(served: Served) -> None:
    first = await served.run("import alpha\nalpha.VERSION", packages=["alpha<2"])
    store = served.engine.packages.manager.store
    (key,) = store.leased()
    # The backend finds the container expired when the run reaches it (the engine's record still looked fresh).
    served.engine.backend._containers.get(first["container_id"]).state.last_active_at = 0  # type: ignore[attr-defined]
    again = await served.run("import alpha\nalpha.VERSION", session_id=first["session_id"])
    assert again["container_id"] != first["container_id"] and again["container"]["state_lost"] is True
    assert again["result"] == "'1.0'"
    assert store.leased() == {key: 1}  # the new container's lease; the old one gave its own back
