"""The command line as a user runs it: the README's quick-start example, doctor, config, bad settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {**os.environ, "CODE_INTERPRETER_DATA_DIR": str(data_dir), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "code_interpreter_mcp", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_quick_start_example_makes_a_chart_and_valid_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    proc = cli(
        "run",
        "examples/chart.py",
        "--out",
        str(out),
        "--schema",
        "examples/summary.schema.json",
        data_dir=tmp_path / "d",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok" and result["json"]["months"] == 12
    assert {f["path"] for f in result["files"]} == {"sales.csv", "sales.png"}
    assert (out / "sales.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "sales.csv").read_text().startswith("month,amount")
    assert result["out_dir"] == str(out)


def test_sentinel_example_validates(tmp_path: Path) -> None:
    proc = cli("run", "examples/sentinel_json.py", "--schema", "examples/stats.schema.json", data_dir=tmp_path / "d")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["json"] == {"mean": 3.875, "median": 3.5, "n": 8}


def test_run_reports_errors_with_exit_code(tmp_path: Path) -> None:
    script = tmp_path / "boom.py"
    script.write_text("raise ValueError('nope')\n")
    proc = cli("run", str(script), data_dir=tmp_path / "d")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["status"] == "error" and result["error"]["type"] == "ValueError"
    assert proc.stdout.count("\n") > 3 and "Traceback" not in proc.stderr


def test_run_reads_stdin_and_inputs(tmp_path: Path) -> None:
    data = tmp_path / "numbers.txt"
    data.write_text("1\n2\n3\n")
    import os

    proc = subprocess.run(
        [sys.executable, "-m", "code_interpreter_mcp", "run", "-", "--input", str(data)],
        input="sum(int(x) for x in open('numbers.txt'))\n",
        capture_output=True,
        text=True,
        env={**os.environ, "CODE_INTERPRETER_DATA_DIR": str(tmp_path / "d")},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["result"] == "6"


def test_doctor_reports_isolation_and_limits(tmp_path: Path) -> None:
    proc = cli("doctor", data_dir=tmp_path / "d", env={"OPENAI_API_KEY": "sk-doctor-secret-0123456789"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["details"]["isolation"] == "bubblewrap"
    assert report["settings"]["memory_mb"] == 2048
    assert "sk-doctor-secret" not in proc.stdout + proc.stderr
    assert report["settings"]["openai_api_key"] == "set"


def test_openai_backend_without_key_is_a_clear_error(tmp_path: Path) -> None:
    proc = cli("doctor", "--backend", "openai", data_dir=tmp_path / "d", env={"OPENAI_API_KEY": ""})
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["error"]["code"] == "auth_failed" and report["error"]["hint"]


def test_bad_setting_is_a_one_line_error(tmp_path: Path) -> None:
    proc = cli("doctor", data_dir=tmp_path / "d", env={"CODE_INTERPRETER_MEMORY_MB": "lots"})
    assert proc.returncode == 2
    assert "memory_mb" in proc.stderr and "Traceback" not in proc.stderr


def test_local_backend_never_imports_openai(tmp_path: Path) -> None:
    code = (
        "import sys, anyio\n"
        "from code_interpreter_mcp.app import build_server\n"
        "from code_interpreter_mcp.config import Settings\n"
        "from mcp import Client\n"
        "async def main():\n"
        f"    async with Client(build_server(Settings(data_dir={str(tmp_path / 'd')!r}))) as c:\n"
        "        await c.call_tool('run_code', {'code': '1+1'})\n"
        "anyio.run(main)\n"
        "print('openai' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "False"
