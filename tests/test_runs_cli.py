"""The CLI `run` waits for the run however long it takes (no wait_s) and echoes its output live on stderr."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_cli_run_shows_output_live_and_waits_for_the_end(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text("import time\nfor i in range(4):\n    print('tick', i, flush=True)\n    time.sleep(0.7)\n'end'\n")
    cmd = [sys.executable, "-m", "code_interpreter_mcp", "run", str(script), "--data-dir", str(tmp_path / "d")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and proc.stdout is not None
    seen: dict[str, float] = {}
    for line in proc.stderr:
        if line.startswith("tick"):
            seen[line.strip()] = time.monotonic()
    payload = json.loads(proc.stdout.read())
    ended = time.monotonic()
    assert proc.wait() == 0
    assert list(seen) == ["tick 0", "tick 1", "tick 2", "tick 3"]
    assert seen["tick 3"] - seen["tick 0"] > 1.5, "each line is echoed as it is printed, not at the end"
    assert payload["status"] == "ok" and payload["result"] == "'end'" and payload["stdout"].count("tick") == 4
    assert ended >= seen["tick 3"]
    quiet = subprocess.run([*cmd, "--quiet"], capture_output=True, text=True, check=True)
    assert "tick" not in quiet.stderr and json.loads(quiet.stdout)["status"] == "ok"
