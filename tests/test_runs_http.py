"""Runs over streamable HTTP: a run outlives the client that started it (it disconnects, or its request times
out), and a new connection of the same owner collects the result; another owner is refused."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.helpers import text_of
from tests.test_e2e_http import http_server, with_token

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ALPHA, BETA = "alpha-token-123456", "beta-token-654321"


async def test_a_run_survives_its_client_and_is_collected_by_the_same_owner(tmp_path: Path) -> None:
    code = "import time\nprint('begun', flush=True)\ntime.sleep(4)\nopen('late.txt', 'w').write('done')\n'kept'"
    with http_server(tmp_path / "d", tokens=f"{ALPHA},{BETA}") as url:
        async with with_token(url, ALPHA) as alpha:
            started = await alpha.call_tool("run_code", {"code": code, "wait_s": 1})
            s = started.structured_content
            assert s is not None and s["status"] == "running" and s["stdout"] == "begun\n"
        # That client is gone; a request abandoned by its client's timeout does not stop the run either (the
        # 2025 era's cancel says so in its reason; a 2026-era HTTP client's abort is a Stop, tested below).
        async with with_token(url, ALPHA, mode="legacy") as alpha:
            with pytest.raises(Exception):  # noqa: B017 - the client's own timeout; the run is the server's
                await alpha.call_tool("get_run", {"run_id": s["run_id"], "wait_s": 3}, read_timeout_seconds=0.5)
        async with with_token(url, BETA) as beta:
            foreign = await beta.call_tool("get_run", {"run_id": s["run_id"]})
            assert foreign.is_error and "[not_found]" in text_of(foreign)
            assert "kept" not in str(foreign.content)
            refused = await beta.call_tool("cancel_run", {"run_id": s["run_id"]})
            assert refused.is_error and "[not_found]" in text_of(refused)
        async with with_token(url, ALPHA) as alpha:
            done = await alpha.call_tool("get_run", {"run_id": s["run_id"], "wait_s": 20})
            final = done.structured_content
            assert final is not None and final["status"] == "ok", done.content
            assert final["result"] == "'kept'" and [f["path"] for f in final["files"]] == ["late.txt"]
            # Anyone holding the token reads the files through the same session.
            body = await alpha.read_resource(final["files"][0]["uri"])
            assert body.contents[0].text == "done"  # type: ignore[union-attr]
        await anyio.sleep(0)


async def test_a_2026_http_clients_stop_interrupts_the_run(tmp_path: Path) -> None:
    """The 2026-07-28 HTTP transport cancels a request by aborting its POST, with no reason to read: a Stop."""
    import time

    from tests.helpers import structured

    with http_server(tmp_path / "d", tokens=ALPHA) as url:
        async with with_token(url, ALPHA) as alpha:
            sid = structured(await alpha.call_tool("run_code", {"code": "i = 0"}))["session_id"]
            with anyio.move_on_after(1.5) as scope:
                loop = "import time\nfor i in range(1, 600): time.sleep(0.1)"
                await alpha.call_tool("run_code", {"code": loop, "session_id": sid})
            assert scope.cancelled_caught
            began = time.monotonic()
            after = structured(await alpha.call_tool("run_code", {"code": "i", "session_id": sid, "wait_s": 20}))
            assert after["status"] == "ok" and 0 < int(after["result"]) < 100, after
            assert time.monotonic() - began < 5 and after["container"]["state_lost"] is False
