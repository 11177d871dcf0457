"""Running one cell, INSIDE the sandbox: compile, execute in the persistent namespace, capture, answer.

Loaded by worker.py by file path (like protocol.py), so it must stay stdlib-only and free of package-relative
imports; it never touches the protocol pipes. A run executes in one persistent `__main__` namespace.
stdout/stderr are captured at the file-descriptor level (fd 1/2 are dup2'd onto capture files the host created),
so C extensions and subprocesses are caught too. The last expression's repr is returned Jupyter-style, exceptions
come back with worker frames trimmed, and open matplotlib figures are saved as PNG into the data folder after each
run. SIGINT raises KeyboardInterrupt only while a run is in progress; between runs it is ignored.
"""

from __future__ import annotations

import _ast
import builtins
import json
import linecache
import os
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


class State:
    running = False
    interrupted = False
    pid = 0  # the worker's own pid: a fork made by user code is told apart by it


def on_sigint(signum: int, frame: types.FrameType | None) -> None:
    if State.running:
        State.interrupted = True
        raise KeyboardInterrupt


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
    message = _safe_str(exc)
    if isinstance(exc, OSError) and exc.errno == 24:  # EMFILE: say which limit, not only the errno
        message += " (the code holds as many open files as the sandbox allows: close the ones it no longer needs)"
    try:
        import traceback
    except Exception:  # out of file descriptors or memory: even the import cannot open its source
        return {"type": type(exc).__name__, "message": message, "traceback": f"{type(exc).__name__}: {message}\n"}
    if isinstance(exc, SyntaxError) or type(exc).__name__ == "UsageError":  # a magic's own error: no frames
        text = "".join(traceback.format_exception_only(type(exc), exc))
    else:
        tb = _trim_traceback(exc.__traceback__)
        try:
            text = "".join(traceback.format_exception(type(exc), exc, tb))
        except Exception:
            text = f"{type(exc).__name__}: {message}\n"
    return {"type": type(exc).__name__, "message": message, "traceback": text}


def data_path(where: object, workdir: str) -> str | None:
    """A savefig target as a path relative to the data folder (None: a file object, or outside it)."""
    if not isinstance(where, (str, os.PathLike)):
        return None
    path = os.path.normpath(os.path.join(workdir, os.fspath(where)))  # type: ignore[arg-type]
    rel = os.path.relpath(path, workdir)
    return None if rel.startswith("..") else rel


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception as exc:
        return f"<str() failed: {type(exc).__name__}>"


