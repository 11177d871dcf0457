"""LocalBackend: containers are folders on this host, each with one long-lived Python worker in bubblewrap.

A container is `settings.containers_dir / <id>` holding `data/` (mounted at /mnt/data in the sandbox, the worker's
cwd), the sandbox's /etc/passwd and /etc/group, and the worker's start-up log. The worker starts eagerly in
`create_container`, keeps its state between runs, and is respawned lazily (reporting `state_lost`) after it died or
had to be killed.

Run control: a wall-clock timeout sends SIGINT (state kept, status "timeout"), then after
`settings.interrupt_grace_s` kills the sandbox. Cancelling the calling task does the same, shielded.

Disk quota (`settings.box_size_mb`): RLIMIT_FSIZE caps each file at `max_file_bytes`, and a host-side monitor
thread measures each live container's data folder every `quota_check_interval_s` (0.5 s): a run that pushes the
folder past its quota is interrupted with a DiskQuotaExceeded error, and a worker that keeps growing an
over-quota folder between runs (a background writer) is stopped. A folder over quota stays usable, so code can
delete files; uploads that would not fit are refused. A --size tmpfs cannot serve here: files must persist on the
host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from ...config import Settings
from ...errors import BackendError, ContainerExpired, SandboxUnavailable
from ..base import (
    Capabilities,
    ContainerState,
    ExecError,
    ExecOutcome,
    ExecRequest,
    FetchResult,
    Progress,
    RemoteFile,
    RepairOutcome,
)
from . import files, protocol, sandbox
from .process import WorkerGone, WorkerProcess, WorkerStartError, describe_exit
from .streaming import CaptureTail

logger = logging.getLogger(__name__)

# How long a run's answer is awaited by busy-waiting before the event loop takes over: long enough for a trivial
# run (about 20 us in the worker), short enough that other sessions never notice the loop was held.
SPIN_S = 0.0002

UNSAFE_WARNING = (
    "UNSANDBOXED: this run had no isolation (unsafe_no_sandbox): the code could read and write the server's files "
    "and reach the network."
)
_LOST_SUFFIX = "Variables and imports are lost; files in /mnt/data are kept."
_PROBE_CODE = """\
import os, socket
r = {{"uid": os.getuid(), "gid": os.getgid()}}
with open("/proc/self/status") as fh:
    r["cap_eff"] = next((l.split()[1] for l in fh if l.startswith("CapEff:")), None)
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    r["net"] = "connected"
except OSError as e:
    r["net"] = type(e).__name__
r["host_dir_visible"] = os.path.exists({host_dir!r})
try:
    open("/probe-escape", "w").close()
    r["write_root"] = "ok"
except OSError as e:
    r["write_root"] = type(e).__name__
if {check_userns}:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    r["unshare"] = "ok" if libc.unshare(0x10000000) == 0 else os.strerror(ctypes.get_errno())
r
"""


class _Container:
    """The backend's own record of one container."""

    def __init__(self, state: ContainerState, root: Path, uid: int | None, gid: int | None, quota: int) -> None:
        self.state = state
        self.root = root
        self.data = root / "data"
        self.uid = uid
        self.gid = gid
        self.lock = anyio.Lock()
        self.worker: WorkerProcess | None = None
        self.had_worker = False
        self.state_lost_pending = False
        self.pending_warnings: list[str] = []
        self.destroyed = False
        self.quota_hit: int | None = None  # set (on the loop) when the monitor saw a run overfill the folder
        self.quota_mark = quota  # written by the monitor thread only
        self.usage = 0
        self.user_versions: dict[str, str] = {}
        self.scan_inline = True


class _QuotaMonitor(threading.Thread):
    """Measures every live container's data folder and reports growth past the quota to the event loop."""

    def __init__(self, backend: LocalBackend, token: Any, interval: float) -> None:
        super().__init__(name="ci-local-quota", daemon=True)
        self.backend = backend
        self.token = token
        self.interval = interval
        self.stop = threading.Event()

    def run(self) -> None:
        quota = self.backend.quota_bytes
        delay = self.interval
        while not self.stop.wait(delay):
            spent = 0.0
            try:
                containers = list(self.backend._containers.values())
            except RuntimeError:  # changed size under us: next round
                continue
            for c in containers:
                if c.destroyed or c.worker is None or self.stop.is_set():
                    continue
                try:
                    result = files.scan(c.data, with_files=False)
                except OSError:  # being deleted
                    continue
                spent += result.seconds
                c.usage = result.usage_bytes
                if result.usage_bytes > quota and result.usage_bytes > c.quota_mark:
                    c.quota_mark = result.usage_bytes
                    try:
                        anyio.from_thread.run(self.backend._quota_exceeded, c, token=self.token)
                    except Exception:  # the event loop is gone: nothing left to watch
                        logger.debug("quota monitor stopping", exc_info=True)
                        return
                elif result.usage_bytes <= quota:
                    c.quota_mark = quota
            # Huge folders: never spend more than ~10% of the time scanning.
            delay = max(self.interval, spent * 10)


