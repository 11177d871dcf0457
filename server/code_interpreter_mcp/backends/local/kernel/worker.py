"""The program that runs INSIDE the sandbox: one long-lived Python interpreter that executes cells on request.

Started as `python -I -B worker.py '<config json>'` (inside bubblewrap, or bare in unsafe mode). It imports only the
standard library at start-up, and its siblings protocol.py (the wire format), cell.py (running one cell) and
sitepaths.py (the run's package sets on sys.path) by file path under private names, never anything of the server's
package. In order, before any user code runs it:
1. lowers its rlimits (memory, CPU, file size, open files, processes, core);
2. drops to the container's dedicated uid/gid (when the host asks: a root server runs bwrap without a user
   namespace and grants only CAP_SETUID/CAP_SETGID, which this switch clears), so RLIMIT_NPROC applies;
3. points fds 0/1/2 at /dev/null and marks its protocol fds close-on-exec;
4. answers a "ready" frame, then serves requests one at a time on its own pipe fds, never fd 1/2.

Between runs it keeps the sandbox's process table clean: orphaned zombies are reaped after each run, and on the
host's request every stray process is killed.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import sys
import types

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_sibling(filename: str, name: str) -> types.ModuleType:
    # A private name, so user code importing "protocol" (or "cell") never gets ours.
    import importlib.util

    path = os.path.join(_HERE, filename)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_protocol = _load_sibling("protocol.py", "_ci_worker_protocol")
_cell = _load_sibling("cell.py", "_ci_worker_cell")
_sitepaths = _load_sibling("sitepaths.py", "_ci_worker_sitepaths")
_display = _load_sibling("display.py", "_ci_worker_display")
_snapshot = _load_sibling("snapshot.py", "_ci_worker_snapshot")
_restore = _load_sibling("restore.py", "_ci_worker_restore")

Config = dict  # the JSON config from argv (a plain alias: `typing` costs ~9 ms at start-up)


# ------------------------------------------------------------------------------------------------ start-up


def _apply_limits(limits: dict[str, int | list[int] | None]) -> None:
    import resource

    for name, value in limits.items():
        res = getattr(resource, "RLIMIT_" + name.upper(), None)
        if res is None or value is None:
            continue
        soft, hard = (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
        _cur_soft, cur_hard = resource.getrlimit(res)
        # Without CAP_SYS_RESOURCE a hard limit can only go down.
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        soft = min(soft, hard)
        resource.setrlimit(res, (soft, hard))


def _drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise RuntimeError("privilege drop did not take effect")


def _cap_eff() -> str:
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"CapEff:"):
                    return line.split()[1].decode()
    except OSError:
        pass
    return "unknown"


def _prepare_matplotlib(cfg: Config) -> None:
    """A writable MPLCONFIGDIR, seeded with the host's prebuilt font cache so the first plot is not slow."""
    target = cfg.get("mplconfigdir")
    if not target:
        return
    try:
        os.makedirs(target, mode=0o700, exist_ok=True)
    except OSError:
        return
    source = cfg.get("mpl_cache")
    if not source:
        return
    try:
        names = os.listdir(source)
    except OSError:
        return
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(source, name), "rb") as src, open(os.path.join(target, name), "wb") as dst:
                dst.write(src.read())
        except OSError:
            continue


# ------------------------------------------------------------------------------------------------ process hygiene


class _ZombieReaper:
    """Remembers the zombies a live Popen/Process owns, so each is looked up once, not after every run."""

    def __init__(self, ours: set[int] | None = None) -> None:
        self._owned_zombies: set[int] = set()
        self._ours = ours if ours is not None else set()  # the snapshot child: reaped by its own code

    def reap(self) -> None:
        """Reap exited children nobody will wait for (e.g. what is left of a fork bomb): zombies count against
        RLIMIT_NPROC, so they would block every later fork. Children a live subprocess.Popen or
        multiprocessing.Process still owns are left for their owner."""
        try:
            if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return  # the common case: one syscall, no exited child
        except ChildProcessError:
            return
        zombies = []
        pid = os.getpid()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                children = [int(x) for x in fh.read().split()]
        except OSError:
            return
        for child in children:
            try:
                with open(f"/proc/{child}/stat", "rb") as fh:
                    if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        zombies.append(child)
            except OSError:
                continue
        candidates = [z for z in zombies if z not in self._owned_zombies and z not in self._ours]
        if not candidates:
            return
        owned = _owned_child_pids()
        for child in candidates:
            if child in owned:
                self._owned_zombies.add(child)
                continue
            try:
                os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                pass
        self._owned_zombies &= set(zombies)


def _owned_child_pids() -> set[int]:
    """Pids of children a live Popen or multiprocessing Process object will wait for (a gc scan: rare path)."""
    classes = []
    subprocess = sys.modules.get("subprocess")
    if subprocess is not None:
        classes.append(subprocess.Popen)
    mp_process = sys.modules.get("multiprocessing.process")
    if mp_process is not None:
        classes.append(mp_process.BaseProcess)
    if not classes:
        return set()
    import gc

    owned = set()
    for obj in gc.get_objects():
        if isinstance(obj, tuple(classes)):
            pid = getattr(obj, "pid", None)
            if isinstance(pid, int):
                owned.add(pid)
    return owned


