"""The installer sandbox holds: a command run exactly as the installer is (same argv, same environment) cannot
read the data folder, the home folder or the server's secrets, cannot write outside its target and the installer's
cache, and cannot touch sets already installed; a build script (when builds are allowed) runs there too."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.packages import PackageManager
from code_interpreter_mcp.packages.sandbox import Bwrap, find_bwrap, probe_bwrap
from tests.wheels import build_probing_sdist, build_wheel, serve_index, write_simple_index

pytestmark = pytest.mark.anyio

PROBE = r"""
import json, os, socket, sys
checks = json.loads(sys.argv[1])
out = {}
for name, path in checks["read"].items():
    try:
        open(path).read()
        out[name] = "read"
    except OSError as exc:
        out[name] = type(exc).__name__
for name, path in checks["write"].items():
    try:
        with open(path, "w") as fh:
            fh.write("x")
        out[name] = "written"
    except OSError as exc:
        out[name] = type(exc).__name__
for name, path in checks["list"].items():
    try:
        out[name] = sorted(os.listdir(path))
    except OSError as exc:
        out[name] = type(exc).__name__
out["env"] = dict(os.environ)
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
with open("/proc/self/status") as fh:
    out["cap_eff"] = [line.split()[1] for line in fh if line.startswith("CapEff")][0]
try:
    socket.create_connection(("127.0.0.1", checks["port"]), timeout=5).close()
    out["loopback"] = "connected"
except OSError as exc:
    out["loopback"] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.fixture
def sandbox_ok() -> None:
    path = find_bwrap()
    if path is None or not isinstance(probe_bwrap(path), Bwrap):
        pytest.skip("bubblewrap cannot build the installer sandbox on this machine")


def manager(tmp_path: Path, **overrides: Any) -> PackageManager:
    wheels = tmp_path / "wheels"
    if not wheels.exists():
        build_wheel(wheels, "alpha", "1.0")
    values: dict[str, Any] = {"data_dir": tmp_path / "data", "package_find_links": str(wheels)}
    values.update(overrides)
    return PackageManager(Settings(**values))


async def test_installer_sandbox_sees_only_its_target_and_cache(
    tmp_path: Path, sandbox_ok: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "OPENAI_API_KEY": "sk-test-abcdefghijklmnop",
        "GITHUB_TOKEN": "ghp_secret",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "UV_INDEX_PRIVATE_PASSWORD": "hunter2",
        "CODE_INTERPRETER_AUTH_TOKEN": "bearer-secret",
    }.items():
        monkeypatch.setenv(name, value)
    pm = manager(tmp_path)
    data = pm.settings.data_dir
    data.mkdir(parents=True)
    (data / "registry.sqlite3").write_text("planted: session data")
    (data / "files").mkdir()
    (data / "files" / "secret.txt").write_text("planted: a user's file")
    existing = await pm.ensure(["alpha"])
    installer = pm._installer
    assert installer is not None and installer.isolation == "bubblewrap"

    work = pm.store.new_workdir()
    (work / "site").mkdir()
    script = work / "probe.py"
    script.write_text(PROBE)
    home = Path.home()
    outside = tmp_path / "outside.txt"
    write_simple_index(tmp_path / "wheels", tmp_path / "index")
    with serve_index(tmp_path / "index") as url:
        checks = {
            "read": {
                "data_registry": str(data / "registry.sqlite3"),
                "data_file": str(data / "files" / "secret.txt"),
                "host_passwd_shadow": "/etc/shadow",
                "home_bashrc": str(home / ".bashrc"),
            },
            "write": {
                "target": str(work / "site" / "ok.txt"),
                "tool_cache": str(installer.tool_cache / "ok.txt"),
                "data_folder": str(data / "escape.txt"),
                "cache_root": str(pm.store.root / "escape.txt"),
                "existing_set": str(existing.path / "alpha" / "__init__.py"),
                "wheel_folder": str(tmp_path / "wheels" / "escape.txt"),
                "host_tmp": str(outside),
                "usr": "/usr/escape.txt",
            },
            "list": {"data": str(data), "home": str(home), "cache_root": str(pm.store.root)},
            "port": int(url.split(":")[2].split("/")[0]),
        }
        done = await installer.run([sys.executable, "-I", str(script), json.dumps(checks)], work)
    seen = json.loads(done.stdout)

    for name in ("data_registry", "data_file", "host_passwd_shadow", "home_bashrc"):
        assert seen[name] != "read", name
    assert seen["target"] == "written" and seen["tool_cache"] == "written"
    for name in ("data_folder", "cache_root", "existing_set", "wheel_folder", "usr"):
        assert seen[name] != "written", name
    # Inside, /tmp is private: what is written there never reaches the host.
    assert not outside.exists()
    assert not (data / "escape.txt").exists() and not (pm.store.root / "escape.txt").exists()
    assert (existing.path / "alpha" / "__init__.py").read_text() == "VERSION = '1.0'\n"
    assert (work / "site" / "ok.txt").read_text() == "x"
    # Folders on the way to what is bound can be traversed, not listed.
    assert seen["data"] == "PermissionError" and seen["cache_root"] == "PermissionError"
    assert seen["home"] in ("PermissionError", "FileNotFoundError")
    env = seen["env"]
    assert env["HOME"] == "/tmp/home"
    leaked = [k for k in env if any(s in k for s in ("KEY", "TOKEN", "SECRET", "PASSWORD"))]
    assert leaked == []
    assert not any("sk-test" in v or "hunter2" in v or "bearer-secret" in v for v in env.values())
    assert seen["cap_eff"] == "0000000000000000"
    assert len(seen["pids"]) <= 3  # its own pid namespace: no host process is visible
    assert seen["loopback"] == "connected"  # the index is reachable: the network is shared
    await pm.aclose()


async def test_builds_when_allowed_run_inside_the_sandbox(
    tmp_path: Path, sandbox_ok: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-abcdefghijklmnop")
    data = tmp_path / "data"
    data.mkdir()
    planted = data / "planted.txt"
    planted.write_text("the build script must not read this")
    wheels = tmp_path / "wheels"
    build_probing_sdist(wheels, "probing", "1.0", planted)
    pm = manager(tmp_path, package_allow_builds=True, data_dir=data)
    got = await pm.ensure(["probing"])
    probe = (got.path / "probing" / "probe.txt").read_text()
    assert "read: no" in probe
    assert "home: /tmp/home" in probe
    assert "secrets: \n" in probe
    assert sorted(os.listdir(data)) == ["packages", "planted.txt"]
    # Without the opt-in the same sdist is refused: no build script runs at all.
    from code_interpreter_mcp.errors import PackageNoWheel

    with pytest.raises(PackageNoWheel):
        await manager(tmp_path, data_dir=tmp_path / "data2").ensure(["probing"])
    await pm.aclose()