class LocalBackend:
    """The `local` backend. Construct with `LocalBackend(settings)`, then `await start()`."""

    name = "local"
    capabilities = Capabilities(model=False, signals_code_done=False, streams_output=True)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.isolation = "bubblewrap"
        self.profile: sandbox.Profile | None = None
        self.quota_bytes = int(settings.box_size_mb) * 1024 * 1024
        self._containers: dict[str, _Container] = {}
        self._uids: set[int] = set()
        self._seccomp = sandbox.seccomp_program()
        self._mpl_cache: Path | None = None
        self._monitor: _QuotaMonitor | None = None
        self._started = False
        self._probe_failures: list[str] = []

    # ------------------------------------------------------------------------------------------ settings

    def _opt(self, name: str, default: Any) -> Any:
        value = getattr(self.settings, name, None)
        return default if value is None else value

    @property
    def containers_dir(self) -> Path:
        return self.settings.containers_dir

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._started:
            return
        await anyio.to_thread.run_sync(self._prepare_root)
        profile = await self._choose_profile()
        if profile is None:
            detail = "; ".join(self._probe_failures) or "unknown reason"
            if not self.settings.unsafe_no_sandbox:
                raise SandboxUnavailable(f"bubblewrap isolation is not usable on this host: {detail}")
            profile = sandbox.Profile(mode="none", notes=[detail])
            logger.warning(
                "!!! UNSAFE: running Python code WITHOUT a sandbox (unsafe_no_sandbox is set; bubblewrap: %s). "
                "Code can read and write this user's files and use the network. Only rlimits apply. !!!",
                detail,
            )
        self.profile = profile
        self.isolation = profile.isolation
        if self._opt("local_font_cache", True):
            cache_root = Path(self._opt("local_cache_dir", _default_cache_dir()))
            try:
                self._mpl_cache = await anyio.to_thread.run_sync(sandbox.prebuild_font_cache, cache_root)
            except Exception as exc:  # an optimisation only
                logger.warning("matplotlib font cache not prebuilt: %s", exc)
        interval = float(self._opt("quota_check_interval_s", 0.5))
        self._monitor = _QuotaMonitor(self, anyio.lowlevel.current_token(), interval)
        self._monitor.start()
        self._started = True
        logger.info("local backend ready: %s", self.describe())

    def _prepare_root(self) -> None:
        self.containers_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.containers_dir, 0o700)
        for stale in self.containers_dir.glob(".probe-*"):
            shutil.rmtree(stale, ignore_errors=True)

    async def aclose(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop.set()
            await anyio.to_thread.run_sync(monitor.join, 5.0)
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for c in list(self._containers.values()):
                    if c.worker is not None:
                        worker, c.worker = c.worker, None
                        tg.start_soon(worker.kill)
        self._started = False

    # ------------------------------------------------------------------------------------------ isolation probe

    async def _choose_profile(self) -> sandbox.Profile | None:
        path = sandbox.find_bwrap(getattr(self.settings, "bwrap_path", None))
        if path is None:
            self._probe_failures.append("bwrap is not installed (apt-get install bubblewrap)")
            return None
        try:
            info = await anyio.to_thread.run_sync(sandbox.inspect_bwrap, path)
        except (OSError, Exception) as exc:
            self._probe_failures.append(f"{path} does not run: {exc}")
            return None
        modes: list[sandbox.Mode] = []
        if os.geteuid() == 0:
            if not info.has_perms:
                self._probe_failures.append(f"bwrap {info.version} lacks --perms (need 0.8 or later) for root mode")
            elif not sandbox.uid_range_mapped():
                self._probe_failures.append("the dedicated uid range is not mapped in this user namespace")
            else:
                modes.append("bwrap-root")
        modes.append("bwrap-userns")
        for mode in modes:
            for use_seccomp in (True, False) if self._seccomp is not None else (False,):
                profile = sandbox.Profile(mode=mode, bwrap=info, seccomp=use_seccomp)
                if mode == "bwrap-userns" and os.geteuid() == 0:
                    profile.notes.append("root server without dedicated uids: RLIMIT_NPROC does not apply")
                if not use_seccomp:
                    profile.notes.append("no seccomp filter")
                try:
                    await self._probe(profile)
                except Exception as exc:
                    self._probe_failures.append(f"{mode}{'' if use_seccomp else ' without seccomp'}: {exc}")
                    logger.info("sandbox probe failed (%s): %s", mode, exc)
                    continue
                return profile
        return None

    async def _probe(self, profile: sandbox.Profile) -> None:
        """Start a real worker with this profile and check, from inside, that it is isolated."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        root = self.containers_dir / f".probe-{secrets.token_hex(6)}"
        uid, gid = self._allocate_uid(profile)
        worker = None
        try:
            await anyio.to_thread.run_sync(self._make_dirs, root, uid, gid, profile)
            c = _Container(ContainerState("probe", "local", 0, 0, 0), root, uid, gid, self.quota_bytes)
            with anyio.fail_after(60):
                worker = await self._spawn(profile, c)
                code = _PROBE_CODE.format(port=port, host_dir=str(self.containers_dir), check_userns=profile.seccomp)
                resp = await worker.request({"op": "exec", "code": code, "run": 0, "structured": True, "cap": 20000})
            if resp.get("status") != "ok" or not isinstance(resp.get("last_value_json"), str):
                err = resp.get("error") or {}
                raise RuntimeError(f"probe code failed: {err.get('traceback') or err or resp.get('stderr')}")
            r = json.loads(resp["last_value_json"])
            problems = []
            if r.get("net") == "connected":
                problems.append("the sandbox reached the host's loopback network")
            with contextlib.suppress(BlockingIOError):
                listener.accept()[0].close()
                problems.append("a connection from the sandbox arrived")
            if r.get("cap_eff") != "0000000000000000":
                problems.append(f"the sandbox kept capabilities (CapEff={r.get('cap_eff')})")
            if r.get("host_dir_visible"):
                problems.append("the server's data folder is visible in the sandbox")
            if r.get("write_root") == "ok":
                problems.append("the sandbox could write outside /mnt/data")
            if uid is not None and r.get("uid") != uid:
                problems.append(f"the sandbox runs as uid {r.get('uid')}, not the dedicated uid {uid}")
            if r.get("uid") == 0 and profile.mode == "bwrap-root":
                problems.append("the sandbox runs as root")
            if profile.seccomp and r.get("unshare") == "ok":
                problems.append("the seccomp filter did not block user namespaces")
            if problems:
                raise RuntimeError("; ".join(problems))
        finally:
            listener.close()
            with anyio.CancelScope(shield=True):
                if worker is not None:
                    await worker.kill()
                self._release_uid(uid)
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(root, ignore_errors=True))

    # ------------------------------------------------------------------------------------------ containers

    def _require_started(self) -> sandbox.Profile:
        if not self._started or self.profile is None:
            raise BackendError("The local backend is not started.", "Call start() first.")
        return self.profile

    def _allocate_uid(self, profile: sandbox.Profile) -> tuple[int | None, int | None]:
        if not profile.dedicated_uid:
            return None, None
        while True:
            uid = sandbox.UID_BASE + secrets.randbelow(sandbox.UID_SPAN)
            if uid not in self._uids:
                self._uids.add(uid)
                return uid, uid

    def _release_uid(self, uid: int | None) -> None:
        if uid is not None:
            self._uids.discard(uid)

    def _make_dirs(self, root: Path, uid: int | None, gid: int | None, profile: sandbox.Profile) -> None:
        root.mkdir(mode=0o700)
        data = root / "data"
        data.mkdir(mode=0o700)
        if uid is not None:
            os.chown(data, uid, gid if gid is not None else uid)
        if profile.mode == "none":
            (root / "tmp").mkdir(mode=0o700)
        else:
            puid = uid if uid is not None else os.getuid()
            pgid = gid if gid is not None else os.getgid()
            passwd, group = sandbox.passwd_text(puid, pgid)
            (root / "passwd").write_text(passwd)
            (root / "group").write_text(group)
            os.chmod(root / "passwd", 0o644)
            os.chmod(root / "group", 0o644)

    async def create_container(self, session_id: str, expires_after_s: float) -> ContainerState:
        profile = self._require_started()
        cid = "lc_" + secrets.token_hex(12)
        uid, gid = self._allocate_uid(profile)
        root = self.containers_dir / cid
        try:
            await anyio.to_thread.run_sync(self._make_dirs, root, uid, gid, profile)
        except BaseException:
            self._release_uid(uid)
            raise
        now = time.time()
        state = ContainerState(
            id=cid,
            backend=self.name,
            created_at=now,
            last_active_at=now,
            expires_after_s=float(expires_after_s),
            status="running",
            isolation=self.isolation,
            extra={"uid": uid} if uid is not None else {},
        )
        c = _Container(state, root, uid, gid, self.quota_bytes)
        self._containers[cid] = c
        if profile.mode == "none":
            logger.warning("UNSAFE: container %s for session %s runs code WITHOUT a sandbox", cid, session_id)
        try:
            async with c.lock:
                await self._ensure_worker(c)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.destroy(state)
            raise
        return dataclasses.replace(state, extra=dict(state.extra))

    async def _lookup(self, container: ContainerState) -> _Container:
        c = self._containers.get(container.id)
        if c is not None:
            if c.destroyed:
                raise ContainerExpired(f"Container {container.id} was deleted.")
            return c
        # Not ours in this process: a container from before a server restart, if its folder survived.
        profile = self._require_started()
        if not sandbox.valid_container_id(container.id) or not container.usable():
            raise ContainerExpired(f"Container {container.id} no longer exists.")
        root = self.containers_dir / container.id
        try:
            st = await anyio.to_thread.run_sync(os.stat, root / "data")
        except OSError:
            raise ContainerExpired(f"Container {container.id} no longer exists.") from None
        uid = gid = None
        if profile.dedicated_uid:
            uid, gid = st.st_uid, st.st_gid
            if not (sandbox.UID_BASE <= uid < sandbox.UID_BASE + sandbox.UID_SPAN) or uid in self._uids:
                raise ContainerExpired(f"Container {container.id} cannot be resumed.")
            self._uids.add(uid)
        c = self._containers.get(container.id)  # adopted concurrently meanwhile?
        if c is None:
            state = dataclasses.replace(container, status="running", isolation=self.isolation)
            c = _Container(state, root, uid, gid, self.quota_bytes)
            c.state_lost_pending = True
            self._containers[container.id] = c
            logger.info("resumed container %s from disk (its variables are gone)", container.id)
        return c

    async def refresh(self, container: ContainerState) -> ContainerState:
        c = self._containers.get(container.id)
        if c is None:
            try:
                c = await self._lookup(container)
            except ContainerExpired:
                gone = "expired" if not container.usable() else "deleted"
                status = gone if container.status == "running" else container.status
                return dataclasses.replace(container, status=status)
        state = dataclasses.replace(c.state, extra=dict(c.state.extra))
        if c.destroyed:
            state.status = "deleted"
        elif not state.usable():
            state.status = "expired"
        return state

    async def destroy(self, container: ContainerState) -> None:
        c = self._containers.pop(container.id, None)
        if c is not None:
            c.destroyed = True
            worker, c.worker = c.worker, None
            if worker is not None:
                with anyio.CancelScope(shield=True):
                    await worker.kill()
            self._release_uid(c.uid)
        if sandbox.valid_container_id(container.id):
            root = self.containers_dir / container.id
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(root, ignore_errors=True))

    # ------------------------------------------------------------------------------------------ workers

    def _worker_config(self, profile: sandbox.Profile, c: _Container) -> dict[str, Any]:
        none = profile.mode == "none"
        return {
            "uid": c.uid,
            "gid": c.gid,
            "limits": sandbox.rlimits(self.settings, profile),
            "workdir": str(c.data) if none else sandbox.WORKDIR,
            "mplconfigdir": str(c.root / "tmp" / "matplotlib") if none else sandbox.MPLCONFIGDIR_IN,
            "mpl_cache": (str(self._mpl_cache) if none else sandbox.MPL_CACHE_IN) if self._mpl_cache else None,
            "may_kill_strays": not none,
        }

    async def _spawn(self, profile: sandbox.Profile, c: _Container) -> WorkerProcess:
        cfg = self._worker_config(profile, c)
        tmp_bytes = int(self._opt("tmp_size_mb", min(int(self.settings.box_size_mb), 512))) * 1024 * 1024

        def build(fds: Any) -> tuple[list[str], dict[str, str], str]:
            cfg.update(req_fd=fds.req_r, resp_fd=fds.resp_w, out_fd=fds.out_fd, err_fd=fds.err_fd)
            if profile.mode == "none":
                tmp = str(c.root / "tmp")
                env = sandbox.sandbox_env(home=tmp, tmp=tmp, mplconfigdir=cfg["mplconfigdir"])
                return sandbox.worker_command(str(sandbox.WORKER_FILE), cfg), env, str(c.data)
            layout = sandbox.Layout(
                data_dir=c.data,
                container_dir=c.root,
                passwd=c.root / "passwd",
                group=c.root / "group",
                tmp_bytes=tmp_bytes,
                mpl_cache=self._mpl_cache,
                status_fd=fds.status_w,
                seccomp_fd=fds.seccomp_r,
            )
            worker_argv = sandbox.worker_command(f"{sandbox.WORKER_DIR_IN}/worker.py", cfg)
            env = sandbox.sandbox_env(home="/tmp", tmp="/tmp", mplconfigdir=sandbox.MPLCONFIGDIR_IN)
            return sandbox.bwrap_argv(profile, layout, worker_argv), env, "/"

        seccomp = self._seccomp if profile.seccomp else None
        return await WorkerProcess.spawn(build, c.root, profile.mode != "none", seccomp)

    async def _ensure_worker(self, c: _Container) -> tuple[WorkerProcess, bool]:
        """The container's live worker, starting one if needed; True when an earlier one was lost."""
        if c.worker is not None and c.worker.alive():
            return c.worker, False
        lost = c.had_worker
        if c.worker is not None:
            old, c.worker = c.worker, None
            await old.kill()
        profile = self._require_started()
        try:
            worker = await self._spawn(profile, c)
        except WorkerStartError as exc:
            raise BackendError(f"The sandboxed Python worker did not start: {exc}") from None
        c.worker = worker
        c.had_worker = True
        return worker, lost

    async def _quota_exceeded(self, c: _Container) -> None:
        """Called on the loop by the monitor thread: the folder grew past its quota."""
        if c.destroyed or c.worker is None:
            return
        mib = self.settings.box_size_mb
        if c.lock.locked():  # a run is in progress: its wait loop interrupts it
            c.quota_hit = c.usage
            return
        async with c.lock:
            if c.destroyed or c.worker is None or c.usage <= self.quota_bytes:
                return  # a run got in first and freed space
            logger.warning(
                "container %s: data folder over its %s MiB quota between runs; stopping its worker", c.state.id, mib
            )
            worker, c.worker = c.worker, None
            if worker is not None:
                await worker.kill()
            c.state_lost_pending = True
            c.pending_warnings.append(
                f"The worker was stopped between runs because the data folder grew past its {mib} MiB quota "
                f"(a background writer?). {_LOST_SUFFIX}"
            )

    # ------------------------------------------------------------------------------------------ execute

    async def execute(self, container: ContainerState, request: ExecRequest, progress: Progress) -> ExecOutcome:
        profile = self._require_started()
        c = await self._lookup(container)
        async with c.lock:
            if c.destroyed:
                raise ContainerExpired(f"Container {container.id} was deleted.")
            if not c.state.usable():
                raise ContainerExpired(f"Container {container.id} expired after being idle.")
            warnings = list(c.pending_warnings)
            c.pending_warnings.clear()
            state_lost = c.state_lost_pending
            c.state_lost_pending = False
            c.quota_hit = None
            worker, restarted = await self._ensure_worker(c)
            outcome = await self._run(c, worker, request, progress)
            outcome.state_lost = outcome.state_lost or state_lost or restarted
            if c.usage > self.quota_bytes:
                warnings.append(
                    f"The data folder uses {c.usage // (1024 * 1024)} MiB, over its {self.settings.box_size_mb} MiB "
                    "quota: delete files in /mnt/data; runs that keep writing are interrupted."
                )
            if profile.mode == "none":
                warnings.insert(0, UNSAFE_WARNING)
            outcome.warnings = warnings + outcome.warnings
            c.quota_hit = None
            c.state.last_active_at = time.time()
            outcome.container = dataclasses.replace(c.state, extra=dict(c.state.extra))
            return outcome

    async def _run(self, c: _Container, worker: WorkerProcess, request: ExecRequest, progress: Progress) -> ExecOutcome:
        structured = request.structured is not None
        req = {
            "op": "exec",
            "code": request.code,
            "run": int(request.run_number),
            "structured": structured,
            "cap": int(self.settings.output_cap_chars),
        }
        grace = float(self.settings.interrupt_grace_s)
        try:
            rid = await worker.send(req)
            resp, reason = worker.poll_response(rid, SPIN_S), None
            if resp is None:
                tail = CaptureTail({"stdout": worker.out_fd, "stderr": worker.err_fd}, request.on_output)
                resp, reason = await self._wait_result(c, worker, rid, float(request.timeout_s), grace, tail)
        except WorkerGone as exc:
            logger.info("worker of %s died: %s", c.state.id, exc)
            return await self._worker_died(c, worker, str(exc), exc.eof)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._abort(c, worker, grace)
            raise
        if resp is None:  # it ignored SIGINT for the whole grace period
            await progress(0, None, "restarting the worker")
            return await self._killed_outcome(c, worker, reason, request.timeout_s)
        if resp.get("op") != "result":
            return await self._worker_died(c, worker, "the worker answered out of protocol", eof=False)
        outcome = self._outcome(resp, structured)
        if reason is not None and resp.get("interrupted") is True:
            if reason == "timeout":
                outcome.status = "timeout"
                tb = outcome.error.traceback if outcome.error else None
                outcome.error = ExecError(
                    "TimeoutError",
                    f"The run exceeded its {request.timeout_s:g} s time limit and was interrupted; "
                    "variables and imports are kept.",
                    tb,
                )
            else:
                outcome.status = "error"
                outcome.error = self._quota_error(c, interrupted=True)
            await self._kill_strays(c, worker, grace)
        elif reason == "quota":
            outcome.warnings.append(self._quota_error(c, interrupted=False).message)
        return outcome

    async def _wait_result(
        self, c: _Container, worker: WorkerProcess, rid: int, timeout_s: float, grace: float, tail: CaptureTail
    ) -> tuple[dict[str, Any] | None, str | None]:
        """The run's answer, interrupting it at the time limit or on a quota breach. (None, reason) when it would
        not stop within the grace period."""
        deadline = anyio.current_time() + timeout_s
        reason: str | None = None
        kill_at: float | None = None
        poll = 0.25
        while True:
            now = anyio.current_time()
            tail.poll()
            if reason is None:
                if c.quota_hit is not None:
                    reason = "quota"
                elif now >= deadline:
                    reason = "timeout"
                if reason is not None:
                    worker.interrupt()
                    kill_at = now + grace
            if kill_at is not None and now >= kill_at:
                return None, reason
            wake = kill_at if kill_at is not None else min(deadline, now + poll)
            with anyio.move_on_after(max(wake - now, 0)):
                return await worker.response(rid), reason

    async def _abort(self, c: _Container, worker: WorkerProcess, grace: float) -> None:
        """The caller went away mid-run: interrupt, and kill if it does not stop in time."""
        worker.interrupt()
        try:
            with anyio.fail_after(grace):
                while True:
                    frame = await worker.receive()
                    if frame.get("op") == "result":
                        break
            await self._kill_strays(c, worker, grace)
            return
        except (TimeoutError, WorkerGone):
            pass
        if c.worker is worker:
            c.worker = None
        await worker.kill()
        c.state_lost_pending = True

    async def _kill_strays(self, c: _Container, worker: WorkerProcess, grace: float) -> None:
        """After an interrupted run: kill processes the code left behind (e.g. a fork bomb), keep the worker."""
        if self.profile is None or self.profile.mode == "none":
            return
        try:
            with anyio.fail_after(max(grace, 1.0)):
                await worker.request({"op": "kill_strays"})
        except (TimeoutError, WorkerGone):
            if c.worker is worker:
                c.worker = None
            await worker.kill()
            c.state_lost_pending = True

    def _captured(self, worker: WorkerProcess) -> tuple[str, str, bool]:
        """What the last run printed, read from the host's own fds of the capture files (blocking)."""
        cap = int(self.settings.output_cap_chars)
        try:
            out_size = os.fstat(worker.out_fd).st_size
            err_size = os.fstat(worker.err_fd).st_size
            ob, eb = protocol.split_budget(cap, out_size, err_size)
            out, t1, _ = protocol.clip_capture(worker.out_fd, ob, out_size)
            err, t2, _ = protocol.clip_capture(worker.err_fd, eb, err_size)
        except OSError:
            return "", "", False
        return out, err, t1 or t2

    async def _worker_died(self, c: _Container, worker: WorkerProcess, detail: str, eof: bool) -> ExecOutcome:
        if eof:
            # Let it finish dying first, so its own exit status (signal, code) is what gets reported.
            await worker.wait(1.0)
        await worker.kill(close=False)
        stdout, stderr, truncated = await anyio.to_thread.run_sync(self._captured, worker)
        worker.close()
        if c.worker is worker:
            c.worker = None
        c.had_worker = False  # this outcome reports the loss; the next run starts fresh without a second report
        reason = describe_exit(worker.returncode, worker.sandboxed) if eof else detail
        if "CPU-time" in reason:
            reason += f" (cpu_seconds={self.settings.cpu_seconds})"
        if c.destroyed:
            reason = "the container was deleted while the code ran"
        return ExecOutcome(
            status="error",
            stdout=stdout,
            stderr=stderr,
            truncated=truncated,
            error=ExecError("WorkerDied", f"The Python worker died: {reason}. {_LOST_SUFFIX}"),
            state_lost=True,
        )

    async def _killed_outcome(
        self, c: _Container, worker: WorkerProcess, reason: str | None, timeout_s: float
    ) -> ExecOutcome:
        await worker.kill(close=False)
        stdout, stderr, truncated = await anyio.to_thread.run_sync(self._captured, worker)
        worker.close()
        if c.worker is worker:
            c.worker = None
        c.had_worker = False  # reported here, not again by the next run
        if reason == "quota":
            status = "error"
            error = self._quota_error(c, interrupted=True)
            error.message += f" It ignored the interrupt, so the worker was restarted. {_LOST_SUFFIX}"
        else:
            status = "timeout"
            error = ExecError(
                "TimeoutError",
                f"The run exceeded its {timeout_s:g} s time limit and did not stop when interrupted, so the worker "
                f"was restarted. {_LOST_SUFFIX}",
            )
        return ExecOutcome(
            status=status,  # type: ignore[arg-type]
            stdout=stdout,
            stderr=stderr,
            truncated=truncated,
            error=error,
            state_lost=True,
        )

    def _quota_error(self, c: _Container, interrupted: bool) -> ExecError:
        used = max(c.usage, c.quota_hit or 0) // (1024 * 1024)
        what = "the run was interrupted" if interrupted else "it is over quota"
        return ExecError(
            "DiskQuotaExceeded",
            f"The data folder grew to {used} MiB, over its {self.settings.box_size_mb} MiB quota; {what}. "
            "Delete files in /mnt/data to free space.",
        )

    def _outcome(self, resp: dict[str, Any], structured: bool) -> ExecOutcome:
        """Turn the worker's answer (untrusted: user code shares its process) into an ExecOutcome."""
        cap = int(self.settings.output_cap_chars)
        stdout = _text(resp.get("stdout"), cap)
        stderr = _text(resp.get("stderr"), cap)
        status = resp.get("status") if resp.get("status") in ("ok", "error") else "error"
        err = resp.get("error")
        error = None
        if isinstance(err, dict):
            error = ExecError(
                type=_text(err.get("type"), 200) or "Error",
                message=_text(err.get("message"), cap),
                traceback=_text(err.get("traceback"), cap) if err.get("traceback") is not None else None,
            )
        elif status == "error":
            error = ExecError("Error", "The run failed without details.")
        result = resp.get("result")
        last_json = resp.get("last_value_json") if structured else None
        sentinel = resp.get("sentinel") if structured else None
        raw_warnings = resp.get("warnings")
        warnings = (
            [_text(w, 1000) for w in raw_warnings if isinstance(w, str)][:20] if isinstance(raw_warnings, list) else []
        )
        sources: list[str] = []
        if structured:
            sources = [sentinel] if isinstance(sentinel, str) and sentinel else [stdout]
        return ExecOutcome(
            status=status,  # type: ignore[arg-type]
            stdout=stdout,
            stderr=stderr,
            result_repr=_text(result, cap) if isinstance(result, str) else None,
            error=error,
            truncated=resp.get("truncated") is True,
            last_value_json=last_json if isinstance(last_json, str) else None,
            sentinel_sources=sources,
            warnings=warnings,
        )

    # ------------------------------------------------------------------------------------------ files

    async def list_files(self, container: ContainerState) -> list[RemoteFile]:
        c = await self._lookup(container)
        data, user_versions = c.data, c.user_versions
        try:
            if c.scan_inline:
                # A few dozen stat calls take ~20 µs; a thread hop costs ~140 µs here and this runs on every run.
                # A folder that scanned slowly once goes to a thread from then on.
                result = files.scan(data, user_versions)
            else:
                result = await anyio.to_thread.run_sync(files.scan, data, user_versions)
        except OSError:
            raise ContainerExpired(f"Container {container.id} no longer exists.") from None
        c.usage = result.usage_bytes
        c.scan_inline = result.seconds < 0.0005 and len(result.files) < 200
        return result.files

    async def fetch_file(self, container: ContainerState, file: RemoteFile, dest: Path, max_bytes: int) -> FetchResult:
        c = await self._lookup(container)
        return await anyio.to_thread.run_sync(files.fetch, c.data, file.path, Path(dest), int(max_bytes))

    async def put_file(self, container: ContainerState, src: Path, dest_path: str) -> RemoteFile:
        c = await self._lookup(container)
        data = c.data
        quota = self.quota_bytes

        def do_put() -> tuple[RemoteFile, int]:
            used = files.scan(data, with_files=False).usage_bytes
            remote = files.put(
                data,
                Path(src),
                dest_path,
                c.uid,
                c.gid,
                int(self.settings.max_file_bytes),
                room_bytes=max(quota - used, 0),
            )
            return remote, used

        remote, used = await anyio.to_thread.run_sync(do_put)
        c.user_versions[remote.path] = remote.version
        c.usage = used + remote.bytes
        return remote

    async def repair_json(self, schema: dict[str, Any], raw: str, problems: list[str]) -> RepairOutcome | None:
        return None

    # ------------------------------------------------------------------------------------------ facts

    def describe(self) -> dict[str, Any]:
        p = self.profile
        s = self.settings
        info = p.bwrap if p is not None else None
        if p is None:
            uid_mode = "not started"
        elif p.mode == "bwrap-root":
            uid_mode = "dedicated uid per container (bwrap without a user namespace, CAP_SETUID/SETGID only)"
        elif p.mode == "bwrap-userns":
            uid_mode = "the server's uid, in a user namespace"
        else:
            uid_mode = "the server's uid (no sandbox)"
        return {
            "backend": self.name,
            "isolation": self.isolation,
            "mode": p.mode if p is not None else None,
            "bwrap": info.path if info else None,
            "bwrap_version": info.version if info else None,
            "seccomp": bool(p and p.seccomp),
            "uid": uid_mode,
            "network": "none (own network namespace)" if p is not None and p.mode != "none" else "host",
            "python": sandbox.interpreter(),
            "mounts_read_only": sandbox.python_paths(),
            "limits": {
                "memory_mb": s.memory_mb,
                "cpu_seconds": s.cpu_seconds,
                "max_file_bytes": s.max_file_bytes,
                "max_open_files": s.max_open_files,
                "max_processes": s.max_processes,
                "disk_quota_mb": s.box_size_mb,
                "output_cap_chars": s.output_cap_chars,
                "interrupt_grace_s": s.interrupt_grace_s,
            },
            "matplotlib_font_cache": str(self._mpl_cache) if self._mpl_cache else None,
            "containers": len(self._containers),
            "notes": list(p.notes) if p is not None else [],
            "probe_failures": list(self._probe_failures),
        }


def _text(value: Any, cap: int) -> str:
    if not isinstance(value, str):
        return "" if value is None else str(value)[:cap]
    return value if len(value) <= cap else value[:cap]


def _default_cache_dir() -> str:
    import platformdirs

    return platformdirs.user_cache_dir("code-interpreter-mcp", appauthor=False)
