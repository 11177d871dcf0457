"""The program that runs INSIDE the sandbox: one long-lived Python interpreter that executes cells on request.

Started as `python -I -B worker.py '<config json>'` (inside bubblewrap, or bare in unsafe mode). It imports only the
standard library at start-up. In order, before any user code runs it:
1. lowers its rlimits (memory, CPU, file size, open files, processes, core);
2. drops to the container's dedicated uid/gid (when the host asks: a root server runs bwrap without a user
   namespace and grants only CAP_SETUID/CAP_SETGID, which this switch clears), so RLIMIT_NPROC applies;
3. points fds 0/1/2 at /dev/null and marks its protocol fds close-on-exec;
4. answers a "ready" frame, then serves requests one at a time on its own pipe fds, never fd 1/2.

A run executes in one persistent `__main__` namespace. stdout/stderr are captured at the file-descriptor level (fd 1/2
are dup2'd onto capture files the host created), so C extensions and subprocesses are caught too. The last
expression's repr is returned Jupyter-style, exceptions come back with worker frames trimmed, and open matplotlib
figures are saved as PNG into the data folder after each run.

SIGINT raises KeyboardInterrupt only while a run is in progress; between runs it is ignored.
"""

from __future__ import annotations

import _ast
import builtins
import json
import linecache
import os
import signal
import sys
import types

_THIS_FILE = os.path.abspath(__file__)
_CO_COROUTINE = 0x0080
_TOP_LEVEL_AWAIT = getattr(_ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0x2000)
_ONLY_AST = _ast.PyCF_ONLY_AST
_JSON_CAP_CHARS = 16 * 1024 * 1024

# Plain aliases: `typing` costs ~9 ms at start-up and the annotations are never evaluated.
Config = dict  # the JSON config from argv (fds, uid/gid, limits, paths)
Frame = dict  # one protocol message


def _load_protocol() -> types.ModuleType:
    # A private name, so user code importing "protocol" never gets ours.
    import importlib.util

    path = os.path.join(os.path.dirname(_THIS_FILE), "protocol.py")
    spec = importlib.util.spec_from_file_location("_ci_worker_protocol", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_protocol = _load_protocol()


class _State:
    running = False
    interrupted = False
    pid = 0


def _on_sigint(signum: int, frame: types.FrameType | None) -> None:
    if _State.running:
        _State.interrupted = True
        raise KeyboardInterrupt


_SAVED_FIGURES: set = set()  # numbers of the figures the current run saved itself


class _SavedFigures:
    """Wraps `Figure.savefig` once matplotlib.figure is imported (a meta-path finder: importing matplotlib at start-up
    would cost every worker), so the figures a run saved itself are not auto-saved a second time."""

    def find_spec(self, name: str, path: object, target: object = None) -> object:
        if name != "matplotlib.figure":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module: types.ModuleType) -> None:
                load(module)
                save = module.Figure.savefig

                def savefig(fig: object, *args: object, **kwargs: object) -> object:
                    _SAVED_FIGURES.add(getattr(fig, "number", None))
                    return save(fig, *args, **kwargs)

                module.Figure.savefig = savefig

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


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


# ------------------------------------------------------------------------------------------------ running code


def _trim_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """Start at the first frame of user code (a cell); failing that, drop this file's frames."""
    probe = tb
    while probe is not None:
        if probe.tb_frame.f_code.co_filename.startswith("<cell"):
            return probe
        probe = probe.tb_next
    while tb is not None and tb.tb_frame.f_code.co_filename == _THIS_FILE:
        tb = tb.tb_next
    return tb


def _format_error(exc: BaseException) -> dict[str, str | None]:
    import traceback

    message = _safe_str(exc)
    if isinstance(exc, SyntaxError):
        text = "".join(traceback.format_exception_only(type(exc), exc))
    else:
        tb = _trim_traceback(exc.__traceback__)
        try:
            text = "".join(traceback.format_exception(type(exc), exc, tb))
        except Exception:
            text = f"{type(exc).__name__}: {message}\n"
    return {"type": type(exc).__name__, "message": message, "traceback": text}


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception as exc:
        return f"<str() failed: {type(exc).__name__}>"


