"""Fast tests of cells as models write them: dedent and pip lines (engine.cells), `!` lines for the openai backend
(backends.openai.shell_lines), the worker's notebook lines through IPython's transformer and its small shell
(kernel.magics, run here in-process over a plain namespace), and the env check (engine.envs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from code_interpreter_mcp.backends.local.kernel import KERNEL_FILES
from code_interpreter_mcp.backends.openai.shell_lines import translate
from code_interpreter_mcp.config import Settings
from code_interpreter_mcp.engine.cells import dedent_cell, prepare_cell
from code_interpreter_mcp.engine.envs import MAX_VARS, check_env
from code_interpreter_mcp.errors import BadInput, BadRequirement
from tests.helpers import kernel_module

# ----------------------------------------------------------------------------------------------- engine.cells


def test_a_uniformly_indented_cell_is_dedented() -> None:
    assert dedent_cell("    x = 1\n\n    if x:\n        y = 2\n") == "x = 1\n\nif x:\n    y = 2\n"
    assert dedent_cell("\n  \n    a = 1\n    a") == "\n\na = 1\na"


def test_a_cell_starting_unindented_is_left_alone() -> None:
    code = "def f():\n    return 1\n"
    assert dedent_cell(code) is code
    mixed = "    x = 1\ny = 2\n"  # not uniformly indented: dedent finds no common prefix
    assert dedent_cell(mixed) == mixed


@pytest.mark.parametrize(
    ("line", "wanted"),
    [
        ("!pip install seaborn", ["seaborn"]),
        ("%pip install -q polars 'scipy>=1.13'", ["polars", "scipy>=1.13"]),
        ("!pip3 install --upgrade --progress-bar off tabulate", ["tabulate"]),
        ("!python -m pip install --no-cache-dir alpha==1.0  # pinned", ["alpha==1.0"]),
        ("%uv pip install beta", ["beta"]),
    ],
)
def test_pip_lines_become_requirements(line: str, wanted: list[str]) -> None:
    cell = prepare_cell(f"import os\n{line}\nprint(1)")
    assert cell.requirements == wanted
    assert cell.code == "import os\n\nprint(1)"  # a blank line keeps the line numbers


def test_pip_lines_of_an_indented_cell_are_found_after_the_dedent() -> None:
    cell = prepare_cell("    !pip install alpha\n    import alpha\n")
    assert cell.requirements == ["alpha"] and cell.code == "\nimport alpha\n"


def test_pip_lines_inside_a_block_or_a_string_stay() -> None:
    inside = "if True:\n    !pip install alpha\n"
    assert prepare_cell(inside).requirements == []
    in_string = 's = """\n!pip install alpha\n"""\nprint(s)'
    cell = prepare_cell(in_string)
    assert cell.requirements == [] and cell.code == in_string


@pytest.mark.parametrize(
    "line",
    ["!pip install -i https://evil.example/simple x", "%pip install -r req.txt", "%pip install -e .", "!pip install"],
)
def test_pip_options_that_choose_what_or_where_are_refused(line: str) -> None:
    with pytest.raises(BadRequirement):
        prepare_cell(line)


def test_plain_code_is_not_rescanned() -> None:
    code = "x = 'pip install'\n"
    assert prepare_cell(code).code is code


# ------------------------------------------------------------------------------------------ openai shell lines


def test_bang_lines_become_python_that_prints_the_output(tmp_path: Path) -> None:
    code = "x = 3\n!echo hi; echo err >&2\nfiles = !printf 'a\\nb\\n'\nprint(files)\nif x:\n    !echo inner"
    out = translate(code)
    assert "!" not in out.replace("!=", "")
    run = subprocess.run([sys.executable, "-c", out], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert run.stdout == "hi\nerr\n['a', 'b']\ninner\n"


def test_python_is_sent_unchanged() -> None:
    code = 'if a != b:\n    s = "!ls"\n'
    assert translate(code) is code


# ------------------------------------------------------------------------------------------------ kernel.magics


def load_magics() -> Any:
    """The worker's magics.py, loaded by file path as the worker loads it."""
    return kernel_module("magics")


magics = load_magics()


def run_cell(code: str, ns: dict[str, Any], capfd: pytest.CaptureFixture[str]) -> tuple[str, Any]:
    """Transform and run a cell the worker's way; (what it printed, fd-level, the last expression's value)."""
    import ast

    source = magics.transform(code)
    ns.setdefault("get_ipython", magics.Shell(ns, {"__builtins__", "get_ipython"}, os.getcwd()))
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<cell>", "exec"), ns)
    value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), ns) if last is not None else None
    sys.stdout.flush()
    return capfd.readouterr().out, value


def test_magics_file_is_mounted_into_the_sandbox() -> None:
    assert "magics.py" in KERNEL_FILES


def test_needs_transform_only_for_notebook_lines() -> None:
    assert magics.needs_transform("!ls")
    assert magics.needs_transform("x = 1\n  %time f()")
    assert magics.needs_transform("files = !ls")
    assert magics.needs_transform("len?")
    assert not magics.needs_transform("x = 1 % 2\nprint(x)")


