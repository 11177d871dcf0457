"""The emulator core: routes requests of the OpenAI Containers, Container Files and Responses APIs.

Transport-neutral: `Emulator.handle(EmuRequest) -> EmuResponse`, whose body is bytes or an async iterator of
bytes (streamed downloads, SSE). `transports.py` adapts it to an httpx2 transport (in-process) and to ASGI
(uvicorn on a loopback port). Control endpoints under /_emulator/ let a test change behaviours over HTTP.
"""

from __future__ import annotations

import json
import mimetypes
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

import anyio

from . import model, payloads
from .control import Behaviour, Fault
from .sandbox import EmuContainer, FileRec, new_id

_PREFIX_RE = re.compile(r"^(?:/openai)?(?:/deployments/[^/]+)?(?:/v1)?(/.*)$")
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"/containers"), "containers.create"),
    ("GET", re.compile(r"/containers"), "containers.list"),
    ("GET", re.compile(r"/containers/(?P<cid>[^/]+)"), "containers.retrieve"),
    ("DELETE", re.compile(r"/containers/(?P<cid>[^/]+)"), "containers.delete"),
    ("POST", re.compile(r"/containers/(?P<cid>[^/]+)/files"), "files.create"),
    ("GET", re.compile(r"/containers/(?P<cid>[^/]+)/files"), "files.list"),
    ("GET", re.compile(r"/containers/(?P<cid>[^/]+)/files/(?P<fid>[^/]+)"), "files.retrieve"),
    ("GET", re.compile(r"/containers/(?P<cid>[^/]+)/files/(?P<fid>[^/]+)/content"), "files.content"),
    ("DELETE", re.compile(r"/containers/(?P<cid>[^/]+)/files/(?P<fid>[^/]+)"), "files.delete"),
    ("POST", re.compile(r"/files"), "uploads.create"),
    ("POST", re.compile(r"/responses"), "responses"),
]


class StreamDropped(Exception):
    """Raised inside a response body to simulate a dropped connection; adapters turn it into a network error."""


@dataclass
class EmuRequest:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-case names
    body: bytes

    def q(self, name: str) -> str | None:
        return next((v for k, v in self.query if k == name), None)


@dataclass
class EmuResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes | AsyncIterator[bytes]


@dataclass
class Recorded:
    """One API request as the emulator saw it (secrets left out: only which auth scheme was used)."""

    kind: str
    method: str
    path: str
    query: dict[str, str]
    auth: str | None
    json: Any
    content_type: str | None
    at: float = field(default_factory=time.monotonic)