class _Runner:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.workdir = cfg["workdir"]
        self.out_fd = cfg["out_fd"]
        self.err_fd = cfg["err_fd"]
        self.null_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        module = types.ModuleType("__main__")
        module.__dict__["__builtins__"] = builtins
        self.module = module
        self.ns = module.__dict__
        self._loop = None
        self._owned_zombies: set[int] = set()

    # --- capture

    def _flush_std(self) -> None:
        streams = [sys.stdout, sys.stderr]
        # User code may have replaced sys.stdout/err; the originals still buffer for fd 1/2.
        for extra in (sys.__stdout__, sys.__stderr__):
            if extra is not streams[0] and extra is not streams[1]:
                streams.append(extra)
        for stream in streams:
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        if "ctypes" in sys.modules:  # C stdio buffers of extensions; ctypes is too costly to import just for this
            try:
                import ctypes

                ctypes.CDLL(None).fflush(None)
            except Exception:
                pass

    def _sentinel_block(self, fd: int, size: int) -> str | None:
        """The last ===BEGIN_JSON ... ===END_JSON block of the whole stdout (used when the kept text lost it)."""
        import mmap

        if size == 0:
            return None
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
            begin = mm.rfind(b"===BEGIN_JSON")
            if begin < 0:
                return None
            end = mm.find(b"===END_JSON", begin)
            if end < 0:
                stop = size
            else:
                eol = mm.find(b"\n", end)
                stop = size if eol < 0 else eol
            stop = min(stop, begin + _JSON_CAP_CHARS)
            return mm[begin:stop].decode("utf-8", "replace")

    # --- zombies

    def _reap_orphaned_zombies(self) -> None:
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
        candidates = [z for z in zombies if z not in self._owned_zombies]
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

    # --- execution

    def _compile(self, code: str, filename: str) -> tuple[types.CodeType | None, types.CodeType | None]:
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        tree = compile(code, filename, "exec", _ONLY_AST | _TOP_LEVEL_AWAIT, dont_inherit=True)
        last = None
        if tree.body and isinstance(tree.body[-1], _ast.Expr) and not _ends_with_semicolon(code, tree.body[-1]):
            last = _ast.Expression(tree.body.pop().value)
        body_code = compile(tree, filename, "exec", _TOP_LEVEL_AWAIT, dont_inherit=True) if tree.body else None
        last_code = compile(last, filename, "eval", _TOP_LEVEL_AWAIT, dont_inherit=True) if last else None
        return body_code, last_code

    def _eval(self, code: types.CodeType) -> object:
        if code.co_flags & _CO_COROUTINE:
            import asyncio

            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(eval(code, self.ns))
        return eval(code, self.ns)

    def _save_figures(self, run: int, warnings: list[str]) -> list[str]:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return []
        saved = []
        try:
            nums = [n for n in plt.get_fignums() if n not in _SAVED_FIGURES]
        except Exception as exc:
            warnings.append(f"could not list matplotlib figures: {type(exc).__name__}: {_safe_str(exc)}")
            return []
        for k, num in enumerate(nums, 1):
            name = f"figure_{run}_{k}.png"
            try:
                fig = plt.figure(num)
                fig.savefig(os.path.join(self.workdir, name), format="png", bbox_inches="tight")
                saved.append(name)
            except Exception as exc:
                warnings.append(f"could not save figure {num}: {type(exc).__name__}: {_safe_str(exc)}")
        try:
            plt.close("all")
        except Exception:
            pass
        return saved

    def execute(self, req: Frame) -> Frame:
        code = req.get("code", "")
        run = int(req.get("run", 1))
        structured = bool(req.get("structured"))
        cap = max(int(req.get("cap", 40_000)), 100)
        out_fd, err_fd = self.out_fd, self.err_fd
        warnings: list[str] = []
        error = None
        status = "ok"
        has_value = False
        value = None
        result_repr = None
        value_json = None
        figures: list[str] = []

        self._flush_std()
        # Normally already empty (truncated after the last run); background writers may have added since.
        if os.fstat(out_fd).st_size:
            os.ftruncate(out_fd, 0)
        if os.fstat(err_fd).st_size:
            os.ftruncate(err_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        _State.interrupted = False
        _State.running = True
        _SAVED_FIGURES.clear()
        try:
            try:
                body_code, last_code = self._compile(code, f"<cell {run}>")
                if body_code is not None:
                    self._eval(body_code)
                if last_code is not None:
                    value = self._eval(last_code)
                    has_value = True
                if has_value and value is not None:
                    self.ns["_"] = value
                    result_repr = repr(value)
                    if structured:
                        value_json = _to_json(value, warnings)
            finally:
                try:
                    if not _State.interrupted:
                        figures = self._save_figures(run, warnings)
                finally:
                    _State.running = False
        except SystemExit as exc:
            if exc.code not in (None, 0):
                status = "error"
                error = {"type": "SystemExit", "message": _safe_str(exc.code), "traceback": None}
        except BaseException as exc:
            status = "error"
            error = _format_error(exc)
        finally:
            _State.running = False
            if os.getpid() != _State.pid:
                # A fork of this worker made by user code must never answer the host or read its requests.
                self._flush_std()
                os._exit(0)
        value = None
        self._flush_std()
        os.dup2(self.null_fd, 1)
        os.dup2(self.null_fd, 2)
        self._reap_orphaned_zombies()

        out_size = os.fstat(out_fd).st_size
        err_size = os.fstat(err_fd).st_size
        out_budget, err_budget = _protocol.split_budget(cap, out_size, err_size)
        stdout, out_trunc, _ = _protocol.clip_capture(out_fd, out_budget, out_size)
        stderr, err_trunc, _ = _protocol.clip_capture(err_fd, err_budget, err_size)
        truncated = out_trunc or err_trunc
        fsize = self.cfg.get("limits", {}).get("fsize")
        if isinstance(fsize, int) and max(out_size, err_size) >= fsize:
            warnings.append(
                f"the run printed more than the {fsize}-byte file size limit; later writes to stdout/stderr failed "
                "with 'File too large'"
            )
        if result_repr is not None and len(result_repr) > cap:
            result_repr = result_repr[: cap // 2] + f"\n[... repr truncated: {len(result_repr)} characters ...]\n"
            truncated = True
        sentinel = None
        if structured and out_trunc:
            try:
                sentinel = self._sentinel_block(out_fd, out_size)
            except (OSError, ValueError):
                sentinel = None
        # Keep the host's disk clean between runs (background writers may still append).
        if out_size:
            os.ftruncate(out_fd, 0)
        if err_size:
            os.ftruncate(err_fd, 0)
        return {
            "op": "result",
            "status": status,
            "stdout": stdout,
            "stderr": stderr,
            "truncated": truncated,
            "result": result_repr,
            "error": error,
            "interrupted": _State.interrupted,
            "last_value_json": value_json,
            "sentinel": sentinel,
            "warnings": warnings,
            "figures": figures,
        }


def _json_default(obj: object) -> object:
    # numpy scalars and arrays are the common non-JSON last values; convert them without importing numpy.
    if type(obj).__module__.split(".")[0] == "numpy" and hasattr(obj, "tolist"):
        return obj.tolist()  # type: ignore[attr-defined]
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _to_json(value: object, warnings: list[str]) -> str | None:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=_json_default)
    except (TypeError, ValueError, OverflowError, RecursionError):
        return None
    if len(text) > _JSON_CAP_CHARS:
        warnings.append(
            f"the last value's JSON ({len(text)} characters) is over the {_JSON_CAP_CHARS} cap: not returned"
        )
        return None
    return text


def _ends_with_semicolon(code: str, stmt: _ast.stmt) -> bool:
    """Jupyter's convention: a trailing ';' on the last expression hides its value."""
    end_line, end_col = stmt.end_lineno, stmt.end_col_offset
    if end_line is None or end_col is None:
        return False
    lines = code.splitlines()
    if end_line > len(lines):
        return False
    rest = lines[end_line - 1].encode("utf-8")[end_col:].lstrip()  # offsets count UTF-8 bytes
    return rest.startswith(b";")


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


# ------------------------------------------------------------------------------------------------ main loop


def main() -> None:
    cfg = json.loads(sys.argv[1])
    sys.argv = [""]
    req_fd, resp_fd = cfg["req_fd"], cfg["resp_fd"]
    for fd in (req_fd, resp_fd, cfg["out_fd"], cfg["err_fd"]):
        os.set_inheritable(fd, False)
    _apply_limits(cfg.get("limits") or {})
    if cfg.get("uid") is not None:
        _drop_privileges(int(cfg["uid"]), int(cfg["gid"]))
    os.umask(0o022)
    os.chdir(cfg["workdir"])
    _prepare_matplotlib(cfg)
    sys.meta_path.insert(0, _SavedFigures())  # type: ignore[arg-type]
    _State.pid = os.getpid()
    signal.signal(signal.SIGINT, _on_sigint)

    runner = _Runner(cfg)
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
        try:
            req = _protocol.read_frame(req_fd, decoder)
            if req is None:
                break  # the host closed the pipe: shut down
            op = req.get("op")
            if op == "exec":
                resp = runner.execute(req)
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
    os._exit(0)


if __name__ == "__main__":
    main()
