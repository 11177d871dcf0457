"""A message over the size limit still gets its answer: its id, found while the message streams past, and the
-32600 that says which limit it hit and how to send a large file instead.

Both transports (`stdio`, `http_screen`) read an over-limit message through without keeping it; this module owns
what they learn on the way and what they answer. `IdScanner` follows only the top level of the JSON object, in
chunks, with constant memory: the `"id"` member's value (a string or an integer, as JSON-RPC allows) and whether
the message is a notification or a response. The whole message is scanned, not just its head, because clients put
the id anywhere: the Python SDK writes it before `params`, the TypeScript SDK (`{...request, jsonrpc, id}`) after
them, behind the very payload that made the message too large. Inside a string (where a base64 upload spends
all its bytes) a chunk is skipped with `bytes.find`; outside strings each structural byte is one step, so the
steps are capped (`MAX_STEPS`) and a pathological message (megabytes of `[[[[`) is answered with id null
instead of costing minutes. Knows nothing of streams, HTTP or tools.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from mcp_types import INVALID_REQUEST, JSONRPCError

from ..config import Settings
from .jsonrpc import error_reply

MIB = 1024 * 1024
# Steps (structural bytes, escapes) before the scan gives up: about 2 s of Python at most. A base64 upload takes
# a dozen, an array of 600,000 short strings about two million.
MAX_STEPS = 2_000_000
_TOP = re.compile(rb'["{}\[\],:]')  # at depth 1 members are told apart by their commas and colons
_NESTED = re.compile(rb'["{}\[\]]')  # deeper, only strings and the depth matter
_KEY_CAP = 32  # longer keys are not among the few we look for
_VALUE_CAP = 512  # a usable id is short; a longer value is not one (an object, a huge number)
_WANTED = frozenset({"id", "method", "result", "error"})


@dataclass
class Scan:
    """What the top level of a message said. `complete`: its object closed, so what is absent is absent."""

    complete: bool = False
    request_id: str | int | None = None
    has_id: bool = False
    has_method: bool = False
    has_outcome: bool = False  # a "result" or "error" member: a response

    @property
    def answered(self) -> bool:
        """False for a response and for a notification, which JSON-RPC never answers. When the scan could not
        tell (it gave up, the JSON broke off), the message is answered: with id null unless its id was found."""
        if self.has_outcome and not self.has_method:
            return False
        return not (self.complete and self.has_method and not self.has_id)

    @property
    def kind(self) -> str:
        """What a message that is not answered was, for the log."""
        return "a response" if self.has_outcome and not self.has_method else "a notification"


class IdScanner:
    """Feed it a message's bytes in order, any chunking; `scan` says what its top level held."""

    def __init__(self) -> None:
        self.scan = Scan()
        self._depth = 0
        self._started = False
        self._dead = False  # not an object, broken, or over MAX_STEPS: nothing more to learn
        self._steps = 0
        self._in_string = False
        self._escaped = False  # the chunk ended on a backslash inside a string
        self._expect_key = False  # at depth 1, the next string is a member name
        self._key: bytearray | None = None  # the member name being read
        self._member = ""  # the depth-1 member whose value comes next
        self._value: bytearray | None = None  # the raw text of the "id" value being read

    def feed(self, chunk: bytes) -> None:
        i, n = 0, len(chunk)
        while i < n and not self._dead and not self.scan.complete:
            if self._in_string:
                i = self._string(chunk, i)
                continue
            if not self._started:
                i = self._start(chunk, i)
                continue
            found = (_TOP if self._depth == 1 else _NESTED).search(chunk, i)
            j = found.start() if found else n
            self._keep(chunk, i, j)
            if found is None:
                return
            self._steps += 1
            if self._steps > MAX_STEPS:
                self._dead = True
                return
            self._structural(chunk[j : j + 1])
            i = j + 1

    def _start(self, chunk: bytes, i: int) -> int:
        rest = chunk[i:].lstrip()
        if not rest:
            return len(chunk)
        self._started = True
        if rest[:1] != b"{":
            self._dead = True  # a batch, a scalar or not JSON: nothing to answer but id null
            return len(chunk)
        self._depth, self._expect_key = 1, True
        return len(chunk) - len(rest) + 1

    def _string(self, chunk: bytes, i: int) -> int:
        """Skip string bytes up to the closing quote, keeping them when they are a name or the id."""
        n = len(chunk)
        if self._escaped:
            self._escaped = False
            self._keep(chunk, i, i + 1)
            i += 1
        quote = chunk.find(b'"', i)
        while True:
            # An escape before the quote hides the byte after it (\" is not the end); the quote found stays
            # valid past each escape, so a long string of escapes is not searched again to its end each time.
            slash = chunk.find(b"\\", i, quote if quote != -1 else n)
            if slash == -1:
                break
            self._steps += 1
            if self._steps > MAX_STEPS:
                self._dead = True
                return n
            self._keep(chunk, i, slash + 2)
            i = slash + 2
            if i > n:
                self._escaped = True
                return n
            if quote != -1 and quote < i:
                quote = chunk.find(b'"', i)
        if quote == -1:
            self._keep(chunk, i, n)
            return n
        self._keep(chunk, i, quote + 1)
        self._in_string = False
        if self._key is not None:
            raw, self._key = bytes(self._key), None
            self._member = _name(raw[:-1]) if len(raw) <= _KEY_CAP else ""
        return quote + 1

    def _keep(self, chunk: bytes, start: int, end: int) -> None:
        """Hold the bytes of a member name or of the id's value, each only up to its cap (plus one: over it)."""
        for held, cap in ((self._key, _KEY_CAP), (self._value, _VALUE_CAP)):
            room = cap + 1 - len(held) if held is not None else 0
            if held is not None and room > 0:
                held += chunk[start : min(end, start + room)]

    def _structural(self, char: bytes) -> None:
        if char == b'"':
            self._in_string = True
            if self._depth == 1 and self._expect_key:
                self._key, self._expect_key = bytearray(), False
            elif self._value is not None:
                self._value += char
            return
        if self._depth == 1 and char == b":":
            self._note(self._member)
            if self._member == "id":
                self._value = bytearray()
            return
        if self._depth == 1 and char in (b",", b"}"):
            self._end_value()
            self._expect_key = True
            if char == b"}":
                self._depth = 0
                self.scan.complete = True
            return
        if self._value is not None:
            self._value += char
        self._depth += 1 if char in (b"{", b"[") else -1 if char in (b"}", b"]") else 0
        if self._depth < 1:
            self._dead = True  # a "]" closed the object: not JSON

    def _note(self, member: str) -> None:
        if member == "id":
            self.scan.has_id = True
        elif member == "method":
            self.scan.has_method = True
        elif member in ("result", "error"):
            self.scan.has_outcome = True

    def _end_value(self) -> None:
        if self._value is None:
            return
        raw, self._value = bytes(self._value), None
        self.scan.request_id = None  # a repeated "id": the last one counts, as json.loads does
        if len(raw) > _VALUE_CAP:
            return
        try:
            value = json.loads(raw)
        except ValueError:
            return
        if isinstance(value, str | int) and not isinstance(value, bool):
            self.scan.request_id = value


