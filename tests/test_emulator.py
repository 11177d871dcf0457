"""The OpenAI API emulator, checked through the real openai SDK with strict response validation.

Every payload the emulator sends must parse with the SDK's own models (`_strict_response_validation=True`), and
each configurable behaviour must do what the backend tests rely on.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
from openai import AsyncAzureOpenAI, AsyncOpenAI

from tests.emulator import API_KEY, Behaviour, Emulator, EmulatorProcess, ThreadServer

pytestmark = pytest.mark.anyio

EXPIRES = {"anchor": "last_active_at", "minutes": 20}
# The event order the reference verified against the real API's documentation.
EXPECTED_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.code_interpreter_call.in_progress",
    "response.code_interpreter_call_code.delta",
    "response.code_interpreter_call_code.done",
    "response.code_interpreter_call.interpreting",
    "response.code_interpreter_call.completed",
    "response.output_item.done",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.annotation.added",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture
async def client(emu: Emulator) -> AsyncIterator[AsyncOpenAI]:
    sdk = emu.sdk_client()
    yield sdk
    await sdk.close()


def fenced(code: str) -> str:
    return f"Run this:\n\n```python\n{code}\n```"


async def run(client: AsyncOpenAI, container_id: str, code: str, **kwargs: Any) -> tuple[Any, list[Any]]:
    """A streamed run; returns (final Response model, all events), everything parsed strictly by the SDK."""
    kwargs.setdefault("include", ["code_interpreter_call.outputs"])
    stream = await client.responses.create(
        model="gpt-test",
        input=fenced(code),
        tools=[{"type": "code_interpreter", "container": container_id}],
        stream=True,
        **kwargs,
    )
    events = [event async for event in stream]
    finals = [e.response for e in events if e.type in ("response.completed", "response.incomplete", "response.failed")]
    return (finals[-1] if finals else None), events


async def new_container(client: AsyncOpenAI) -> str:
    return (await client.containers.create(name="t", expires_after=EXPIRES)).id  # type: ignore[arg-type]


async def test_containers_crud_and_pagination(emu: Emulator, client: AsyncOpenAI) -> None:
    created = [await client.containers.create(name=f"c{i}", expires_after=EXPIRES, memory_limit="4g") for i in range(4)]
    assert created[0].id.startswith("cntr_") and created[0].status == "running"
    assert created[0].expires_after is not None and created[0].expires_after.minutes == 20
    assert created[0].memory_limit == "4g"
    listed = [c.id async for c in client.containers.list(limit=100)]
    assert listed == [c.id for c in created]
    assert emu.calls["containers.list"] == 2  # page_size_cap 3 -> two pages
    got = await client.containers.retrieve(created[1].id)
    assert got.id == created[1].id and got.last_active_at is not None
    await client.containers.delete(created[1].id)
    with pytest.raises(openai.NotFoundError):
        await client.containers.delete(created[1].id)
    with pytest.raises(openai.NotFoundError):
        await client.containers.retrieve("cntr_missing")


async def test_run_stream_is_strict_and_really_executes(emu: Emulator, client: AsyncOpenAI) -> None:
    cid = await new_container(client)
    code = "open('/mnt/data/out.txt', 'w').write('hello')\nx = 41\nprint('printed', x + 1)"
    final, events = await run(client, cid, code)
    assert [e.type for e in events] == EXPECTED_ORDER
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)) and numbers[0] == 1
    assert final.status == "completed" and final.usage is not None
    assert final.usage.input_tokens_details.cache_write_tokens == 0
    call = final.output[0]
    assert call.type == "code_interpreter_call" and call.code == code and call.container_id == cid
    assert call.outputs is not None and call.outputs[0].logs == "printed 42\n"
    assert (emu.container_dir(cid) / "out.txt").read_text() == "hello"
    message = final.output[1]
    text = message.content[0].text
    ann = message.content[0].annotations
    assert len(ann) == 1 and ann[0].type == "container_file_citation" and ann[0].filename == "out.txt"
    assert text[ann[0].start_index : ann[0].end_index] == "sandbox:/mnt/data/out.txt"
    # State persists between runs, like a notebook kernel.
    final2, _ = await run(client, cid, "x * 2")
    assert final2.output[0].outputs[0].logs == "82\n"


async def test_non_stream_and_include_flag(client: AsyncOpenAI) -> None:
    cid = await new_container(client)
    resp = await client.responses.create(
        model="m", input=fenced("print(1)"), tools=[{"type": "code_interpreter", "container": cid}]
    )
    assert resp.status == "completed"
    assert resp.output[0].outputs is None  # no include -> no logs, as the real API does
    resp = await client.responses.create(
        model="m",
        input=fenced("print(2)"),
        tools=[{"type": "code_interpreter", "container": cid}],
        include=["code_interpreter_call.outputs"],
    )
    assert resp.output[0].outputs[0].logs == "2\n"


async def test_auto_container_is_refused(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(
            model="m", input=fenced("1"), tools=[{"type": "code_interpreter", "container": {"type": "auto"}}]
        )


async def test_files_list_pages_upload_content_delete(emu: Emulator, client: AsyncOpenAI) -> None:
    cid = await new_container(client)
    await run(
        client,
        cid,
        "import os\nos.makedirs('/mnt/data/sub')\nfor i in range(5):\n"
        "    open(f'/mnt/data/sub/f{i}.bin', 'wb').write(bytes([i]) * (i + 1))",
    )
    up = await client.containers.files.create(cid, file=("in.csv", b"a,b\n1,2\n"))
    assert up.source == "user" and up.path == "/mnt/data/in.csv" and up.bytes == 8
    files = [f async for f in client.containers.files.list(cid, limit=100)]
    assert emu.calls["files.list"] == 2
    assert sorted(f.path for f in files) == ["/mnt/data/in.csv"] + [f"/mnt/data/sub/f{i}.bin" for i in range(5)]
    assert {f.source for f in files if f.path.endswith(".bin")} == {"assistant"}
    f3 = next(f for f in files if f.path.endswith("f3.bin"))
    async with client.containers.files.content.with_streaming_response.retrieve(f3.id, container_id=cid) as resp:
        assert resp.headers["content-type"] == "application/octet-stream"
        assert await resp.read() == bytes([3]) * 4
    assert (await client.containers.files.retrieve(f3.id, container_id=cid)).bytes == 4
    await client.containers.files.delete(f3.id, container_id=cid)
    assert len([f async for f in client.containers.files.list(cid)]) == 5
    # JSON create with a Files API id.
    uploaded = await client.files.create(file=("data.txt", b"xyz"), purpose="user_data")
    copy = await client.containers.files.create(cid, file_id=uploaded.id)
    assert copy.path == "/mnt/data/data.txt" and copy.bytes == 3


async def test_hashed_upload_paths(emu: Emulator, client: AsyncOpenAI) -> None:
    emu.behaviour.upload_paths = "hashed"
    cid = await new_container(client)
    up = await client.containers.files.create(cid, file=("in.csv", b"1"))
    assert up.path.startswith("/mnt/data/") and up.path.endswith("-in.csv") and up.path != "/mnt/data/in.csv"


async def test_annotations_dropped_under_text_format(emu: Emulator, client: AsyncOpenAI) -> None:
    cid = await new_container(client)
    fmt = {"format": {"type": "json_schema", "name": "result", "schema": {"type": "object"}, "strict": False}}
    final, _ = await run(client, cid, "open('/mnt/data/a.txt', 'w').write('1')\n{'n': 1}", text=fmt)
    assert final.output_text == '{"n": 1}'
    assert final.output[1].content[0].annotations == []
    emu.behaviour.annotations = "always"
    final, _ = await run(client, cid, "open('/mnt/data/b.txt', 'w').write('2')\n{'n': 2}", text=fmt)
    assert [a.filename for a in final.output[1].content[0].annotations] == ["b.txt"]
    emu.behaviour.annotations = "never"
    final, _ = await run(client, cid, "open('/mnt/data/c.txt', 'w').write('3')")
    assert "sandbox:/mnt/data/c.txt" in final.output_text and final.output[1].content[0].annotations == []
    emu.behaviour.annotations = "auto"
    emu.behaviour.citation_filename = "file_id"
    final, _ = await run(client, cid, "open('/mnt/data/d.png', 'w').write('4')")
    ann = final.output[1].content[0].annotations[0]
    assert ann.filename == ann.file_id + ".png"


async def test_sentinel_block_and_repair(emu: Emulator, client: AsyncOpenAI) -> None:
    cid = await new_container(client)
    instructions = "End with ===BEGIN_JSON n0nce=== json ===END_JSON n0nce==="
    final, _ = await run(client, cid, "{'total': 3}", instructions=instructions)
    assert '===BEGIN_JSON n0nce===\n{"total": 3}\n===END_JSON n0nce===' in final.output_text
    final, _ = await run(client, cid, "print('===BEGIN_JSON===\\n[1, 2]\\n===END_JSON===')", instructions=instructions)
    assert "===BEGIN_JSON n0nce===\n[1, 2]\n===END_JSON n0nce===" in final.output_text
    emu.behaviour.sentinel_json = '{"scripted": true}'
    final, _ = await run(client, cid, "None", instructions=instructions)
    assert '{"scripted": true}' in final.output_text
    fmt = {"format": {"type": "json_schema", "name": "result", "schema": {"type": "object"}}}
    repair = await client.responses.create(model="m", input='Raw output:\n{"a": 1}\nProblems: x', tools=[], text=fmt)
    assert repair.output_text == '{"a": 1}' and repair.output[0].type == "message"
    emu.behaviour.repair_text = '{"fixed": 1}'
    repair = await client.responses.create(model="m", input="anything", tools=[], text=fmt)
    assert repair.output_text == '{"fixed": 1}'


async def test_scripted_text_still_cites(emu: Emulator, client: AsyncOpenAI) -> None:
    cid = await new_container(client)
    emu.behaviour.model_text = "See [r](sandbox:/mnt/data/r.txt) and [gone](sandbox:/mnt/data/nope.txt)."
    final, _ = await run(client, cid, "open('/mnt/data/r.txt', 'w').write('r')")
    assert final.output_text == emu.behaviour.model_text
    assert [a.filename for a in final.output[1].content[0].annotations] == ["r.txt"]


async def test_expiry_idle_and_on_demand(emu: Emulator, client: AsyncOpenAI) -> None:
    cid = await new_container(client)
    emu.expire(cid)
    got = await client.containers.retrieve(cid)
    assert got.status == "expired"
    with pytest.raises(openai.BadRequestError) as info:
        await run(client, cid, "1")
    assert "Container is expired." in str(info.value) and info.value.code is None
    assert info.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        [f async for f in client.containers.files.list(cid)]
    emu.behaviour.expired_retrieve = "error"
    with pytest.raises(openai.BadRequestError):
        await client.containers.retrieve(cid)
    # Idle expiry: the container expires once idle longer than idle_expiry_s.
    emu.behaviour.idle_expiry_s = 0.2
    cid2 = await new_container(client)
    emu.containers[cid2].last_active_at = time.time() - 1
    with pytest.raises(openai.BadRequestError):
        await client.containers.files.create(cid2, file=("x", b"1"))


async def test_faults_429_retry_after_and_5xx(emu: Emulator) -> None:
    sdk = emu.sdk_client(max_retries=2)
    emu.add_fault("containers.create", 429, retry_after="0.01")
    emu.add_fault("containers.retrieve", 503, times=2, retry_after="0.01")
    cid = await new_container(sdk)
    assert emu.calls["containers.create"] == 2  # one 429, then the SDK's retry
    await sdk.containers.retrieve(cid)
    assert emu.calls["containers.retrieve"] == 3
    emu.add_fault("files.list", 500, times=5, retry_after="0.01")
    with pytest.raises(openai.InternalServerError):
        [f async for f in sdk.containers.files.list(cid)]
    assert emu.calls["files.list"] == 3
    emu.behaviour.faults = []
    fault = emu.add_fault("responses", 429, retry_after="300")
    with pytest.raises(openai.RateLimitError):  # more than 120 s: the SDK does not retry
        await run(sdk, cid, "1")
    assert fault.seen == 1 and emu.calls["responses"] == 1
    await sdk.close()


async def test_download_drop_mid_stream(emu: Emulator, client: AsyncOpenAI) -> None:
    cid = await new_container(client)
    await run(client, cid, "open('/mnt/data/big.bin', 'wb').write(b'z' * 100_000)")
    (f,) = [f async for f in client.containers.files.list(cid)]
    emu.add_fault("files.content", mode="drop", drop_after_bytes=1000)
    with pytest.raises(httpx2.RemoteProtocolError):
        async with client.containers.files.content.with_streaming_response.retrieve(f.id, container_id=cid) as r:
            await r.read()
    async with client.containers.files.content.with_streaming_response.retrieve(f.id, container_id=cid) as r:
        assert await r.read() == b"z" * 100_000


async def test_altered_code_really_runs(emu: Emulator, client: AsyncOpenAI) -> None:
    emu.behaviour.alter_code = "print('added by the model')"
    cid = await new_container(client)
    final, _ = await run(client, cid, "print('mine')")
    assert final.output[0].code == "print('mine')\nprint('added by the model')"
    assert final.output[0].outputs[0].logs == "mine\nadded by the model\n"


@pytest.mark.parametrize(
    ("mode", "status"),
    [
        ("empty", "completed"),
        ("failed", "failed"),
        ("cancelled", "cancelled"),
        ("incomplete", "incomplete"),
        ("incomplete_before_call", "incomplete"),
        ("no_tool_call", "completed"),
        ("call_failed", "completed"),
        ("repeat_call", "completed"),
    ],
)
async def test_output_modes_parse_strictly(emu: Emulator, client: AsyncOpenAI, mode: str, status: str) -> None:
    emu.behaviour.output_mode = mode  # type: ignore[assignment]
    cid = await new_container(client)
    final, events = await run(client, cid, "print('x')")
    assert final.status == status
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers))
    types = [item.type for item in final.output]
    expected = {
        "empty": [],
        "failed": [],
        "cancelled": [],
        "incomplete": ["code_interpreter_call", "message"],
        "incomplete_before_call": [],
        "no_tool_call": ["message"],
        "call_failed": ["code_interpreter_call", "message"],
        "repeat_call": ["code_interpreter_call", "code_interpreter_call", "message"],
    }[mode]
    assert types == expected
    if mode == "call_failed":
        assert final.output[0].status == "failed"
    if mode == "failed":
        assert final.error is not None and final.error.code == "server_error"


async def test_stream_error_event(emu: Emulator, client: AsyncOpenAI) -> None:
    emu.behaviour.output_mode = "stream_error"
    cid = await new_container(client)
    final, events = await run(client, cid, "1")
    assert final is None and events[-1].type == "error" and events[-1].code == "server_error"


async def test_malformed_modes_are_rejected_by_strict_models(emu: Emulator, client: AsyncOpenAI) -> None:
    cid = await new_container(client)
    for mode in ("not_a_list", "nested_content"):
        emu.behaviour.output_mode = mode  # type: ignore[assignment]
        with pytest.raises(openai.APIResponseValidationError):
            await client.responses.create(
                model="m", input=fenced("1"), tools=[{"type": "code_interpreter", "container": cid}]
            )


async def test_api_key_and_echo(emu: Emulator) -> None:
    emu.behaviour.api_key = "the-right-key"
    sdk = emu.sdk_client(api_key="a-wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        await new_container(sdk)
    assert "a-wrong-key" in str(info.value)  # like the real API, the message echoes the key
    assert emu.requests[-1].auth == "bearer"
    await sdk.close()


async def test_latency_injection(emu: Emulator, client: AsyncOpenAI) -> None:
    emu.behaviour.latency_s = 0.15
    started = time.monotonic()
    await new_container(client)
    assert time.monotonic() - started >= 0.15


async def test_kernel_timeout(emu: Emulator, client: AsyncOpenAI) -> None:
    emu.behaviour.exec_timeout_s = 0.3
    cid = await new_container(client)
    final, _ = await run(client, cid, "import time\ntime.sleep(5)")
    assert "timed out" in final.output[0].outputs[0].logs
    emu.behaviour.exec_timeout_s = 30
    final, _ = await run(client, cid, "print('fresh kernel')")
    assert final.output[0].outputs[0].logs == "fresh kernel\n"


async def test_azure_paths_and_auth(emu: Emulator) -> None:
    azure = AsyncAzureOpenAI(
        azure_endpoint="http://azure.test",
        api_version="2025-04-01-preview",
        azure_deployment="dep1",
        api_key=API_KEY,
        http_client=emu.http_client(),
        _strict_response_validation=True,
    )
    cid = (await azure.containers.create(name="az", expires_after=EXPIRES)).id  # type: ignore[arg-type]
    final, _ = await run(azure, cid, "print('azure')")
    assert final.output[0].outputs[0].logs == "azure\n"
    rec = emu.requests[0]
    assert rec.path == "/openai/containers" and rec.query["api-version"] == "2025-04-01-preview"
    assert rec.auth == "api-key"
    await azure.close()


def test_behaviour_json_roundtrip() -> None:
    b = Behaviour.from_json({"latency_s": 0.2, "faults": [{"kind": "responses", "status": 429}]})
    assert b.faults[0].status == 429 and Behaviour.from_json(b.to_json()) == b
    with pytest.raises(ValueError):
        b.update({"no_such_behaviour": 1})


async def test_thread_server_over_real_http(emu: Emulator) -> None:
    with ThreadServer(emu) as server:
        sdk = AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, _strict_response_validation=True)
        cid = await new_container(sdk)
        final, _ = await run(sdk, cid, "open('/mnt/data/h.txt', 'w').write('over http')")
        (f,) = [f async for f in sdk.containers.files.list(cid)]
        async with sdk.containers.files.content.with_streaming_response.retrieve(f.id, container_id=cid) as r:
            assert await r.read() == b"over http"
        async with httpx2.AsyncClient() as http:
            control = server.base_url.replace("/v1", "/_emulator")
            state = (await http.post(control + "/behaviour", json={"output_mode": "empty"})).json()
            assert state["behaviour"]["output_mode"] == "empty"
        final, _ = await run(sdk, cid, "1")
        assert final.output == []
        # A dropped download over real HTTP surfaces as a transport error.
        emu.behaviour.output_mode = "normal"
        emu.add_fault("files.content", mode="drop", drop_after_bytes=3)
        with pytest.raises(httpx2.TransportError):
            async with sdk.containers.files.content.with_streaming_response.retrieve(f.id, container_id=cid) as r:
                await r.read()
        await sdk.close()


def test_subprocess_server_and_control() -> None:
    with EmulatorProcess(behaviour={"page_size_cap": 1}) as proc:
        assert proc.base_url.startswith("http://127.0.0.1:")
        with httpx2.Client(base_url=proc.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            cid = http.post("/containers", json={"name": "p", "expires_after": EXPIRES}).json()["id"]
            page = http.get("/containers").json()
            assert page["has_more"] is False and len(page["data"]) == 1
            proc.control(latency_s=0.0, page_size_cap=5)
            assert proc.state()["behaviour"]["page_size_cap"] == 5
            proc.expire(cid)
            assert http.get(f"/containers/{cid}").json()["status"] == "expired"
