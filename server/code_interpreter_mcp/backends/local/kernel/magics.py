"""Notebook lines in a cell, INSIDE the sandbox: `!cmd`, `x = !cmd`, `%magic`, `%%magic` and `obj?`.

IPython's own transformer (`IPython.core.inputtransformer2.TransformerManager`, the code Jupyter runs on every
cell) turns those lines into calls on `get_ipython()`: `.system(cmd)`, `.getoutput(cmd)`, `.run_line_magic(name,
line)`, `.run_cell_magic(name, line, body)`. It knows strings, continuations and prompts, so a `!` inside a string
is left alone. A full IPython shell is not started: `Shell` below answers those calls for the magics listed in
`LINE_MAGICS` and `CELL_MAGICS`; any other is a `UsageError` naming what works. IPython is imported only for a cell
that needs it (about 0.1 s, once per worker); without it such a cell fails with a SyntaxError that says so.

Shell commands run in the sandbox's shell (bash, else sh) with the worker's fd 1/2, which are the run's capture
files: their output lands in stdout/stderr in order with the cell's prints, like IPython's `!`. `pip install`
lines are taken out of the cell by the server (engine.cells) and installed outside the sandbox; one that still
arrives here (inside a block, or built at run time) is refused with that hint, never run against an index the
sandbox cannot reach. Loaded by worker.py by file path: stdlib only.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import time

_NEEDS = re.compile(r"(?m)^[ \t]*[!%]|\?[ \t]*$|^[ \t]*\w[\w.]*[ \t]*=[ \t]*!")
_PIP = re.compile(r"^\s*(?:(?:python3?|py)\s+-m\s+)?(?:pip3?|uv\s+pip|conda|mamba)\s+install\b")
PIP_HINT = (
    "packages cannot be installed from inside the sandbox (it has no network). Put `%pip install NAME` on a line "
    "of its own at the top level of the cell, or pass run_code(packages=[...]): the server installs them outside "
    "the sandbox under its package policy."
)
_ALIASES = {"ls": "ls -F", "ll": "ls -F -l", "cat": "cat", "mkdir": "mkdir", "rmdir": "rmdir", "cp": "cp -i",
            "mv": "mv -i", "rm": "rm -i", "head": "head", "tail": "tail"}  # fmt: skip
LINE_MAGICS = ("who", "whos", "who_ls", "pwd", "cd", "env", "set_env", "time", "timeit", "ls", "ll", "cat",
               "mkdir", "rmdir", "cp", "mv", "rm", "system", "sx", "matplotlib", "reset", "pinfo", "pinfo2",
               "run", "lsmagic", "pip", "conda")  # fmt: skip
CELL_MAGICS = ("bash", "sh", "time", "timeit", "writefile", "capture")
_SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"


class UsageError(Exception):
    """A magic that is not supported here, or used wrongly (IPython's own name for this error)."""


class MagicsUnavailable(Exception):
    """IPython is not importable in the sandbox's Python."""


def needs_transform(code: str) -> bool:
    return _NEEDS.search(code) is not None


def transform(code: str) -> str:
    """The cell as IPython would run it: notebook lines turned into `get_ipython()` calls."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:
        raise MagicsUnavailable(
            "`!` and `%` lines need IPython in the server's Python environment (the `analysis` extra brings it: "
            "pip install 'code-interpreter-mcp[analysis]'); without it, write the cell in plain Python "
            "(subprocess.run for shell commands)."
        ) from None
    return TransformerManager().transform_cell(code)


def _format_time(seconds: float) -> str:
    """IPython's way: three significant digits in s, ms, µs or ns."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds} s"  # unreachable


class Shell:
    """What `get_ipython()` returns inside a run: the magics this sandbox supports, over the run's namespace."""

    def __init__(self, ns: dict, hidden: set, home: str) -> None:
        self.user_ns = ns
        self._hidden = hidden  # names that are the worker's, not the user's (%who leaves them out)
        self._home = home
        self._previous_dir = home

    def __call__(self) -> Shell:
        return self

    # ----- shell commands

    def _expand(self, cmd: str) -> str:
        """IPython's variable expansion in `!` lines: `{expression}` and `$name` from the namespace (`$$` is `$`);
        what does not evaluate is left as written."""

        def brace(m: re.Match[str]) -> str:
            try:
                return str(eval(m.group(1), self.user_ns))
            except Exception:
                return m.group(0)

        def dollar(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name = m.group(1)
            return str(self.user_ns[name]) if name in self.user_ns else m.group(0)

        cmd = re.sub(r"(?<!\{)\{([^{}]+)\}(?!\})", brace, cmd)
        return re.sub(r"\$\$|\$([A-Za-z_]\w*)", dollar, cmd)

    def _run(self, cmd: str, capture: bool) -> subprocess.CompletedProcess:
        if _PIP.match(cmd):
            raise UsageError(PIP_HINT)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # what the cell printed so far comes first
            except Exception:
                pass
        out = subprocess.PIPE if capture else None
        proc = subprocess.Popen([_SHELL, "-c", cmd], stdin=subprocess.DEVNULL, stdout=out, stderr=None)
        try:
            stdout, _ = proc.communicate()
        except BaseException:  # the run's interrupt: the command stops with it
            proc.kill()
            proc.wait()
            raise
        self.user_ns["_exit_code"] = proc.returncode
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout)

    def system(self, cmd: str) -> None:
        self._run(self._expand(cmd), capture=False)

    def getoutput(self, cmd: str, split: bool = True) -> list[str] | str:
        text = self._run(self._expand(cmd), capture=True).stdout.decode("utf-8", "replace")
        return text.splitlines() if split else text

    # ----- magics

    def run_line_magic(self, name: str, line: str, _stack_depth: int = 1) -> object:
        if name in _ALIASES:
            return self.system(_ALIASES[name] + (" " + line if line else ""))
        method = getattr(self, "_line_" + name, None)
        if method is None:
            raise UsageError(f"%{name} is not supported in this sandbox. Line magics that work: "
                             + ", ".join("%" + m for m in LINE_MAGICS) + ".")  # fmt: skip
        return method(line)

    def run_cell_magic(self, name: str, line: str, cell: str) -> object:
        method = getattr(self, "_cell_" + name, None)
        if method is None:
            raise UsageError(f"%%{name} is not supported in this sandbox. Cell magics that work: "
                             + ", ".join("%%" + m for m in CELL_MAGICS) + ".")  # fmt: skip
        return method(line, cell)

    def _user_names(self) -> list[str]:
        return sorted(k for k in self.user_ns if not k.startswith("_") and k not in self._hidden)

    def _line_who_ls(self, line: str) -> list[str]:
        kinds = set(line.split())
        return [n for n in self._user_names() if not kinds or type(self.user_ns[n]).__name__ in kinds]

    def _line_who(self, line: str) -> None:
        names = self._line_who_ls(line)
        print("\t".join(names) if names else "Interactive namespace is empty.")

    def _line_whos(self, line: str) -> None:
        names = self._line_who_ls(line)
        if not names:
            print("Interactive namespace is empty.")
            return
        rows = [(n, type(self.user_ns[n]).__name__, _info(self.user_ns[n])) for n in names]
        w1 = max(8, *(len(r[0]) for r in rows)) + 3
        w2 = max(4, *(len(r[1]) for r in rows)) + 3
        print("Variable".ljust(w1) + "Type".ljust(w2) + "Data/Info")
        print("-" * (w1 + w2 + 9))
        for n, t, info in rows:
            print(n.ljust(w1) + t.ljust(w2) + info)

    def _line_pwd(self, line: str) -> str:
        return os.getcwd()

    def _line_cd(self, line: str) -> None:
        target = line.strip().strip("'\"")
        target = self._previous_dir if target == "-" else os.path.expanduser(target or self._home)
        before = os.getcwd()
        try:
            os.chdir(target)
        except OSError as exc:
            raise UsageError(f"cd {target}: {exc.strerror}") from None
        self._previous_dir = before
        print(os.getcwd())

    def _line_env(self, line: str) -> object:
        line = line.strip()
        if not line:
            return dict(os.environ)
        m = re.match(r"^(\w+)\s*(?:=\s*|\s+)(.*)$", line)
        if m is None:
            return os.environ.get(line, "")  # %env NAME
        os.environ[m.group(1)] = m.group(2)
        print(f"env: {m.group(1)}={m.group(2)}")
        return None

    def _line_set_env(self, line: str) -> None:
        self._line_env(line)

    def _exec(self, source: str) -> object:
        """Run source in the namespace; the value of a last expression, like a cell."""
        tree = ast.parse(source, "<magic>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<magic>", "exec"), self.user_ns)
        if last is not None:
            return eval(compile(ast.Expression(last.value), "<magic>", "eval"), self.user_ns)
        return None

    def _line_time(self, line: str) -> object:
        cpu0, wall0 = os.times(), time.perf_counter()
        try:
            return self._exec(line)
        finally:
            cpu1, wall = os.times(), time.perf_counter() - wall0
            user, sys_ = cpu1.user - cpu0.user, cpu1.system - cpu0.system
            print(f"CPU times: user {_format_time(user)}, sys: {_format_time(sys_)}, "
                  f"total: {_format_time(user + sys_)}\nWall time: {_format_time(wall)}")  # fmt: skip

    def _cell_time(self, line: str, cell: str) -> object:
        return self._line_time(cell)

    def _line_timeit(self, line: str, setup: str = "pass") -> None:
        import statistics
        import timeit

        opts, stmt = _timeit_options(line)
        timer = timeit.Timer(stmt or "pass", setup, globals=self.user_ns)
        number = opts.get("n") or timer.autorange()[0]
        repeat = opts.get("r") or 7
        runs = [t / number for t in timer.repeat(repeat, number)]
        mean = statistics.fmean(runs)
        dev = statistics.pstdev(runs) if len(runs) > 1 else 0.0
        print(f"{_format_time(mean)} ± {_format_time(dev)} per loop (mean ± std. dev. of {repeat} run"
              f"{'s' if repeat != 1 else ''}, {number:,} loop{'s' if number != 1 else ''} each)")  # fmt: skip

    def _cell_timeit(self, line: str, cell: str) -> None:
        opts, setup = _timeit_options(line)
        flags = " ".join(f"-{k} {v}" for k, v in opts.items())
        self._line_timeit(f"{flags} {cell}" if flags else cell, setup or "pass")

    def _line_system(self, line: str) -> list[str] | str:
        return self.getoutput(line)

    _line_sx = _line_system

    def _line_matplotlib(self, line: str) -> None:
        return None  # figures are saved and shown after every run anyway: `inline` is what already happens

    def _line_reset(self, line: str) -> None:
        for name in self._user_names():
            del self.user_ns[name]

    def _line_pinfo(self, line: str) -> None:
        name = line.strip()
        try:
            obj = eval(name, self.user_ns)
        except Exception:
            print(f"Object `{name}` not found.")
            return
        import inspect

        parts = [f"Type:        {type(obj).__name__}", f"String form: {_info(obj, 200)}"]
        try:
            parts.append(f"Signature:   {name}{inspect.signature(obj)}")
        except (TypeError, ValueError):
            pass
        parts.append("Docstring:\n" + (inspect.getdoc(obj) or "<no docstring>"))
        print("\n".join(parts))

    _line_pinfo2 = _line_pinfo

    def _line_run(self, line: str) -> None:
        import runpy

        args = shlex.split(line)
        if not args:
            raise UsageError("%run needs a file name: %run script.py [args]")
        argv, sys.argv = sys.argv, args
        try:
            self.user_ns.update(runpy.run_path(args[0], run_name="__main__"))
        finally:
            sys.argv = argv

    def _line_lsmagic(self, line: str) -> None:
        print("Line magics: " + " ".join("%" + m for m in LINE_MAGICS))
        print("Cell magics: " + " ".join("%%" + m for m in CELL_MAGICS))

    def _line_pip(self, line: str) -> None:
        raise UsageError(PIP_HINT)

    _line_conda = _line_pip

    def _cell_bash(self, line: str, cell: str) -> None:
        self._run(cell, capture=False)

    _cell_sh = _cell_bash

    def _cell_writefile(self, line: str, cell: str) -> None:
        args = shlex.split(line)
        append = bool(args) and args[0] in ("-a", "--append")
        names = args[1:] if append else args
        if len(names) != 1:
            raise UsageError("%%writefile [-a] FILE")
        existed = os.path.exists(names[0])
        with open(names[0], "a" if append else "w", encoding="utf-8") as fh:
            fh.write(cell)
        print(("Appending to " if append else "Overwriting " if existed else "Writing ") + names[0])

    def _cell_capture(self, line: str, cell: str) -> None:
        import contextlib
        import io

        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            self._exec(cell)
        name = line.strip().split()[-1] if line.strip() else ""
        if name:
            self.user_ns[name] = sink.getvalue()


def _timeit_options(line: str) -> tuple[dict[str, int], str]:
    """`-n N -r R` (and the ignored -q -o) in front of the statement."""
    opts: dict[str, int] = {}
    rest = line.strip()
    while True:
        m = re.match(r"^-([nr])\s*(\d+)\s*|^-[qop]\s+", rest)
        if m is None:
            return opts, rest
        if m.lastindex:
            opts[m.group(1)] = max(1, int(m.group(2)))
        rest = rest[m.end() :]


def _info(value: object, cap: int = 60) -> str:
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and type(value).__module__.split(".")[0] in ("numpy", "pandas"):
        return f"shape {shape}"
    try:
        text = repr(value)
    except Exception:
        return "<repr failed>"
    text = " ".join(text.split())
    return text if len(text) <= cap else text[: cap - 3] + "..."