def _kill_strays() -> int:
    """Kill every other process this uid can signal in the sandbox's pid namespace (runaway children), and wait
    until they are gone: our own children are reaped here, orphans by bwrap's init (pid 1)."""
    import time

    try:
        os.kill(-1, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    reaped = 0
    me = str(os.getpid())
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                reaped += 1
        except ChildProcessError:
            pass
        left = [p for p in os.listdir("/proc") if p.isdigit() and p not in ("1", me)]
        if not left:
            break
        time.sleep(0.005)
    return reaped


# ------------------------------------------------------------------------------------------------ a run's env


def _set_env(env: object) -> dict[str, str | None]:
    """Set a run's variables (checked by the server); what each was before, for `_restore_env`."""
    saved: dict[str, str | None] = {}
    if isinstance(env, dict):
        for name, value in env.items():
            if isinstance(name, str) and isinstance(value, str):
                saved[name] = os.environ.get(name)
                os.environ[name] = value
    return saved


def _restore_env(saved: dict[str, str | None]) -> None:
    """The run's variables back to what they were: the next run sees the session's own environment."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# ------------------------------------------------------------------------------------------------ main loop


def main() -> None:
    cfg = json.loads(sys.argv[1])
    sys.argv = [""]
    req_fd, resp_fd = cfg["req_fd"], cfg["resp_fd"]
    ctl_fd = cfg.get("ctl_fd")
    for fd in (req_fd, resp_fd, cfg["out_fd"], cfg["err_fd"], ctl_fd):
        if fd is not None:
            os.set_inheritable(fd, False)
    _apply_limits(cfg.get("limits") or {})
    if cfg.get("uid") is not None:
        _drop_privileges(int(cfg["uid"]), int(cfg["gid"]))
    os.umask(0o022)
    os.chdir(cfg["workdir"])
    _prepare_matplotlib(cfg)
    _cell.State.pid = os.getpid()
    signal.signal(signal.SIGINT, _cell.on_sigint)

    # magics.py only for the first cell that needs it: its imports would cost every worker's start-up.
    runner = _cell.Runner(
        cfg,
        _protocol,
        lambda: _load_sibling("magics.py", "_ci_worker_magics"),
        lambda: _load_sibling("charts.py", "_ci_worker_charts"),
        _display,
        lambda: _load_sibling("frames.py", "_ci_worker_frames"),
    )
    workdir = cfg["workdir"]
    sys.meta_path.insert(0, _display.ImportHooks(runner.displays, lambda where: _cell.data_path(where, workdir)))
    builtins.display = runner.displays.display  # type: ignore[attr-defined]  # as in a notebook, no import needed
    sets = _sitepaths.Sets(cfg.get("packages_dir"))
    snaps = _snapshot.Snapshots(runner, runner._hidden, ctl_fd, int(cfg.get("snapshot_max_bytes") or 0), _protocol)
    reaper = _ZombieReaper(snaps.pids)
    os.dup2(runner.null_fd, 0)
    os.dup2(runner.null_fd, 1)
    os.dup2(runner.null_fd, 2)
    # Line-buffered like a terminal, so print() output interleaves with subprocess and C-level output in order.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    sys.modules["__main__"] = runner.module
    sys.path.insert(0, cfg["workdir"])

    decoder = _protocol.FrameDecoder(_protocol.MAX_REQUEST_BYTES)
    ready = {
        "op": "ready",
        "pid": os.getpid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cap_eff": _cap_eff(),
        "python": sys.version.split()[0],
    }
    _protocol.write_all(resp_fd, _protocol.encode(ready))
    while True:
        req = None
        try:
            if snaps.pending() and decoder.pending == 0:
                snaps.idle(req_fd)  # a snapshot is due: it starts when the session pauses
            req = _protocol.read_frame(req_fd, decoder)
            if req is None:
                break  # the host closed the pipe: shut down
            op = req.get("op")
            if op == "exec":
                try:
                    notes = sets.use(req.get("packages"))
                except (OSError, ValueError, RuntimeError) as exc:
                    notes = [f"the session's packages could not be made importable: {exc}"]
                saved = _set_env(req.get("env"))
                try:
                    resp = runner.execute(req)
                finally:
                    _restore_env(saved)
                notes.extend(snaps.over_cap_warnings())
                if notes:
                    resp["warnings"] = notes + list(resp.get("warnings") or [])
                snaps.reap()  # first: an unreaped snapshot child would send the reaper its slow path every run
                reaper.reap()
                resp["id"] = req.get("id")
                _protocol.write_all(resp_fd, _protocol.encode(resp))
                snaps.ran(int(req.get("run", 0) or 0))  # after the answer: the result never waits for it
                continue
            elif op == "restore":
                try:
                    sets.use(req.get("packages"))  # the session's packages before its values are loaded
                except (OSError, ValueError, RuntimeError):
                    pass
                resp = _restore.restore(snaps, req)
            elif op == "flush":
                resp = snaps.flush(float(req.get("within") or 10.0))
            elif op == "ping":
                resp = {"op": "pong"}
            elif op == "kill_strays":
                resp = {"op": "killed", "reaped": _kill_strays() if cfg.get("may_kill_strays") else 0}
            else:
                resp = {"op": "error", "message": f"unknown op {op!r}"}
            resp["id"] = req.get("id")
            _protocol.write_all(resp_fd, _protocol.encode(resp))
        except KeyboardInterrupt:
            # A SIGINT handler replaced by user code fired between runs: keep serving.
            continue
        except BrokenPipeError:
            break
        except Exception as exc:  # e.g. no file descriptor left for the answer: name the cause, keep the state
            cause = f"the worker could not finish the request: {type(exc).__name__}: {exc}"
            error = {"type": type(exc).__name__, "message": cause, "traceback": None}
            resp = {"op": "result", "status": "error", "error": error, "id": req.get("id") if req else None}
            try:
                _protocol.write_all(resp_fd, _protocol.encode(resp))
            except OSError:
                break
    os._exit(0)


if __name__ == "__main__":
    main()