def test_shell_lines_expand_variables_and_capture(capfd: pytest.CaptureFixture[str]) -> None:
    ns: dict[str, Any] = {"n": 41}
    out, _ = run_cell("!echo hi $n {n + 1} $$((1 + 1))\nlines = !printf 'a\\nb'\nprint(lines)", ns, capfd)
    assert out == "hi 41 42 2\n['a', 'b']\n"
    assert ns["_exit_code"] == 0
    run_cell("!exit 3", ns, capfd)
    assert ns["_exit_code"] == 3


def test_who_whos_and_reset(capfd: pytest.CaptureFixture[str]) -> None:
    ns: dict[str, Any] = {"__builtins__": __builtins__, "alpha": 1, "beta": "b", "_private": 2}
    out, _ = run_cell("%who", ns, capfd)
    assert out == "alpha\tbeta\n"
    out, _ = run_cell("%who int", ns, capfd)
    assert out == "alpha\n"
    out, _ = run_cell("%whos", ns, capfd)
    assert "Variable" in out and "alpha" in out and "int" in out
    run_cell("%reset -f", ns, capfd)
    out, _ = run_cell("%who", ns, capfd)
    assert out == "Interactive namespace is empty.\n"


def test_time_timeit_pwd_cd_env(capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    ns: dict[str, Any] = {}
    out, value = run_cell("%time y = sum(range(10))\n%time y * 2", ns, capfd)
    assert ns["y"] == 45 and value == 90 and out.count("Wall time:") == 2
    out, _ = run_cell("%timeit -n 5 -r 2 sum(range(10))", ns, capfd)
    assert "per loop (mean ± std. dev. of 2 runs, 5 loops each)" in out
    (tmp_path / "sub").mkdir()
    out, value = run_cell("%cd sub\n%pwd", ns, capfd)
    assert value == str(tmp_path / "sub") and out.strip() == str(tmp_path / "sub")
    run_cell("%cd -", ns, capfd)
    assert os.getcwd() == str(tmp_path)
    monkeypatch.delenv("MAGIC_T", raising=False)
    out, value = run_cell("%env MAGIC_T=on\n%env MAGIC_T", ns, capfd)
    assert out == "env: MAGIC_T=on\n" and value == "on"


def test_cell_magics(capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    out, _ = run_cell("%%bash\necho one\necho two", {}, capfd)
    assert out == "one\ntwo\n"
    out, _ = run_cell("%%writefile notes.txt\nhello\n", {}, capfd)
    assert out == "Writing notes.txt\n" and (tmp_path / "notes.txt").read_text() == "hello\n"


def test_unsupported_magic_and_pip_inside_the_sandbox_are_clear_errors(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(magics.UsageError, match=r"%load_ext is not supported.*%who"):
        run_cell("%load_ext autoreload", {}, capfd)
    with pytest.raises(magics.UsageError, match="packages=") as info:
        run_cell("if True:\n    !pip install alpha", {}, capfd)
    assert "no network" in str(info.value)
    with pytest.raises(magics.UsageError, match="not supported"):
        run_cell("%%perl\nprint 1", {}, capfd)


def test_without_ipython_the_error_says_what_is_missing(monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "IPython", None)
    monkeypatch.setitem(sys.modules, "IPython.core.inputtransformer2", None)
    with pytest.raises(magics.MagicsUnavailable, match=r"analysis"):
        magics.transform("!ls")


# ------------------------------------------------------------------------------------------------- engine.envs


def settings_with(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        openai_api_key=SecretStr("sk-live-abcdef123456"),
        auth_token=SecretStr("tok-one-123,tok2-456789"),
    )


def test_env_is_checked(tmp_path: Path) -> None:
    s = settings_with(tmp_path)
    assert check_env(s, {"FOO": "bar", "_x1": ""}) == {"FOO": "bar", "_x1": ""}
    assert check_env(s, None) == {}
    for bad in ({"1X": "a"}, {"A-B": "a"}, {"X": "a\0b"}, {"X": 3}, {"X": "v" * 40_000}, ["FOO"]):
        with pytest.raises(BadInput):
            check_env(s, bad)
    with pytest.raises(BadInput, match="at most"):
        check_env(s, {f"V{i}": "1" for i in range(MAX_VARS + 1)})


@pytest.mark.parametrize(
    "env",
    [
        {"OPENAI_API_KEY": "mine"},
        {"openai_api_key": "mine"},
        {"CODE_INTERPRETER_AUTH_TOKEN": "x"},
        {"MY_KEY": "sk-live-abcdef123456"},
        {"HEADER": "Bearer tok2-456789"},
    ],
)
def test_server_secrets_never_pass(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(BadInput, match="never reaches the sandbox") as info:
        check_env(settings_with(tmp_path), env)
    assert "abcdef123456" not in str(info.value.user_text()) and "456789" not in info.value.user_text()