def _json(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> EmuResponse:
    return EmuResponse(status, [("content-type", "application/json"), *(headers or [])], json.dumps(obj).encode())


class Emulator:
    """An in-memory OpenAI API with real code execution. One instance per test (or per server process)."""

    def __init__(self, behaviour: Behaviour | None = None, root: Path | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.containers: dict[str, EmuContainer] = {}
        self.calls: Counter[str] = Counter()
        self.requests: list[Recorded] = []
        self.exec_seconds = 0.0  # time spent running code (the "model's" own work, for overhead figures)
        self.inflight: Counter[str] = Counter()  # requests being served now, per kind (bodies included)
        self.max_inflight: Counter[str] = Counter()  # the most served at once, per kind
        self.uploads: dict[str, tuple[str, bytes]] = {}  # Files API objects (file-...) for create(file_id=)
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="ci-emulator-")) if root is None else root

    # ----- helpers for tests -------------------------------------------------------------------------------

    def expire(self, container_id: str) -> None:
        """Expire a container now, as if it had been idle too long: its data is discarded."""
        c = self.containers[container_id]
        c.status = "expired"
        c.shutdown(discard=True)

    def add_fault(self, kind: str, status: int = 500, **kwargs: Any) -> Fault:
        fault = Fault(kind=kind, status=status, **kwargs)
        self.behaviour.faults.append(fault)
        return fault

    def container_dir(self, container_id: str) -> Path:
        """The host folder that stands for the container's /mnt/data."""
        return self.containers[container_id].root

    def reset(self) -> None:
        self.behaviour = Behaviour()
        self.calls.clear()
        self.requests.clear()
        self.max_inflight.clear()
        self.exec_seconds = 0.0

    def close(self) -> None:
        for c in self.containers.values():
            c.shutdown(discard=False)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def state(self) -> dict[str, Any]:
        return {
            "behaviour": self.behaviour.to_json(),
            "calls": dict(self.calls),
            "exec_seconds": self.exec_seconds,
            "containers": [
                {**c.to_wire(), "files": [payloads.file_wire(f, c.id) for f in c.listing()]}
                for c in self.containers.values()
            ],
        }

    # ----- dispatch -----------------------------------------------------------------------------------------

    async def handle(self, req: EmuRequest) -> EmuResponse:
        if req.path.startswith("/_emulator/"):
            return self._control(req)
        m = _PREFIX_RE.match(req.path)
        path = m.group(1) if m else req.path
        for method, pattern, kind in _ROUTES:
            match = pattern.fullmatch(path)
            if match and method == req.method:
                return await self._api(kind, match.groupdict(), req)
        return _json(404, payloads.error_body(404, f"Invalid URL ({req.method} {req.path})"))

    async def _api(self, kind: str, params: dict[str, str], req: EmuRequest) -> EmuResponse:
        self.calls[kind] += 1
        self.inflight[kind] += 1
        self.max_inflight[kind] = max(self.max_inflight[kind], self.inflight[kind])
        resp: EmuResponse | None = None
        try:
            resp = await self._serve(kind, params, req)
            if not isinstance(resp.body, bytes):
                resp.body = self._counted(kind, resp.body)  # in flight until the body ends
            return resp
        finally:
            if resp is None or isinstance(resp.body, bytes):
                self.inflight[kind] -= 1

    async def _serve(self, kind: str, params: dict[str, str], req: EmuRequest) -> EmuResponse:
        body_json: Any = None
        ctype = req.headers.get("content-type")
        if req.body and ctype and ctype.startswith("application/json"):
            body_json = json.loads(req.body)
        auth_header = req.headers.get("authorization", "")
        presented = auth_header[7:] if auth_header.lower().startswith("bearer ") else req.headers.get("api-key", "")
        scheme = "bearer" if auth_header else ("api-key" if "api-key" in req.headers else None)
        self.requests.append(Recorded(kind, req.method, req.path, dict(req.query), scheme, body_json, ctype))
        b = self.behaviour
        delay = b.download_latency_s if kind == "files.content" else b.latency_s
        if delay > 0:
            await anyio.sleep(delay)

        def err(status: int, message: str | None = None, headers: list[tuple[str, str]] | None = None) -> EmuResponse:
            text = message or payloads.DEFAULT_MESSAGES.get(status, "Error.")
            if b.echo_key_in_errors:
                text += f" (request key: {presented})"
            return _json(status, payloads.error_body(status, text), headers)

        if b.api_key is not None and presented != b.api_key:
            return _json(
                401,
                payloads.error_body(401, f"Incorrect API key provided: {presented}.", code="invalid_api_key"),
            )
        drop: Fault | None = None
        firing = [fault for fault in b.faults if fault.fires(kind)]  # every fault counts this call
        for fault in firing:
            if fault.mode == "drop":
                drop = fault
                break
            headers = [("retry-after", fault.retry_after)] if fault.retry_after is not None else []
            return err(fault.status, fault.message, headers)
        handler = getattr(self, "_" + kind.replace(".", "_"))
        return await handler(req, body_json, drop, err, **params)

    async def _counted(self, kind: str, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in body:
                yield chunk
        finally:
            self.inflight[kind] -= 1

    def _live(self, cid: str, err: Any, *, for_retrieve: bool = False) -> EmuContainer | EmuResponse:
        c = self.containers.get(cid)
        if c is None or c.status == "deleted":
            return err(404, f"No container found with id '{cid}'.")
        if c.status == "running":
            idle = time.time() - c.last_active_at
            limit = c.minutes * 60.0
            if self.behaviour.idle_expiry_s is not None:
                limit = min(limit, self.behaviour.idle_expiry_s)
            if idle > limit:
                self.expire(cid)
        if c.status == "expired" and not (for_retrieve and self.behaviour.expired_retrieve == "status"):
            return err(400, payloads.EXPIRED)
        return c

    # ----- containers ---------------------------------------------------------------------------------------

    async def _containers_create(self, req: EmuRequest, body: Any, drop: Fault | None, err: Any) -> EmuResponse:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return err(400, "Missing required parameter: 'name'.")
        expires = body.get("expires_after") or {"anchor": "last_active_at", "minutes": 20}
        if expires.get("anchor") != "last_active_at" or not isinstance(expires.get("minutes"), int):
            return err(400, "Invalid 'expires_after': expected {anchor: 'last_active_at', minutes: int}.")
        memory = body.get("memory_limit") or "1g"
        if memory not in ("1g", "4g", "16g", "64g"):
            return err(400, f"Invalid 'memory_limit': {memory!r}.")
        c = await anyio.to_thread.run_sync(EmuContainer.create, self.root, body["name"], expires["minutes"], memory)
        self.containers[c.id] = c
        return _json(200, c.to_wire())

    async def _containers_list(self, req: EmuRequest, body: Any, drop: Fault | None, err: Any) -> EmuResponse:
        items = [c.to_wire() for c in self.containers.values() if c.status != "deleted"]
        return self._paginate(req, items, err)

    async def _containers_retrieve(
        self, req: EmuRequest, body: Any, drop: Fault | None, err: Any, cid: str
    ) -> EmuResponse:
        c = self._live(cid, err, for_retrieve=True)
        if isinstance(c, EmuResponse):
            return c
        if c.status == "running":
            c.touch()  # any container operation refreshes last_active_at (the guide says so)
        return _json(200, c.to_wire())

    async def _containers_delete(
        self, req: EmuRequest, body: Any, drop: Fault | None, err: Any, cid: str
    ) -> EmuResponse:
        c = self.containers.get(cid)
        if c is None or c.status == "deleted":
            return err(404, f"No container found with id '{cid}'.")
        c.status = "deleted"
        await anyio.to_thread.run_sync(c.shutdown, True)
        return _json(200, {"id": cid, "object": "container.deleted", "deleted": True})

    def _paginate(self, req: EmuRequest, items: list[dict[str, Any]], err: Any) -> EmuResponse:
        try:
            limit = int(req.q("limit") or 20)
        except ValueError:
            return err(400, "Invalid 'limit'.")
        if not 1 <= limit <= 100:
            return err(400, "Invalid 'limit': must be between 1 and 100.")
        limit = min(limit, self.behaviour.page_size_cap)
        if req.q("order") == "desc":
            items = items[::-1]
        after = req.q("after")
        if after:
            ids = [i["id"] for i in items]
            if after not in ids:
                return err(400, f"Invalid 'after': {after!r}.")
            items = items[ids.index(after) + 1 :]
        return _json(200, payloads.page(items[:limit], has_more=len(items) > limit))

    # ----- container files ----------------------------------------------------------------------------------

    async def _files_list(self, req: EmuRequest, body: Any, drop: Fault | None, err: Any, cid: str) -> EmuResponse:
        c = self._live(cid, err)
        if isinstance(c, EmuResponse):
            return c
        c.touch()
        await anyio.to_thread.run_sync(c.scan)
        return self._paginate(req, [payloads.file_wire(f, c.id) for f in c.listing()], err)

    async def _files_create(self, req: EmuRequest, body: Any, drop: Fault | None, err: Any, cid: str) -> EmuResponse:
        c = self._live(cid, err)
        if isinstance(c, EmuResponse):
            return c
        ctype = req.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            upload = _multipart_file(ctype, req.body)
            if upload is None:
                return err(400, "Missing required parameter: 'file'.")
            filename, data = upload
        elif isinstance(body, dict) and isinstance(body.get("file_id"), str):
            if body["file_id"] not in self.uploads:
                return err(404, f"No such File object: {body['file_id']}")
            filename, data = self.uploads[body["file_id"]]
        else:
            return err(400, "Send a multipart 'file' or a JSON 'file_id'.")
        c.touch()
        rec = await anyio.to_thread.run_sync(c.add_upload, filename, data, self.behaviour.upload_paths == "hashed")
        return _json(200, payloads.file_wire(rec, c.id))

    def _file(self, cid: str, fid: str, err: Any) -> tuple[EmuContainer, FileRec] | EmuResponse:
        c = self._live(cid, err)
        if isinstance(c, EmuResponse):
            return c
        rec = c.file_by_id(fid)
        if rec is None or not c.host_path(rec.path).is_file():
            return err(404, f"No file found with id '{fid}' in container '{cid}'.")
        c.touch()
        return c, rec

    async def _files_retrieve(
        self, req: EmuRequest, body: Any, drop: Fault | None, err: Any, cid: str, fid: str
    ) -> EmuResponse:
        found = self._file(cid, fid, err)
        if isinstance(found, EmuResponse):
            return found
        return _json(200, payloads.file_wire(found[1], cid))

    async def _files_delete(
        self, req: EmuRequest, body: Any, drop: Fault | None, err: Any, cid: str, fid: str
    ) -> EmuResponse:
        found = self._file(cid, fid, err)
        if isinstance(found, EmuResponse):
            return found
        c, rec = found
        await anyio.to_thread.run_sync(c.host_path(rec.path).unlink)
        await anyio.to_thread.run_sync(c.scan)
        return _json(200, {"id": fid, "object": "container.file.deleted", "deleted": True})

    async def _files_content(
        self, req: EmuRequest, body: Any, drop: Fault | None, err: Any, cid: str, fid: str
    ) -> EmuResponse:
        found = self._file(cid, fid, err)
        if isinstance(found, EmuResponse):
            return found
        c, rec = found
        host = c.host_path(rec.path)
        size = host.stat().st_size
        ctype = mimetypes.guess_type(host.name)[0] or "application/octet-stream"
        chunk = self.behaviour.chunk_size
        if drop is None and size <= chunk:  # one read; the emulator's own cost stays out of the figures
            data = await anyio.to_thread.run_sync(host.read_bytes)
            return EmuResponse(200, [("content-type", ctype)], data)

        async def body_iter() -> AsyncIterator[bytes]:
            sent = 0
            fh = await anyio.to_thread.run_sync(open, host, "rb")
            try:
                while True:
                    data = await anyio.to_thread.run_sync(fh.read, chunk)
                    if not data:
                        return
                    if drop is not None and sent + len(data) >= drop.drop_after_bytes:
                        if drop.drop_after_bytes > sent:
                            yield data[: drop.drop_after_bytes - sent]
                        raise StreamDropped("connection dropped by the emulator")
                    sent += len(data)
                    yield data
            finally:
                await anyio.to_thread.run_sync(fh.close)

        return EmuResponse(200, [("content-type", ctype), ("content-length", str(size))], body_iter())

    async def _uploads_create(self, req: EmuRequest, body: Any, drop: Fault | None, err: Any) -> EmuResponse:
        upload = _multipart_file(req.headers.get("content-type", ""), req.body)
        if upload is None:
            return err(400, "Missing required parameter: 'file'.")
        file_id = new_id("file-", 22)
        self.uploads[file_id] = upload
        return _json(
            200,
            {
                "id": file_id,
                "object": "file",
                "bytes": len(upload[1]),
                "created_at": int(time.time()),
                "filename": upload[0],
                "purpose": "user_data",
                "status": "processed",
                "expires_at": None,
                "status_details": None,
            },
        )

    # ----- responses ----------------------------------------------------------------------------------------

    async def _responses(self, req: EmuRequest, body: Any, drop: Fault | None, err: Any) -> EmuResponse:
        if not isinstance(body, dict):
            return err(400, "Expected a JSON body.")
        container: EmuContainer | None = None
        tools = body.get("tools") or []
        ci_tools = [t for t in tools if isinstance(t, dict) and t.get("type") == "code_interpreter"]
        if ci_tools:
            ref = ci_tools[0].get("container")
            if not isinstance(ref, str):
                return err(400, "The emulator only serves explicit containers (tools[0].container = 'cntr_...').")
            found = self._live(ref, err)
            if isinstance(found, EmuResponse):
                return found
            container = found
            container.touch()
        events = _ResponseRun(self, body, container).events()
        if body.get("stream"):
            return EmuResponse(200, [("content-type", "text/event-stream")], _sse(events, drop))
        final: dict[str, Any] | None = None
        async for event in events:
            if event["type"] == "error":
                return err(500, event["message"])
            if "response" in event:
                final = event["response"]
        return _json(200, final)

    # ----- control ------------------------------------------------------------------------------------------

    def _control(self, req: EmuRequest) -> EmuResponse:
        path = req.path[len("/_emulator") :]
        if req.method == "GET" and path == "/state":
            return _json(200, self.state())
        if req.method == "GET" and path == "/requests":
            return _json(200, [r.__dict__ for r in self.requests])
        if req.method == "POST" and path == "/behaviour":
            try:
                self.behaviour.update(json.loads(req.body or b"{}"))
            except (ValueError, TypeError) as exc:
                return _json(400, payloads.error_body(400, str(exc)))
            return _json(200, self.state())
        if req.method == "POST" and path == "/reset":
            self.reset()
            return _json(200, self.state())
        m = re.fullmatch(r"/containers/([^/]+)/expire", path)
        if req.method == "POST" and m and m.group(1) in self.containers:
            self.expire(m.group(1))
            return _json(200, self.state())
        return _json(404, payloads.error_body(404, f"Unknown control endpoint {req.method} {req.path}"))


def _multipart_file(content_type: str, body: bytes) -> tuple[str, bytes] | None:
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        return None
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            data = part.get_payload(decode=True)
            return (part.get_filename() or "upload", data if isinstance(data, bytes) else b"")
    return None


async def _sse(events: AsyncIterator[dict[str, Any]], drop: Fault | None) -> AsyncIterator[bytes]:
    sent = 0
    async for event in events:
        data = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
        if drop is not None and sent + len(data) >= drop.drop_after_bytes:
            yield data[: max(0, drop.drop_after_bytes - sent)]
            raise StreamDropped("connection dropped by the emulator")
        sent += len(data)
        yield data


class _ResponseRun:
    """One POST /responses: the events of the stream, running the code in the middle like the real thing."""

    def __init__(self, emu: Emulator, body: dict[str, Any], container: EmuContainer | None) -> None:
        self.emu = emu
        self.b = emu.behaviour
        self.body = body
        self.container = container
        self.id = new_id("resp_", 48)
        self.created = int(time.time())
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.input_text = model.input_text(body.get("input"))
        fmt = (body.get("text") or {}).get("format") or {}
        self.json_format = fmt.get("type") in ("json_schema", "json_object")
        self._last: tuple[str, bool, str | None, list[FileRec]] = ("", False, None, [])
        self.include_outputs = not self.b.require_include or "code_interpreter_call.outputs" in (
            body.get("include") or []
        )

    def ev(self, type_: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": type_, "sequence_number": self.seq, **fields}

    def resp(self, status: str, output: Any = None, **kw: Any) -> dict[str, Any]:
        out = self.output if output is None else output
        tokens_in = len(self.input_text + (self.body.get("instructions") or "")) // 4 + 50
        tokens_out = len(json.dumps(out)) // 4 + 10
        usage = payloads.usage(tokens_in, tokens_out) if status != "in_progress" else None
        return payloads.response(self.body, self.id, self.created, status, out, usage_obj=usage, **kw)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        mode = self.b.output_mode
        yield self.ev("response.created", response=self.resp("in_progress", []))
        yield self.ev("response.in_progress", response=self.resp("in_progress", []))
        if mode == "empty":
            yield self.ev("response.completed", response=self.resp("completed", []))
            return
        if mode == "not_a_list":
            bogus = {"type": "message", "content": "not a list"}
            yield self.ev("response.completed", response=self.resp("completed", bogus))
            return
        if mode == "failed":
            error = {"code": "server_error", "message": "The server had an error while processing your request."}
            yield self.ev("response.failed", response=self.resp("failed", [], error=error))
            return
        if mode == "cancelled":
            yield self.ev("response.failed", response=self.resp("cancelled", []))
            return
        if mode == "incomplete_before_call":
            incomplete = self.resp("incomplete", [], incomplete_reason="max_output_tokens")
            yield self.ev("response.incomplete", response=incomplete)
            return
        if mode == "stream_error":
            yield self.ev("error", code="server_error", message="The model stream failed.", param=None)
            return

        code = model.extract_code(self.input_text) if self.container is not None else None
        logs, error, value_json, new_files = "", False, None, []
        if code is not None and mode != "no_tool_call":
            executed = code + "\n" + self.b.alter_code if self.b.alter_code else code
            for _ in range(2 if mode == "repeat_call" else 1):
                async for event in self._tool_call(executed, failed=mode == "call_failed"):
                    yield event
                logs, error, value_json, files = self._last
                new_files.extend(f for f in files if f not in new_files)
        if self.b.answer_delay_s and self.output:
            await anyio.sleep(self.b.answer_delay_s)
        text, annotations = self._answer(logs, error, value_json, new_files)
        if mode == "incomplete":
            text = text[: max(1, len(text) // 3)]
        async for event in self._message(text, annotations, incomplete=mode == "incomplete"):
            yield event
        if mode == "incomplete":
            final = self.resp("incomplete", incomplete_reason="max_output_tokens")
            yield self.ev("response.incomplete", response=final)
        else:
            yield self.ev("response.completed", response=self.resp("completed"))

    async def _tool_call(self, code: str, failed: bool) -> AsyncIterator[dict[str, Any]]:
        assert self.container is not None
        c = self.container
        item_id = new_id("ci_", 36)
        index = len(self.output)
        added = payloads.ci_item(item_id, c.id, "", "in_progress", None)
        yield self.ev("response.output_item.added", output_index=index, item=added)
        yield self.ev("response.code_interpreter_call.in_progress", item_id=item_id, output_index=index)
        yield self.ev("response.code_interpreter_call_code.delta", item_id=item_id, output_index=index, delta=code)
        yield self.ev("response.code_interpreter_call_code.done", item_id=item_id, output_index=index, code=code)
        yield self.ev("response.code_interpreter_call.interpreting", item_id=item_id, output_index=index)
        if failed:
            self._last = ("", True, None, [])
            item = payloads.ci_item(item_id, c.id, code, "failed", [] if self.include_outputs else None)
        else:
            started = time.monotonic()
            result = await anyio.to_thread.run_sync(c.run, code, self.b.exec_timeout_s)
            files = await anyio.to_thread.run_sync(c.scan)
            self.emu.exec_seconds += time.monotonic() - started
            c.touch()
            self._last = (result["logs"], bool(result["error"]), result.get("value_json"), files)
            outputs = [{"type": "logs", "logs": result["logs"]}] if self.include_outputs else None
            item = payloads.ci_item(item_id, c.id, code, "completed", outputs)
            yield self.ev("response.code_interpreter_call.completed", item_id=item_id, output_index=index)
        self.output.append(item)
        yield self.ev("response.output_item.done", output_index=index, item=item)

    def _answer(
        self, logs: str, error: bool, value_json: str | None, new_files: list[FileRec]
    ) -> tuple[str, list[dict[str, Any]]]:
        b = self.b
        tools = self.body.get("tools") or []
        if not tools and self.json_format:  # a repair call: structured output, no tools
            return b.repair_text or model.first_json_in(self.input_text) or "{}", []
        json_text = b.sentinel_json or value_json or model.printed_json(logs)
        if self.json_format:
            text = b.model_text or json_text or "{}"
        elif b.model_text is not None:
            text = b.model_text
        elif self.container is None:
            text = "OK."
        elif not self.output:
            text = "I did not run any code."
        else:
            nonce = model.sentinel_nonce(self.body.get("instructions"))
            text = model.summary_text(logs, error, [f.path for f in new_files], nonce, json_text)
        if self.container is None or b.annotations == "never" or (self.json_format and b.annotations == "auto"):
            return text, []
        c = self.container
        by_path = {f.path: f for f in c.listing()}
        annotations = []
        if self.json_format:  # "always": cite the new files without a span, as the docs example does
            spans = [(f.path, 0, 0) for f in new_files]
        else:
            spans = [s for s in model.links_in(text) if s[0] in by_path]
        for path, start, end in spans:
            rec = by_path[path]
            name = path.rsplit("/", 1)[-1]
            if b.citation_filename == "file_id":
                name = rec.id + Path(name).suffix
            annotations.append(payloads.citation(c.id, rec.id, name, start, end))
        return text, annotations

    async def _message(
        self, text: str, annotations: list[dict[str, Any]], incomplete: bool
    ) -> AsyncIterator[dict[str, Any]]:
        item_id = new_id("msg_", 36)
        index = len(self.output)
        added = payloads.message_item(item_id, "in_progress", [])
        yield self.ev("response.output_item.added", output_index=index, item=added)
        empty = payloads.text_part("", [])
        yield self.ev("response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=empty)
        yield self.ev(
            "response.output_text.delta", item_id=item_id, output_index=index, content_index=0, delta=text, logprobs=[]
        )
        for i, annotation in enumerate(annotations):
            yield self.ev(
                "response.output_text.annotation.added",
                item_id=item_id,
                output_index=index,
                content_index=0,
                annotation_index=i,
                annotation=annotation,
            )
        yield self.ev(
            "response.output_text.done", item_id=item_id, output_index=index, content_index=0, text=text, logprobs=[]
        )
        part = payloads.text_part(text, annotations)
        yield self.ev("response.content_part.done", item_id=item_id, output_index=index, content_index=0, part=part)
        content: list[Any] = [[part]] if self.b.output_mode == "nested_content" else [part]
        item = payloads.message_item(item_id, "incomplete" if incomplete else "completed", content)
        self.output.append(item)
        yield self.ev("response.output_item.done", output_index=index, item=item)