class Runner:
    """Runs cells in one persistent `__main__` namespace and answers each with a result frame."""

    def __init__(
        self,
        cfg: Config,
        protocol: types.ModuleType,
        load_magics: object = None,
        load_charts: object = None,
        display: types.ModuleType | None = None,
        load_frames: object = None,
    ) -> None:
        self.cfg = cfg
        self._protocol = protocol  # the worker's privately loaded protocol.py (split_budget, clip_capture)
        self._load_magics = load_magics  # loads magics.py (`!`/`%` lines) when first needed; None: plain Python
        self._magics: types.ModuleType | None = None
        self._load_charts = load_charts  # loads charts.py (a figure's data) at the first figure; None: no chart data
        self._charts: types.ModuleType | None = None
        self.workdir = cfg["workdir"]
        self.out_fd = cfg["out_fd"]
        self.err_fd = cfg["err_fd"]
        self.null_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        module = types.ModuleType("__main__")
        module.__dict__["__builtins__"] = builtins
        self.module = module
        self.ns = module.__dict__
        self._hidden = {*self.ns, "get_ipython"}  # the worker's names, not the user's (%who)
        self._loop = None
        self._fflush: object = None  # libc's fflush, once ctypes is loaded (by user code, or dill for snapshots)
        self._display = display  # display.py: rich outputs; None: the last value's repr only
        self.displays = (
            display.Displays(self.workdir, self._stdout_size, self._save_figure, load_frames) if display else None
        )
        self._figures = 0  # figures this run saved: their file names
        self.run = 0
        self.warnings: list[str] = []  # the current run's

    def _stdout_size(self) -> int:
        self._flush_std()
        return os.fstat(self.out_fd).st_size

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
                if self._fflush is None:  # looked up once: CDLL(None) is a dlopen, ~20 us on every flush
                    import ctypes

                    self._fflush = ctypes.CDLL(None).fflush
                self._fflush(None)
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

    # --- execution

    def _notebook_lines(self, code: str, filename: str, error: SyntaxError) -> _ast.Module:
        """A cell that is not plain Python but has `!`/`%` lines: as IPython turns it into Python (magics.py),
        with `get_ipython()` in the namespace. Else the original SyntaxError."""
        if self._magics is None and callable(self._load_magics):
            self._magics = self._load_magics()
        magics = self._magics
        if magics is None or not magics.needs_transform(code):
            raise error
        try:
            source = magics.transform(code)
        except magics.MagicsUnavailable as exc:
            raise SyntaxError(f"{error.msg}: {exc}", error.args[1] if len(error.args) > 1 else None) from None
        if "get_ipython" not in self.ns:
            self.ns["get_ipython"] = magics.Shell(self.ns, self._hidden, self.workdir)
        return compile(source, filename, "exec", _ONLY_AST | _TOP_LEVEL_AWAIT, dont_inherit=True)

    def _compile(self, code: str, filename: str) -> tuple[types.CodeType | None, types.CodeType | None]:
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            tree = compile(code, filename, "exec", _ONLY_AST | _TOP_LEVEL_AWAIT, dont_inherit=True)
        except SyntaxError as exc:  # plain Python first: only a cell that is not gets IPython's transformer
            tree = self._notebook_lines(code, filename, exc)
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

    def _save_figure(self, fig: object) -> dict[str, object] | None:
        """Save a figure as the run's next PNG now (shown, or left open at the end): its output item."""
        self._figures += 1
        name = f"figure_{self.run}_{self._figures}.png"
        displays = self.displays
        if displays is not None:
            displays.own_save = True  # not the code's own savefig
        try:
            fig.savefig(os.path.join(self.workdir, name), format="png", bbox_inches="tight")  # type: ignore[attr-defined]
        except Exception as exc:
            self.warnings.append(
                f"could not save figure {getattr(fig, 'number', '')}: {type(exc).__name__}: {_safe_str(exc)}"
            )
            return None
        finally:
            if displays is not None:
                displays.own_save = False
        return {"path": name, **self._describe(fig, name)}

    def _save_figures(self) -> list[str]:
        """The end of a run: figures the code saved itself are described where their last save put them, and
        the ones left open are saved and described after everything shown."""
        displays = self.displays
        if displays is None:
            return []
        for item in displays.items:
            fig = item.pop("_fig", None)
            if fig is not None:
                item.update(self._describe(fig, str(item["path"])))
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return []
        saved = []
        try:
            figs = [f for f in map(plt.figure, plt.get_fignums()) if not displays.was_saved(f)]
        except Exception as exc:
            self.warnings.append(f"could not list matplotlib figures: {type(exc).__name__}: {_safe_str(exc)}")
            return []
        for fig in figs:
            item = self._save_figure(fig)
            if item is not None:
                saved.append(str(item["path"]))
                displays.figure_item(item)
        try:
            plt.close("all")
        except Exception:
            pass
        return saved

    def _describe(self, fig: object, name: str) -> dict[str, object]:
        """What the saved figure shows, as data (charts.py), for a model that cannot read the PNG."""
        if self._load_charts is None:
            return {}
        try:
            if self._charts is None:
                self._charts = self._load_charts()  # type: ignore[operator]
            chart = self._charts.bounded(fig)
            summary = self._charts.summary(chart)
            return {"summary": summary, "chart": chart, "data": {"text/plain": summary}}
        except Exception as exc:
            self.warnings.append(f"could not read the data of {name}: {type(exc).__name__}: {_safe_str(exc)}")
            return {}

    def _outputs(self, out_fd: int, stdout: str, cut: bool) -> list[dict[str, object]]:
        """This run's outputs, each `stdout_at` turned from bytes written into characters of the stdout returned
        (None when that place was cut out: the output goes after what is shown)."""
        displays = self.displays
        if displays is None:
            return []
        displays.finish()
        self.warnings.extend(displays.warnings)
        shown = stdout.find(self._protocol.TRUNCATED_MARK) if cut else len(stdout)
        for item in displays.items:
            item.pop("_fig", None)  # an interrupted run described none of them
        places = sorted(
            {a for i in displays.items if isinstance(a := i.get("stdout_at"), int) and 0 < a <= self._protocol.AT_BYTES}
        )
        chars = self._protocol.chars_at(out_fd, places)
        for item in displays.items:
            at = item.get("stdout_at")
            if isinstance(at, int) and at > 0:
                n = chars.get(at)
                item["stdout_at"] = n if n is not None and n <= shown else None
        return displays.items

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
        State.interrupted = False
        State.running = True
        self.run, self.warnings, self._figures = run, warnings, 0
        displays = self.displays
        if displays is not None:
            displays.reset(run)
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
                    if displays is not None and self._display.is_rich(value):  # type: ignore[union-attr]
                        displays.result(value)
                    if structured:
                        value_json = _to_json(value, warnings)
            finally:
                try:
                    if not State.interrupted:
                        figures = self._save_figures()
                finally:
                    State.running = False
        except SystemExit as exc:
            if exc.code not in (None, 0):
                status = "error"
                error = {"type": "SystemExit", "message": _safe_str(exc.code), "traceback": None}
        except BaseException as exc:
            status = "error"
            error = _format_error(exc)
        finally:
            State.running = False
            if os.getpid() != State.pid:
                # A fork of this worker made by user code must never answer the host or read its requests.
                self._flush_std()
                os._exit(0)
        value = None
        self._flush_std()
        os.dup2(self.null_fd, 1)
        os.dup2(self.null_fd, 2)

        out_size = os.fstat(out_fd).st_size
        err_size = os.fstat(err_fd).st_size
        out_budget, err_budget = self._protocol.split_budget(cap, out_size, err_size)
        stdout, out_trunc, _ = self._protocol.clip_capture(out_fd, out_budget, out_size)
        stderr, err_trunc, _ = self._protocol.clip_capture(err_fd, err_budget, err_size)
        truncated = out_trunc or err_trunc
        outputs = self._outputs(out_fd, stdout, out_trunc)
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
            "interrupted": State.interrupted,
            "last_value_json": value_json,
            "sentinel": sentinel,
            "warnings": warnings,
            "figures": figures,
            "outputs": outputs,
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