def _name(raw: bytes) -> str:
    if len(raw) > _KEY_CAP:
        return ""
    if b"\\" not in raw:
        return raw.decode("utf-8", "replace")
    try:
        decoded = json.loads(b'"' + raw + b'"')  # "\u0069d" is "id" too
    except ValueError:
        return ""
    return decoded if isinstance(decoded, str) and decoded in _WANTED else ""


@dataclass(frozen=True)
class MessageLimit:
    """The largest message one transport takes, and what its refusal tells the caller to do instead."""

    max_bytes: int
    instead: str

    def refusal(self, scan: Scan, size: int, read_all: bool = True) -> JSONRPCError:
        """The -32600 for a message of `size` bytes (`read_all` False: at least that many; the rest unread)."""
        seen = f"{size:,} bytes" if read_all else f"at least {size:,} bytes"
        message = (
            f"Invalid Request: this message is {seen}, over the limit of {_amount(self.max_bytes)} on one "
            f"message (the server's setting CODE_INTERPRETER_MAX_MESSAGE_MB raises it); it was not processed. "
            f"{self.instead}"
        )
        return error_reply(INVALID_REQUEST, message, scan.request_id)


def _amount(n: int) -> str:
    return f"{n / MIB:g} MiB ({n:,} bytes)"


def message_limit(settings: Settings, transport: Literal["stdio", "http"]) -> MessageLimit:
    """The limit of `transport` under these settings, with the way to send a large file that works there."""
    file_cap = _amount(settings.max_file_bytes)
    if settings.host_paths_allowed:
        instead = (
            f'To send a large file, pass its path: upload_file(path="/absolute/path/on/the/server/host") makes the '
            f"server read the file itself (up to {file_cap}, MAX_FILE_BYTES), and run_code(files=[...]) takes host "
            f"paths too; content_base64 is for small files."
        )
    else:
        instead = (
            "upload_file(content_base64=...) takes files whose base64 fits in the limit; for a larger file ask the "
            "operator to raise it, or to allow host paths (CODE_INTERPRETER_ALLOW_HOST_PATHS) so that "
            'upload_file(path="...") reads the file on the server\'s host.'
        )
    return MessageLimit(settings.max_message_bytes(transport), instead)
