"""The openai backend through the real openai SDK against the API emulator (in-process, and once over loopback).

The emulator really runs the code, so logs, files, sizes and hashes are real.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from openai import AsyncAzureOpenAI

from code_interpreter_mcp import errors, structured
from code_interpreter_mcp.backends.base import (
    ContainerState,
    ExecOutcome,
    ExecRequest,
    RemoteFile,
    StructuredRequest,
    no_progress,
)
from code_interpreter_mcp.backends.openai import OpenAIBackend
from code_interpreter_mcp.backends.openai.parsing import parse_traceback
from code_interpreter_mcp.backends.openai.responses import fenced
from code_interpreter_mcp.config import Settings
from tests.emulator import Emulator, ThreadServer

pytestmark = pytest.mark.anyio

SECRET = "plum-SECRET-k3y-7781"  # not sk- shaped: the backend must scrub it itself, not rely on the regex


async def make_backend(emu: Emulator, tmp_path: Path, **overrides: Any) -> OpenAIBackend:
    backend_kwargs = {k: overrides.pop(k) for k in ("retry_base_s", "model_overhead_s") if k in overrides}
    backend_kwargs.setdefault("retry_base_s", 0.01)
    backend = OpenAIBackend(emu.settings(tmp_path, **overrides), http_client=emu.http_client(), **backend_kwargs)
    await backend.start()
    return backend


@pytest.fixture
async def backend(emu: Emulator, tmp_path: Path) -> AsyncIterator[OpenAIBackend]:
    b = await make_backend(emu, tmp_path)
    yield b
    await b.aclose()


@pytest.fixture
async def container(backend: OpenAIBackend) -> ContainerState:
    return await backend.create_container("session-abc", 20 * 60)


async def run(backend: OpenAIBackend, container: ContainerState, code: str, **kwargs: Any) -> ExecOutcome:
    return await backend.execute(container, ExecRequest(code=code, timeout_s=30, **kwargs), no_progress)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def harvest(backend: OpenAIBackend, container: ContainerState, dest: Path) -> dict[str, tuple[int, str]]:
    """list_files + fetch_file of everything: {path: (bytes, sha256)}, checked against the files written."""
    out = {}
    for f in await backend.list_files(container):
        target = dest / f.path.replace("/", "__")
        res = await backend.fetch_file(container, f, target, 10_000_000)
        assert res.bytes == f.bytes == target.stat().st_size
        assert res.sha256 == sha(target.read_bytes())
        out[f.path] = (res.bytes, res.sha256)
    return out


# ----- configuration ---------------------------------------------------------------------------------------------


async def test_missing_key_is_auth_failed_with_hint(tmp_path: Path) -> None:
    backend = OpenAIBackend(Settings(backend="openai", data_dir=tmp_path, openai_api_key=None))
    with pytest.raises(errors.AuthFailed) as info:
        await backend.start()
    assert "OPENAI_API_KEY" in info.value.hint


def test_openai_is_imported_only_by_its_backend() -> None:
    code = (
        "import sys, importlib\n"
        "import code_interpreter_mcp.engine, code_interpreter_mcp.backends, code_interpreter_mcp.structured\n"
        "try:\n    importlib.import_module('code_interpreter_mcp.backends.local')\nexcept ImportError:\n    pass\n"
        "assert 'openai' not in sys.modules, 'openai imported'\n"
        "import code_interpreter_mcp.backends.openai\nassert 'openai' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_azure_client_and_paths(emu: Emulator, tmp_path: Path) -> None:
    backend = await make_backend(
        emu,
        tmp_path,
        openai_base_url=None,
        azure_endpoint="http://azure.test",
        azure_api_version="2025-04-01-preview",
        azure_deployment="my-deployment",
    )
    assert isinstance(backend._client, AsyncAzureOpenAI)
    c = await backend.create_container("s", 600)
    out = await run(backend, c, "print('on azure')")
    assert out.stdout == "on azure\n"
    create, resp = emu.requests[0], emu.requests[1]
    assert create.path == "/openai/containers" and create.query["api-version"] == "2025-04-01-preview"
    assert create.auth == "api-key"
    assert resp.path == "/openai/responses" and resp.json["model"] == "my-deployment"
    assert backend.describe()["azure"] is True
    await backend.aclose()


async def test_azure_without_api_version_is_a_clear_error(emu: Emulator, tmp_path: Path) -> None:
    backend = OpenAIBackend(emu.settings(tmp_path, openai_base_url=None, azure_endpoint="http://azure.test"))
    with pytest.raises(errors.BackendError) as info:
        await backend.start()
    assert "OPENAI_API_VERSION" in info.value.hint


# ----- containers ------------------------------------------------------------------------------------------------


async def test_create_uses_explicit_container_and_api_times(
    emu: Emulator, backend: OpenAIBackend, container: ContainerState
) -> None:
    body = emu.requests[0].json
    assert body["expires_after"] == {"anchor": "last_active_at", "minutes": 20}
    assert body["memory_limit"] == "1g" and "session-abc" not in body["name"]
    assert container.isolation == "remote" and container.status == "running" and container.backend == "openai"
    assert container.expires_after_s == 1200
    # Times come from the API, not the local clock.
    wire = emu.containers[container.id]
    wire.created_at, wire.last_active_at = 1_700_000_000.0, 1_700_000_500.0
    emu.behaviour.idle_expiry_s = 1e12  # keep the backdated container alive
    wire.minutes = 10**9
    fresh = await backend.refresh(container)
    assert fresh.created_at == 1_700_000_000.0 and fresh.last_active_at >= 1_700_000_500.0
    assert fresh.expires_at == fresh.last_active_at + 10**9 * 60
    c2 = await backend.create_container("s2", 61)
    assert emu.requests[-1].json["expires_after"]["minutes"] == 2 and c2.expires_after_s == 120


async def test_expiry_is_detected_everywhere(
    emu: Emulator, backend: OpenAIBackend, container: ContainerState, tmp_path: Path
) -> None:
    await run(backend, container, "open('/mnt/data/a.txt', 'w').write('a')")
    (listed,) = await backend.list_files(container)
    emu.expire(container.id)
    assert (await backend.refresh(container)).status == "expired"  # 200 with status "expired"
    emu.behaviour.expired_retrieve = "error"
    fresh = await backend.refresh(container)  # 400 "Container is expired."
    assert fresh.status == "expired" and not fresh.usable()
    src = tmp_path / "in.txt"
    src.write_text("x")
    for op in (
        run(backend, container, "1"),
        backend.list_files(container),
        backend.fetch_file(container, listed, tmp_path / "a.txt", 100),
        backend.put_file(container, src, "in.txt"),
    ):
        with pytest.raises(errors.ContainerExpired):
            await op
    assert not (tmp_path / "a.txt").exists() and not (tmp_path / "a.txt.part").exists()


async def test_idle_expiry_and_deleted_container(emu: Emulator, backend: OpenAIBackend) -> None:
    emu.behaviour.idle_expiry_s = 0.05
    c = await backend.create_container("s", 600)
    await anyio.sleep(0.1)
    with pytest.raises(errors.ContainerExpired):
        await run(backend, c, "1")
    emu.behaviour.idle_expiry_s = None
    c2 = await backend.create_container("s", 600)
    await backend.destroy(c2)
    await backend.destroy(c2)  # idempotent: 404 is fine
    assert (await backend.refresh(c2)).status == "expired"
    with pytest.raises(errors.ContainerExpired):
        await run(backend, c2, "1")
    with pytest.raises(errors.ContainerExpired):
        await backend.list_files(c2)


async def test_aclose_deletes_created_containers(emu: Emulator, tmp_path: Path) -> None:
    backend = await make_backend(emu, tmp_path)
    c = await backend.create_container("s", 600)
    await backend.aclose()
    assert emu.containers[c.id].status == "deleted"


# ----- runs ------------------------------------------------------------------------------------------------------


async def test_execute_happy_path_request_and_progress(
    emu: Emulator, backend: OpenAIBackend, container: ContainerState
) -> None:
    calls: list[tuple[float, float | None, str]] = []

    async def progress(done: float, total: float | None, message: str) -> None:
        calls.append((done, total, message))

    code = "import json\nopen('/mnt/data/out.csv', 'w').write('a,b\\n1,2\\n')\nprint('sum', 1 + 2)"
    started = time.time()
    out = await backend.execute(container, ExecRequest(code=code, timeout_s=30, instructions="Be terse."), progress)
    assert out.status == "ok" and out.error is None
    assert out.stdout == "sum 3\n" and out.executed_code == code and out.warnings == []
    assert out.text is not None and "[out.csv](sandbox:/mnt/data/out.csv)" in out.text
    (cited,) = out.cited_files
    assert cited.path == "out.csv" and cited.remote_id and cited.remote_id.startswith("cfile_")
    assert out.model_calls == 1 and out.usage is not None and out.usage.total_tokens > 0
    assert out.container is not None and out.container.last_active_at >= int(started)
    assert [m for _, _, m in calls] == ["model started", "running code", "interpreting", "writing answer", "done"]
    assert [d for d, _, _ in calls] == [0, 1, 2, 3, 4] and {t for _, t, _ in calls} == {4}
    req = emu.requests[-1].json
    assert req["tools"] == [{"type": "code_interpreter", "container": container.id}]
    assert req["tool_choice"] == {"type": "code_interpreter"}
    assert req["include"] == ["code_interpreter_call.outputs"] and req["stream"] is True
    assert "verbatim" in req["instructions"] and req["instructions"].endswith("Be terse.")
    assert fenced(code) in req["input"] and "text" not in req


async def test_code_with_backticks_is_sent_verbatim(backend: OpenAIBackend, container: ContainerState) -> None:
    code = 's = """\n```python\nx\n```\n"""\nprint(s.count("`"))   \n\n'
    out = await run(backend, container, code)
    assert out.stdout == "6\n" and out.warnings == []


async def test_traceback_becomes_error(backend: OpenAIBackend, container: ContainerState) -> None:
    out = await run(backend, container, "print('before')\nraise KeyError('missing')")
    assert out.status == "error" and out.stdout == "before\n"
    assert out.error is not None and out.error.type == "KeyError" and out.error.message == "'missing'"
    assert out.error.traceback and out.error.traceback.startswith("Traceback (most recent call last):")
    out = await run(backend, container, "def f(:\n  pass")
    assert out.status == "error" and out.error is not None and out.error.type == "SyntaxError"
    # A traceback the code prints and then carries on from is output, not an error.
    out = await run(
        backend,
        container,
        "import traceback\ntry:\n    1/0\nexcept Exception:\n    traceback.print_exc()\nprint('recovered')",
    )
    assert out.status == "ok" and "ZeroDivisionError" in out.stdout


def test_parse_ipython_traceback() -> None:
    logs = (
        "partial output\n\x1b[0;31m---------------------------------------------------------------------------\x1b[0m\n"
        "ZeroDivisionError                         Traceback (most recent call last)\n"
        "Cell In[3], line 1\n----> 1 1/0\n\nZeroDivisionError: division by zero\n"
    )
    parsed = parse_traceback(logs)
    assert parsed is not None
    before, error = parsed
    assert before == "partial output\n"
    assert (error.type, error.message) == ("ZeroDivisionError", "division by zero")
    assert parse_traceback("all fine\n") is None


async def test_altered_code_is_a_warning(emu: Emulator, backend: OpenAIBackend, container: ContainerState) -> None:
    emu.behaviour.alter_code = "print('sneaky')"
    out = await run(backend, container, "print('mine')  \n")
    assert out.stdout == "mine\nsneaky\n"
    assert out.executed_code == "print('mine')  \n\nprint('sneaky')"
    assert any("changed the code" in w for w in out.warnings)


async def test_state_persists_between_runs(backend: OpenAIBackend, container: ContainerState) -> None:
    await run(backend, container, "x = 20")
    assert (await run(backend, container, "print(x + 1)")).stdout == "21\n"


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("empty", errors.ResponseMalformed),
        ("not_a_list", errors.ResponseMalformed),
        ("no_tool_call", errors.ResponseMalformed),
        ("incomplete_before_call", errors.BackendError),
        ("failed", errors.UpstreamUnavailable),
        ("cancelled", errors.BackendError),
        ("stream_error", errors.UpstreamUnavailable),
    ],
)
async def test_bad_responses_are_clear_errors(
    emu: Emulator, backend: OpenAIBackend, container: ContainerState, mode: str, error: type[errors.CIError]
) -> None:
    emu.behaviour.output_mode = mode  # type: ignore[assignment]
    with pytest.raises(error) as info:
        await run(backend, container, "print(1)")
    assert info.type is error and info.value.message and info.value.hint


async def test_odd_but_usable_responses(emu: Emulator, backend: OpenAIBackend, container: ContainerState) -> None:
    emu.behaviour.output_mode = "nested_content"
    out = await run(backend, container, "open('/mnt/data/n.txt', 'w').write('n')\nprint('ok')")
    assert out.status == "ok" and out.text and "n.txt" in out.text and [f.path for f in out.cited_files] == ["n.txt"]
    emu.behaviour.output_mode = "incomplete"
    out = await run(backend, container, "print('ran')")
    assert out.status == "ok" and out.stdout == "ran\n" and any("cut short" in w for w in out.warnings)
    emu.behaviour.output_mode = "call_failed"
    out = await run(backend, container, "print('never')")
    assert out.status == "error" and out.error is not None and out.error.type == "CodeInterpreterCallFailed"
    emu.behaviour.output_mode = "repeat_call"
    out = await run(backend, container, "print('twice')")
    assert out.stdout == "twice\ntwice\n" and any("2 times" in w for w in out.warnings)


async def test_stream_cut_mid_response(emu: Emulator, backend: OpenAIBackend, container: ContainerState) -> None:
    emu.add_fault("responses", mode="drop", drop_after_bytes=600)
    with pytest.raises(errors.UpstreamUnavailable):
        await run(backend, container, "print(1)")


async def test_timeout_outcome(emu: Emulator, tmp_path: Path) -> None:
    backend = await make_backend(emu, tmp_path, model_overhead_s=0.0)
    c = await backend.create_container("s", 600)
    emu.behaviour.latency_s = 2.0
    out = await backend.execute(c, ExecRequest(code="1", timeout_s=0.2), no_progress)
    assert out.status == "timeout" and out.error is not None and out.error.type == "TimeoutError"
    emu.behaviour.latency_s = 0.0
    await backend.aclose()


# ----- structured output -------------------------------------------------------------------------------------------


async def test_two_pass_sentinel(emu: Emulator, backend: OpenAIBackend, container: ContainerState) -> None:
    schema = {"type": "object", "properties": {"total": {"type": "integer"}}}
    sreq = StructuredRequest(schema=schema, nonce="abc123")
    out = await run(backend, container, "{'total': 7}", structured=sreq)
    req = emu.requests[-1].json
    assert "text" not in req
    assert structured.sentinel_instructions("abc123", schema) in req["instructions"]
    assert out.sentinel_sources == [out.text, out.stdout]
    found = structured.extract_from_sources(out.sentinel_sources, "abc123")
    assert found.found and found.value == {"total": 7}


async def test_single_pass_and_files_without_annotations(
    emu: Emulator, backend: OpenAIBackend, container: ContainerState, tmp_path: Path
) -> None:
    strict = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    code = "open('/mnt/data/plot.png', 'wb').write(b'\\x89PNG' + bytes(range(256)))\n{'n': 5}"
    out = await run(backend, container, code, structured=StructuredRequest(strict, "n1", "single_pass"))
    fmt = emu.requests[-1].json["text"]["format"]
    assert fmt == {"type": "json_schema", "name": "result", "schema": strict, "strict": True}
    assert out.single_pass_json == '{"n": 5}' and out.cited_files == []  # annotations dropped under text.format
    files = await harvest(backend, container, tmp_path)
    assert files == {"plot.png": (260, sha(b"\x89PNG" + bytes(range(256))))}  # still found by the listing
    loose = {"type": "object", "properties": {"n": {"type": "integer"}}}
    await run(backend, container, "{'n': 6}", structured=StructuredRequest(loose, "n2", "single_pass"))
    assert emu.requests[-1].json["text"]["format"]["strict"] is False


async def test_repair_json(emu: Emulator, backend: OpenAIBackend) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    emu.behaviour.repair_text = '{"a": 1}'
    repaired = await backend.repair_json(schema, '{"a": "1"}', ["$.a: '1' is not of type 'integer'"])
    assert repaired is not None and repaired.text == '{"a": 1}' and repaired.usage is not None
    req = emu.requests[-1].json
    assert req["tools"] == [] and req["text"]["format"]["schema"] == schema and '{"a": "1"}' in req["input"]


# ----- files -----------------------------------------------------------------------------------------------------


async def test_harvest_all_pages_cited_and_uncited(
    emu: Emulator, backend: OpenAIBackend, container: ContainerState, tmp_path: Path
) -> None:
    emu.behaviour.annotations = "never"  # nothing cited: the listing must still find everything
    code = (
        "import os\nos.makedirs('/mnt/data/deep/er', exist_ok=True)\n"
        "for i in range(7):\n    open(f'/mnt/data/deep/er/f{i}.bin', 'wb').write(bytes([i]) * (1000 * i + 1))\n"
        "open('/tmp/outside.txt', 'w').write('not in /mnt/data')"
    )
    out = await run(backend, container, code)
    assert out.cited_files == []
    before = emu.calls["files.list"]
    files = await harvest(backend, container, tmp_path)
    assert emu.calls["files.list"] - before == 3  # 7 files, 3 per page
    assert files == {f"deep/er/f{i}.bin": (1000 * i + 1, sha(bytes([i]) * (1000 * i + 1))) for i in range(7)}
    listed = await backend.list_files(container)
    assert {f.source for f in listed} == {"generated"}
    assert all(f.version == f"{f.remote_id}:{f.bytes}" for f in listed)


async def test_cited_file_fetched_before_listing(
    emu: Emulator, backend: OpenAIBackend, container: ContainerState, tmp_path: Path
) -> None:
    emu.behaviour.citation_filename = "file_id"  # filename "cfile_....csv": the path comes from the link span
    out = await run(backend, container, "open('/mnt/data/r.csv', 'w').write('1,2\\n')")
    (cited,) = out.cited_files
    assert cited.path == "r.csv" and cited.bytes == 0
    dest = tmp_path / "made" / "for" / "r.csv"  # missing folders are created
    res = await backend.fetch_file(container, cited, dest, 1000)
    assert res.bytes == 4 and res.sha256 == sha(b"1,2\n") and dest.read_bytes() == b"1,2\n"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(errors.DownloadFailed) as info:  # the host side cannot be written: a clear error
        await backend.fetch_file(container, cited, tmp_path / "a-file" / "r.csv", 1000)
    assert "on the host" in info.value.message


async def test_download_retries_then_succeeds(
    emu: Emulator, backend: OpenAIBackend, container: ContainerState, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 2000
    await run(backend, container, "open('/mnt/data/d.bin', 'wb').write(bytes(range(256)) * 2000)")
    (f,) = await backend.list_files(container)
    cases = [
        {"mode": "drop", "drop_after_bytes": 70_000},  # cut mid-stream
        {"status": 500, "retry_after": None},  # 5xx, own backoff
        {"status": 429, "retry_after": "0.01"},  # 429 honouring Retry-After
    ]
    for case in cases:
        emu.behaviour.faults = []
        emu.add_fault("files.content", **case)
        before = emu.calls["files.content"]
        res = await backend.fetch_file(container, f, tmp_path / "d.bin", 10_000_000)
        assert emu.calls["files.content"] - before == 2
        assert res.bytes == len(data) and res.sha256 == sha(data)
        assert (tmp_path / "d.bin").read_bytes() == data and not (tmp_path / "d.bin.part").exists()


async def test_download_gives_up_after_retries(
    emu: Emulator, backend: OpenAIBackend, container: ContainerState, tmp_path: Path
) -> None:
    await run(backend, container, "open('/mnt/data/d.bin', 'wb').write(b'd' * 10)")
    (f,) = await backend.list_files(container)
    emu.add_fault("files.content", 503, times=10, retry_after="0.01")
    before = emu.calls["files.content"]
    with pytest.raises(errors.DownloadFailed):
        await backend.fetch_file(container, f, tmp_path / "d.bin", 100)
    assert emu.calls["files.content"] - before == 3  # openai_max_retries=2 -> 3 attempts
    assert not (tmp_path / "d.bin").exists() and not (tmp_path / "d.bin.part").exists()
    emu.behaviour.faults = []
    emu.add_fault("files.content", 429, retry_after="500")  # over the 120 s ceiling: do not wait
    with pytest.raises(errors.RateLimited):
        await backend.fetch_file(container, f, tmp_path / "d.bin", 100)


async def test_file_too_large(emu: Emulator, backend: OpenAIBackend, container: ContainerState, tmp_path: Path) -> None:
    out = await run(backend, container, "open('/mnt/data/big.bin', 'wb').write(b'b' * 5000)")
    (listed,) = await backend.list_files(container)
    before = emu.calls["files.content"]
    with pytest.raises(errors.FileTooLarge):
        await backend.fetch_file(container, listed, tmp_path / "big.bin", 4999)
    assert emu.calls["files.content"] == before  # refused from the listed size, nothing downloaded
    (cited,) = out.cited_files  # size unknown: refused from Content-Length / the streamed size
    with pytest.raises(errors.FileTooLarge):
        await backend.fetch_file(container, cited, tmp_path / "big.bin", 4999)
    assert not (tmp_path / "big.bin").exists() and not (tmp_path / "big.bin.part").exists()


async def test_downloads_run_in_parallel_up_to_the_limit(emu: Emulator, tmp_path: Path) -> None:
    for limit in (2, 8):
        backend = await make_backend(emu, tmp_path, download_concurrency=limit)
        c = await backend.create_container("s", 600)
        await run(backend, c, "for i in range(6):\n    open(f'/mnt/data/p{i}.txt', 'w').write(str(i))")
        listed = await backend.list_files(c)
        emu.behaviour.download_latency_s = 0.3  # long enough that every allowed download overlaps
        emu.max_inflight.clear()
        async with anyio.create_task_group() as tg:
            for f in listed:
                tg.start_soon(backend.fetch_file, c, f, tmp_path / f"{limit}-{f.path}", 100)
        assert emu.max_inflight["files.content"] == min(limit, 6)
        emu.behaviour.download_latency_s = 0.0
        await backend.aclose()


async def test_put_file_small_and_streamed(
    emu: Emulator, backend: OpenAIBackend, container: ContainerState, tmp_path: Path
) -> None:
    small = tmp_path / "small.csv"
    small.write_bytes(b"a,b\n1,2\n")
    emu.behaviour.upload_paths = "hashed"
    rf = await backend.put_file(container, small, "inputs/data.csv")
    assert rf.source == "user" and rf.bytes == 8 and rf.path.endswith("-data.csv")  # the API's choice of path
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x00\x01" * (5 * 1024 * 1024))  # 10 MiB: streamed from the file
    emu.behaviour.upload_paths = "plain"
    rf = await backend.put_file(container, big, "big.bin")
    assert rf.path == "big.bin" and rf.bytes == 10 * 1024 * 1024
    assert sha((emu.container_dir(container.id) / "big.bin").read_bytes()) == sha(big.read_bytes())
    out = await run(backend, container, "print(open('/mnt/data/big.bin', 'rb').read(4))")
    assert out.stdout == "b'\\x00\\x01\\x00\\x01'\n"


async def test_put_file_too_large_and_missing(emu: Emulator, tmp_path: Path) -> None:
    backend = await make_backend(emu, tmp_path, max_file_bytes=10)
    c = await backend.create_container("s", 600)
    src = tmp_path / "eleven.txt"
    src.write_bytes(b"x" * 11)
    with pytest.raises(errors.FileTooLarge):
        await backend.put_file(c, src, "eleven.txt")
    with pytest.raises(errors.FileNotFound):
        await backend.put_file(c, tmp_path / "nope.txt", "nope.txt")
    assert emu.calls["files.create"] == 0
    await backend.aclose()


# ----- retries and error classes ---------------------------------------------------------------------------------


async def test_sdk_retries_429_and_5xx(emu: Emulator, backend: OpenAIBackend, container: ContainerState) -> None:
    emu.add_fault("responses", 429, retry_after="0.01")
    emu.add_fault("files.list", 502, retry_after="0.01")
    out = await run(backend, container, "print('after retry')")
    assert out.stdout == "after retry\n" and emu.calls["responses"] == 2
    await backend.list_files(container)
    assert emu.calls["files.list"] == 2
    emu.add_fault("responses", 429, times=3, retry_after="0.01")
    with pytest.raises(errors.RateLimited):
        await run(backend, container, "1")
    emu.add_fault("containers.retrieve", 500, times=3, retry_after="0.01")
    with pytest.raises(errors.UpstreamUnavailable):
        await backend.refresh(container)


async def test_not_found_is_classified(emu: Emulator, backend: OpenAIBackend, container: ContainerState) -> None:
    emu.add_fault("responses", 404, message="The model `gpt-nope` does not exist or you do not have access to it.")
    with pytest.raises(errors.BackendError) as info:
        await run(backend, container, "1")
    assert info.type is errors.BackendError and "CODE_INTERPRETER_OPENAI_MODEL" in info.value.hint
    emu.add_fault("responses", 404, message="Not found.")
    with pytest.raises(errors.BackendError) as info:
        await run(backend, container, "1")
    assert info.type is errors.BackendError and "OPENAI_BASE_URL" in info.value.hint
    emu.add_fault("files.list", 404, message="Not found.")  # on a container's own path: the container is gone
    with pytest.raises(errors.ContainerExpired):
        await backend.list_files(container)
    with pytest.raises(errors.FileNotFound):
        await backend.fetch_file(container, RemoteFile("x", 1, "v", remote_id="cfile_nope"), Path("/nonexistent"), 9)


async def test_connection_refused_is_upstream_unavailable(tmp_path: Path) -> None:
    settings = Settings(
        backend="openai",
        data_dir=tmp_path,
        openai_api_key="k",
        openai_base_url="http://127.0.0.1:9/v1",
        openai_max_retries=0,
    )
    backend = OpenAIBackend(settings)
    await backend.start()
    with pytest.raises(errors.UpstreamUnavailable):
        await backend.create_container("s", 600)
    await backend.aclose()


async def test_secrets_never_leak(emu: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    backend = await make_backend(emu, tmp_path, openai_api_key=SECRET)
    c = await backend.create_container("s", 600)
    await run(backend, c, "open('/mnt/data/f.txt', 'w').write('f')")
    (f,) = await backend.list_files(c)
    emu.behaviour.echo_key_in_errors = True  # adversarial: every error message carries the caller's key
    raised: list[errors.CIError] = []

    async def expect(op: Any) -> None:
        try:
            await op
        except errors.CIError as exc:
            raised.append(exc)
        else:
            raise AssertionError("expected an error")

    emu.add_fault("responses", 400, message="Bad thing")
    await expect(run(backend, c, "1"))
    emu.add_fault("files.list", 429, times=3, retry_after="0.01")
    await expect(backend.list_files(c))
    emu.add_fault("files.content", 500, times=3, retry_after="0.01")
    await expect(backend.fetch_file(c, f, tmp_path / "f.txt", 100))
    await expect(backend.fetch_file(c, RemoteFile("x", 1, "v", remote_id="cfile_nope"), tmp_path / "x", 100))
    emu.add_fault("containers.create", 503, times=3, retry_after="0.01")
    await expect(backend.create_container("s", 600))
    emu.behaviour.output_mode = "failed"
    await expect(run(backend, c, "1"))
    emu.behaviour.output_mode = "normal"
    emu.expire(c.id)
    await expect(run(backend, c, "1"))
    emu.behaviour.api_key = "the-only-accepted-key"  # a 401 whose message echoes the presented key
    await expect(backend.create_container("s", 600))
    assert any(isinstance(e, errors.AuthFailed) for e in raised)
    kinds = {type(e) for e in raised}
    assert kinds >= {errors.RateLimited, errors.DownloadFailed, errors.ContainerExpired, errors.FileNotFound}
    for exc in raised:
        rendered = "".join(traceback.format_exception(exc))
        for text in (exc.message, exc.hint, exc.user_text(), str(exc), rendered):
            assert SECRET not in text
    assert any("request key" in e.message for e in raised)  # the echoed key was there, and was scrubbed
    for record in caplog.records:
        assert SECRET not in record.getMessage()
    assert SECRET not in str(backend.describe())
    await backend.aclose()


# ----- real HTTP -----------------------------------------------------------------------------------------------------


async def test_over_loopback_http(emu: Emulator, tmp_path: Path) -> None:
    with ThreadServer(emu) as server:
        backend = OpenAIBackend(emu.settings(tmp_path, base_url=server.base_url), retry_base_s=0.01)
        await backend.start()
        c = await backend.create_container("s", 600)
        out = await run(backend, c, "open('/mnt/data/h.bin', 'wb').write(b'h' * 300_000)\nprint('http')")
        assert out.stdout == "http\n" and [f.path for f in out.cited_files] == ["h.bin"]
        emu.add_fault("files.content", mode="drop", drop_after_bytes=100_000)
        res = await backend.fetch_file(c, out.cited_files[0], tmp_path / "h.bin", 1_000_000)
        assert res.bytes == 300_000 and res.sha256 == sha(b"h" * 300_000)
        assert emu.calls["files.content"] == 2
        await backend.destroy(c)
        await backend.aclose()
