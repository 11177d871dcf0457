"""Escape attempts against the local backend's sandbox: each test is code a hostile caller could send.

Every test talks to LocalBackend only through its public API and checks both sides: what the code inside could do,
and that the server (this process) and the host are untouched.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from code_interpreter_mcp.backends.base import ContainerState, ExecOutcome, ExecRequest, RemoteFile, no_progress
from code_interpreter_mcp.backends.local import LocalBackend
from code_interpreter_mcp.backends.local.sandbox import uids
from code_interpreter_mcp.errors import FileNotFound, PathRefused
from tests.helpers import MakeBackend

pytestmark = pytest.mark.anyio

SECRET = "sk-test-DO-NOT-LEAK-0123456789abcdef"


@pytest.fixture
async def backend(make_backend: MakeBackend) -> LocalBackend:
    return await make_backend()


@pytest.fixture
async def container(backend: LocalBackend) -> ContainerState:
    return await backend.create_container("attacker", 600)


async def run(backend: LocalBackend, container: ContainerState, code: str, timeout: float = 20.0) -> ExecOutcome:
    return await backend.execute(container, ExecRequest(code=code, timeout_s=timeout), no_progress)


async def value(backend: LocalBackend, container: ContainerState, code: str, timeout: float = 20.0) -> Any:
    """Run code whose last line is an expression and return its value (sent back as JSON text)."""
    lines = code.rstrip("\n").split("\n")
    lines[-1] = f"__import__('json').dumps({lines[-1]})"
    out = await run(backend, container, "\n".join(lines), timeout)
    assert out.status == "ok", out
    assert out.result_repr is not None
    return json.loads(eval(out.result_repr))  # a repr of a str, made by our own json.dumps


def host_rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------------------------ secrets


async def test_api_key_never_reaches_the_sandbox(make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("CODE_INTERPRETER_AUTH_TOKEN", SECRET)
    # The shared registry's and store's credentials, and the replicas' secret, do not either.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{SECRET}@db/x")
    monkeypatch.setenv("CODE_INTERPRETER_CLUSTER_SECRET", SECRET)
    backend = await make_backend()
    c = await backend.create_container("s", 600)
    env = await value(backend, c, "import os\ndict(os.environ)")
    assert SECRET not in json.dumps(env)
    assert not any("KEY" in k or "TOKEN" in k or k.startswith(("OPENAI", "AZURE", "CODE_INTERPRETER")) for k in env)
    assert env["HOME"] == "/tmp" and env["MPLBACKEND"] == "Agg"
    assert env["OPENBLAS_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))  # the CPUs the sandbox may use
    # No process in the sandbox (bwrap's init included) carries it, and a child process does not either.
    code = (
        "import os, subprocess\n"
        "found = []\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit():\n"
        "        try:\n"
        "            found.append(open(f'/proc/{p}/environ', 'rb').read().decode(errors='replace'))\n"
        "        except OSError:\n"
        "            pass\n"
        "found.append(subprocess.run(['env'], capture_output=True, text=True).stdout)\n"
        "'\\n'.join(found)"
    )
    seen = await value(backend, c, code)
    assert "PATH=" in seen  # the scan did read environments
    assert SECRET not in seen


# ------------------------------------------------------------------------------------------------ network


async def test_network_is_blocked(backend: LocalBackend, container: ContainerState) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        code = (
            "import socket\n"
            "r = {}\n"
            "def attempt(name, fn):\n"
            "    try:\n"
            "        fn()\n"
            "        r[name] = 'ok'\n"
            "    except OSError as e:\n"
            "        r[name] = type(e).__name__\n"
            f"attempt('tcp_loopback', lambda: socket.create_connection(('127.0.0.1', {port}), timeout=2))\n"
            # TEST-NET-1 (RFC 5737): routed nowhere, and the sandbox has no route at all anyway.
            "attempt('tcp_out', lambda: socket.create_connection(('192.0.2.1', 80), timeout=2))\n"
            "udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "attempt('udp_out', lambda: udp.sendto(b'x', ('192.0.2.1', 53)))\n"
            "attempt('dns', lambda: socket.getaddrinfo('example.com', 80))\n"
            "r['interfaces'] = [name for _, name in socket.if_nameindex()]\n"
            "r"
        )
        r = await value(backend, container, code)
        assert r["tcp_loopback"] == "ConnectionRefusedError"
        assert r["tcp_out"] != "ok" and r["udp_out"] != "ok" and r["dns"] != "ok"
        assert r["interfaces"] == ["lo"]
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


# ------------------------------------------------------------------------------------------------ host files


async def test_host_files_are_invisible(backend: LocalBackend, tmp_path: Path) -> None:
    registry = backend.settings.data_dir / "registry.sqlite3"
    registry.write_text("registry secret")
    victim = await backend.create_container("victim", 600)
    await run(backend, victim, "open('victim_secret.txt', 'w').write('victim secret')")
    victim_file = backend.settings.containers_dir / victim.id / "data" / "victim_secret.txt"
    assert victim_file.read_text() == "victim secret"
    attacker = await backend.create_container("attacker", 600)
    targets = [
        "/root/.bashrc",
        "/root/.ssh/id_rsa",
        "/etc/hostname",
        "/etc/shadow",
        "/etc/machine-id",
        str(registry),
        str(victim_file),
        str(backend.settings.containers_dir / victim.id / "passwd"),
        str(tmp_path),
        "/proc/1/environ",
        "/proc/1/root/etc/hostname",
        "/mnt/data/../../etc/hostname",
    ]
    code = (
        "import os\n"
        "r = {}\n"
        f"for t in {targets!r}:\n"
        "    try:\n"
        "        with open(t, 'rb') as fh:\n"
        "            r[t] = 'READ ' + fh.read(40).decode(errors='replace')\n"
        "    except OSError as e:\n"
        "        r[t] = type(e).__name__\n"
        "for d in ['/root', '/home', '/work', str(os.path.dirname(" + repr(str(registry)) + "))]:\n"
        "    try:\n"
        "        r['ls ' + d] = os.listdir(d)\n"
        "    except OSError as e:\n"
        "        r['ls ' + d] = type(e).__name__\n"
        "r['ls /mnt/data'] = os.listdir('/mnt/data')\n"
        "r['ls /mnt'] = os.listdir('/mnt')\n"
        "r"
    )
    r = await value(backend, attacker, code)
    for t in targets:
        assert r[t] in ("FileNotFoundError", "PermissionError", "NotADirectoryError"), (t, r[t])
    assert r["ls /root"] in ("PermissionError", "FileNotFoundError")
    assert r["ls /home"] == "FileNotFoundError"
    # /work exists in the sandbox only as a parent of a mounted interpreter (a venv below it); it lists nothing.
    assert r["ls /work"] in ("FileNotFoundError", "PermissionError")
    assert r["ls " + os.path.dirname(str(registry))] == "FileNotFoundError"
    assert r["ls /mnt/data"] == [] and r["ls /mnt"] == ["data"]
    assert [f.path for f in await backend.list_files(attacker)] == []


async def test_writes_outside_the_data_folder_fail(backend: LocalBackend, container: ContainerState) -> None:
    import sys

    targets = [
        "/evil",
        "/usr/evil",
        "/etc/evil",
        "/etc/passwd",
        "/opt/code-interpreter/worker.py",
        "/opt/code-interpreter/evil",
        sys.prefix + "/evil",
        sys.base_prefix + "/evil",
        "/var/evil",
        "/dev/evil",
        "/proc/sys/kernel/hostname",
        "/mnt/evil",
    ]
    code = (
        "r = {}\n"
        f"for t in {targets!r}:\n"
        "    try:\n"
        "        with open(t, 'a') as fh:\n"
        "            fh.write('x')\n"
        "        r[t] = 'WROTE'\n"
        "    except OSError as e:\n"
        "        r[t] = type(e).__name__\n"
        "with open('/tmp/private-scratch', 'w') as fh:\n"
        "    fh.write('tmp is writable')\n"
        "with open('/mnt/data/allowed.txt', 'w') as fh:\n"
        "    fh.write('ok')\n"
        "r"
    )
    r = await value(backend, container, code)
    for t in targets:
        assert r[t] != "WROTE", t
    assert not Path("/tmp/private-scratch").exists()  # the sandbox's /tmp is its own tmpfs
    assert not Path("/evil").exists() and not Path("/usr/evil").exists()
    assert Path(sys.prefix, "evil").exists() is False
    assert [f.path for f in await backend.list_files(container)] == ["allowed.txt"]


async def test_symlinks_in_the_data_folder_are_never_followed(
    backend: LocalBackend, container: ContainerState, tmp_path: Path
) -> None:
    registry = backend.settings.data_dir / "registry.sqlite3"
    registry.write_text("registry secret")
    host_secret = tmp_path / "host-secret.txt"
    host_secret.write_text("host secret")
    code = (
        "import os\n"
        "os.symlink('/etc/shadow', 'shadow')\n"
        f"os.symlink({str(registry)!r}, 'registry')\n"
        f"os.symlink({str(host_secret)!r}, 'secret.txt')\n"
        "os.symlink('/etc', 'etcdir')\n"
        "os.symlink('..', 'up')\n"
        f"os.symlink({str(tmp_path)!r}, 'hostdir')\n"
        "os.mkdir('real')\n"
        "open('real/ok.txt', 'w').write('fine')\n"
        "sorted(os.listdir('.'))"
    )
    out = await run(backend, container, code)
    assert out.status == "ok", out
    listed = [f.path for f in await backend.list_files(container) if not f.skipped]
    assert listed == ["real/ok.txt"]
    attempts = ["shadow", "registry", "secret.txt", "etcdir/passwd", "up/passwd", "hostdir/host-secret.txt"]
    for i, path in enumerate(attempts):
        dest = tmp_path / "harvest" / str(i)
        with pytest.raises((PathRefused, FileNotFound)):
            await backend.fetch_file(container, RemoteFile(path=path, bytes=0, version="x"), dest, 1 << 20)
        assert not dest.exists()
    got = await backend.fetch_file(
        container, RemoteFile(path="real/ok.txt", bytes=4, version="x"), tmp_path / "harvest" / "ok", 1 << 20
    )
    assert got.bytes == 4 and (tmp_path / "harvest" / "ok").read_text() == "fine"


# ------------------------------------------------------------------------------------------------ identity


async def test_runs_as_unprivileged_uid_without_capabilities(backend: LocalBackend, container: ContainerState) -> None:
    code = (
        "import os\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)\n"
        "r = {k: status[k].strip() for k in ('CapInh', 'CapPrm', 'CapEff', 'CapAmb', 'NoNewPrivs', 'Seccomp')}\n"
        "r['uid'] = os.getresuid()\n"
        "r['gid'] = os.getresgid()\n"
        "r['groups'] = os.getgroups()\n"
        "try:\n"
        "    os.setuid(0)\n"
        "    r['setuid'] = 'ok'\n"
        "except OSError as e:\n"
        "    r['setuid'] = type(e).__name__\n"
        "r['pids'] = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "r['hostname'] = os.uname().nodename\n"
        "r"
    )
    r = await value(backend, container, code)
    assert r["CapPrm"] == r["CapEff"] == r["CapAmb"] == "0000000000000000"
    assert r["NoNewPrivs"] == "1"
    assert r["setuid"] == "PermissionError"
    assert r["pids"] == [1, 2]  # own pid namespace: bwrap's init and the worker, nothing of the host
    assert r["hostname"] == "sandbox"
    uid = r["uid"][0]
    assert uid != 0 and len(set(r["uid"])) == 1 and len(set(r["gid"])) == 1
    if backend.profile is not None and backend.profile.mode == "bwrap-root":
        assert uids.UID_BASE <= uid < uids.UID_BASE + uids.UID_SPAN
        assert container.extra["uid"] == uid
        assert r["groups"] == []
        data = backend.settings.containers_dir / container.id / "data"
        assert data.stat().st_uid == uid
    if backend.profile is not None and backend.profile.seccomp:
        assert r["Seccomp"] == "2"


async def test_user_namespaces_and_mounts_are_refused(backend: LocalBackend, container: ContainerState) -> None:
    if backend.profile is None or not backend.profile.seccomp:
        pytest.skip("no seccomp filter on this architecture")
    code = (
        "import ctypes, os, shutil, subprocess\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "r = {}\n"
        "r['unshare_user'] = libc.unshare(0x10000000) == 0 or os.strerror(ctypes.get_errno())\n"
        "r['unshare_net'] = libc.unshare(0x40000000) == 0 or os.strerror(ctypes.get_errno())\n"
        "r['mount'] = libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0 or os.strerror(ctypes.get_errno())\n"
        "if shutil.which('unshare'):\n"
        "    r['unshare_cmd'] = subprocess.run(['unshare', '-U', 'true'], capture_output=True).returncode\n"
        "import threading\n"
        "t = threading.Thread(target=lambda: None)\n"
        "t.start()\n"
        "t.join()\n"
        "r['threads_work'] = True\n"
        "r['fork_works'] = subprocess.run(['true']).returncode == 0\n"
        "r"
    )
    r = await value(backend, container, code)
    assert r["unshare_user"] == "Operation not permitted"
    assert r["unshare_net"] == "Operation not permitted"
    assert r["mount"] == "Operation not permitted"
    assert r.get("unshare_cmd", 1) != 0
    assert r["threads_work"] and r["fork_works"]


async def test_containers_cannot_see_each_other(backend: LocalBackend) -> None:
    a = await backend.create_container("a", 600)
    b = await backend.create_container("b", 600)
    record = backend._containers.get(a.id)
    worker_a = record.worker if record is not None else None
    assert worker_a is not None and worker_a.worker_pid is not None
    code = (
        "import os\n"
        "r = {}\n"
        f"for pid in ({worker_a.worker_pid}, {os.getpid()}):\n"
        "    try:\n"
        "        os.kill(pid, 0)\n"
        "        r[str(pid)] = 'visible'\n"
        "    except OSError as e:\n"
        "        r[str(pid)] = type(e).__name__\n"
        "r"
    )
    r = await value(backend, b, code)
    assert set(r.values()) == {"ProcessLookupError"}
    if backend.profile is not None and backend.profile.mode == "bwrap-root":
        assert a.extra["uid"] != b.extra["uid"]


# ------------------------------------------------------------------------------------------------ resource bombs


async def test_fork_bomb_is_contained(make_backend: MakeBackend) -> None:
    backend = await make_backend(max_processes=16, interrupt_grace_s=1.0)
    if backend.profile is None or backend.profile.mode != "bwrap-root":
        pytest.skip("RLIMIT_NPROC per container needs the dedicated-uid (root) mode")
    c = await backend.create_container("s", 600)
    await run(backend, c, "kept = 'survived'")
    # The classic bomb: forks until fork fails, which ends the run with an error.
    classic = await run(backend, c, "import os\nwhile True:\n    os.fork()", timeout=20)
    assert classic.status == "error" and classic.error is not None
    assert classic.error.type == "BlockingIOError"
    # A bomb that swallows the error and spins: the time limit stops it and the strays are killed.
    spinning = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    out = await run(backend, c, spinning, timeout=1.0)
    assert out.status == "timeout"
    assert not out.state_lost
    # Afterwards the sandbox holds only init and the worker again, and forking works.
    after = await value(
        backend,
        c,
        "import os, subprocess\n[sorted(int(p) for p in os.listdir('/proc') if "
        "p.isdigit()), subprocess.run(['true']).returncode, kept]",
    )
    assert after == [[1, 2], 0, "survived"]
    # The server process is fine and can still start new sandboxes.
    other = await backend.create_container("t", 600)
    assert (await run(backend, other, "1 + 1")).result_repr == "2"


async def test_memory_bomb_is_contained(make_backend: MakeBackend) -> None:
    backend = await make_backend(memory_mb=512)
    c = await backend.create_container("s", 600)
    await run(backend, c, "kept = 'survived'")
    rss_before = host_rss_kib()
    big = await run(backend, c, "x = bytearray(8 * 1024 ** 3)")
    assert big.status == "error" and big.error is not None and big.error.type == "MemoryError"
    grow = await run(backend, c, "blocks = []\nwhile True:\n    blocks.append(b'x' * (32 * 1024 * 1024))")
    assert grow.status == "error" and grow.error is not None and grow.error.type == "MemoryError"
    after = await run(backend, c, "del blocks\nkept")
    assert after.status == "ok" and after.result_repr == "'survived'" and not after.state_lost
    assert host_rss_kib() - rss_before < 100 * 1024  # the server's own memory did not balloon


async def test_disk_fill_is_limited(make_backend: MakeBackend) -> None:
    backend = await make_backend(max_file_bytes=4 * 1024 * 1024, box_size_mb=64)
    c = await backend.create_container("s", 600)
    out = await run(backend, c, "with open('huge.bin', 'wb') as fh:\n    fh.truncate(10 ** 12)")
    assert out.status == "error" and out.error is not None and "File too large" in out.error.message
    tmp = await run(backend, c, "with open('/tmp/fill', 'wb') as fh:\n    while True:\n        fh.write(b'x' * 2**20)")
    assert tmp.status == "error" and tmp.error is not None
    assert "File too large" in tmp.error.message or "No space left" in tmp.error.message
    assert (await run(backend, c, "'ok'")).result_repr == "'ok'"
