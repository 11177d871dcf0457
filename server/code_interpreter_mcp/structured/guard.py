"""The guard: schema checking, JSON extraction and validation of caller input, run where they can be stopped.

Owns a small pool of guard processes (spawned from the server's own interpreter with `-m`, niced, under an
address-space limit) and the limits of the work they do: a wall-clock time limit per call, a size cap on the
texts, schemas and values sent, and a nesting limit on schemas and JSON results. Knows the extraction and schema
modules only as the functions the guard process calls; knows nothing of backends, runs or MCP.

Why processes and not bounded work in a thread: the costly cases are inside C or inside jsonschema's own loops
(a catastrophic-backtracking `pattern` is one `re.search` call that never returns to Python; an `allOf` that
doubles per level or 300,000 bad items is millions of small steps within one `iter_errors`). A thread cannot be
stopped, holds the GIL through a C regex, and so stalls every session; a budget threaded through jsonschema
would mean forking its validators. A process is killed on the time limit and replaced; the event loop only
waits on a pipe. A round trip costs about a millisecond, paid only by calls that use `output_schema`.

A limit hit is a `GuardLimit` with a message for the caller; the engine turns it into a clear `json_error` (or
an invalid-schema error for the schema check), never a stall.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from ..errors import InvalidSchema
from ..models import Violation
from .extract import Extracted

# The mcp client itself cannot parse a message nested about 196 levels deep (pydantic-core's limit); a result's
# JSON sits four levels down the message, so values deeper than this could never reach a client.
MAX_JSON_DEPTH = 128
# A JSON result (or schema) beyond this is refused: decoding it again in the server would hold the event loop.
MAX_JSON_CHARS = 4 * 1024 * 1024
# Far above any real schema; counted before a schema leaves the server, so the count itself stays cheap.
MAX_SCHEMA_NODES = 100_000
DEFAULT_TIME_LIMIT_S = 5.0
_MEMORY_LIMIT_BYTES = 1024 * 1024 * 1024
_POOL_SIZE = 2
_HEADER = struct.Struct(">I")


class GuardLimit(Exception):
    """A guard limit was hit (time, size, nesting); `str(exc)` is the message for the caller."""


@dataclass
class Checked:
    """One extraction and, when a schema was given and a value found, its validation."""

    extracted: Extracted
    violations: list[Violation] = field(default_factory=list)
    limited: bool = False  # a guard limit stopped the work: `extracted.problem` says which, with its hint


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in item if isinstance(child, dict | list))
    return deepest


# ---- the guard process ---------------------------------------------------------------------------------------


_SHAPE_HINT = ". Return a smaller, flatter result, or write the data to a file in /mnt/data and return its name."


def _too_deep(what: str, depth: int) -> str:
    return f"{what} is nested {depth} levels deep; the limit is {MAX_JSON_DEPTH}"


def _check_schema(schema: Any) -> None:
    from . import schema as schema_module

    depth = json_depth(schema)
    if depth > MAX_JSON_DEPTH:
        raise InvalidSchema(_too_deep("output_schema", depth))
    schema_module.check_schema(schema)


def _extract(how: str, args: tuple[Any, ...], schema: Any, max_violations: int) -> Checked:
    from . import extract as extract_module

    functions = {
        "text": extract_module.parse_json_text,
        "sources": extract_module.extract_from_sources,
        "block": extract_module.extract_last_block,
    }
    got: Extracted = functions[how](*args)
    if got.found:
        depth = json_depth(got.value)
        if depth > MAX_JSON_DEPTH:
            problem = _too_deep("the JSON result", depth) + " (no MCP client could parse it)"
            return Checked(Extracted(problem=problem + _SHAPE_HINT), limited=True)
        if got.raw is not None and len(got.raw) > MAX_JSON_CHARS:
            problem = f"the JSON result is {len(got.raw)} characters; the limit is {MAX_JSON_CHARS}"
            return Checked(Extracted(problem=problem + _SHAPE_HINT), limited=True)
    if not got.found or schema is None:
        return Checked(got)
    from . import schema as schema_module

    return Checked(got, schema_module.validate(got.value, schema, max_violations=max_violations))


def _serve(stdin: Any, stdout: Any) -> None:
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return  # the server closed the pipe (or exited): nothing left to do
        (size,) = _HEADER.unpack(header)
        op, args = pickle.loads(stdin.read(size))
        try:
            if op == "check_schema":
                _check_schema(*args)
                reply: tuple[str, Any] = ("ok", None)
            else:
                checked = _extract(*args)
                # Plain parts: run with -m, this module is __main__ here and its classes would not unpickle.
                reply = ("ok", (checked.extracted, checked.violations, checked.limited))
        except InvalidSchema as exc:
            reply = ("invalid_schema", exc.message)
        except RecursionError:
            reply = ("limit", "the input is nested too deeply to process")
        except MemoryError:
            reply = ("limit", "processing the input needed more memory than the guard allows")
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(_HEADER.pack(len(data)) + data)
        stdout.flush()


def main() -> None:
    import resource

    os.nice(10)  # the server's event loop and the sandboxes come first on a busy machine
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT_BYTES, _MEMORY_LIMIT_BYTES))
    sys.setrecursionlimit(4000)  # deep but bounded values: MAX_JSON_DEPTH keeps the real depth far below
    from . import schema  # noqa: F401  (imported once, before the first request is timed)

    _serve(sys.stdin.buffer, sys.stdout.buffer)


# ---- the server side -----------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process

    @classmethod
    async def spawn(cls) -> _Worker:
        process = await anyio.open_process(
            [sys.executable, "-m", "code_interpreter_mcp.structured.guard"], stderr=None, start_new_session=True
        )
        return cls(process)

    async def call(self, op: str, args: tuple[Any, ...]) -> tuple[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        data = pickle.dumps((op, args), protocol=pickle.HIGHEST_PROTOCOL)
        await self.process.stdin.send(_HEADER.pack(len(data)) + data)
        header = await self._read(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        reply: tuple[str, Any] = pickle.loads(await self._read(size))
        return reply

    async def _read(self, size: int) -> bytes:
        assert self.process.stdout is not None
        parts: list[bytes] = []
        left = size
        while left:
            chunk = await self.process.stdout.receive(min(left, 1 << 20))
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


class Guard:
    """The pool of guard processes. Started lazily on the first call; `aclose` stops them."""

    def __init__(self, time_limit_s: float = DEFAULT_TIME_LIMIT_S, size: int = _POOL_SIZE) -> None:
        self.time_limit_s = time_limit_s
        self._idle: list[_Worker] = []
        self._slots = anyio.Semaphore(size)

    async def warm(self) -> None:
        """Start one guard process ahead of the first schema, so no call pays for its start-up."""
        async with self._slots:
            if not self._idle:
                self._idle.append(await _Worker.spawn())

    async def check_schema(self, schema: Any) -> None:
        """Raise InvalidSchema unless `schema` is valid (see `schema.check_schema`), within the guard's limits."""
        _check_size("output_schema", schema)
        try:
            await self._call("check_schema", (schema,))
        except GuardLimit as exc:
            raise InvalidSchema(f"output_schema could not be checked: {exc}") from None

    async def extract(
        self, how: str, args: Sequence[Any], schema: Any = None, max_violations: int | None = None
    ) -> Checked:
        """Extraction `how` ("text": `parse_json_text`, "sources": `extract_from_sources`, "block":
        `extract_last_block`) over `args`, then validation against `schema` when given and a value was found.
        A limit hit comes back as an extraction problem naming the limit."""
        from .report import MAX_VIOLATIONS

        limit = MAX_VIOLATIONS if max_violations is None else max_violations
        try:
            extracted, violations, limited = await self._call("extract", (how, tuple(args), schema, limit))
        except GuardLimit as exc:
            problem = (
                f"checking the JSON result against output_schema was stopped: {exc}. Simplify the schema (no "
                "chains of allOf/anyOf that repeat the same subschema, no backtracking patterns) and run again."
            )
            return Checked(Extracted(problem=problem), limited=True)
        return Checked(extracted, violations, limited)

    async def _call(self, op: str, args: tuple[Any, ...]) -> Any:
        async with self._slots:
            worker = self._idle.pop() if self._idle else await _Worker.spawn()
            kept = False
            try:
                with anyio.fail_after(self.time_limit_s):
                    kind, value = await worker.call(op, args)
                kept = True
            except TimeoutError:
                await self._replace(worker)
                raise GuardLimit(f"it took longer than {self.time_limit_s:g} s and was stopped") from None
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError, pickle.UnpicklingError):
                await self._replace(worker)
                raise GuardLimit("the guard process died (most likely it ran out of memory)") from None
            finally:
                if kept:
                    self._idle.append(worker)
                else:
                    worker.kill()  # its state is unknown (a cancelled call): a fresh process takes the next one
        if kind == "invalid_schema":
            raise InvalidSchema(value)
        if kind == "limit":
            raise GuardLimit(value)
        return value

    async def _replace(self, worker: _Worker) -> None:
        """Kill a worker whose state is unknown and start its successor now: the call that hit the limit pays
        for the start, not the next caller."""
        worker.kill()
        with anyio.CancelScope(shield=True):
            self._idle.append(await _Worker.spawn())

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for worker in idle:
            with anyio.CancelScope(shield=True):
                if worker.process.stdin is not None:
                    await worker.process.stdin.aclose()
                with anyio.move_on_after(2):
                    await worker.process.wait()
                worker.kill()


def _check_size(what: str, value: Any) -> None:
    """Refuse a schema too big or too deep to send to a guard process, counting at most MAX_SCHEMA_NODES nodes:
    a caller in the same process can hand over a structure of shared references that is huge as JSON."""
    nodes = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise InvalidSchema(f"{what} has more than {MAX_SCHEMA_NODES} keywords and values; simplify it")
        if depth > MAX_JSON_DEPTH:
            raise InvalidSchema(_too_deep(what, depth) + " or more")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


if __name__ == "__main__":
    main()
