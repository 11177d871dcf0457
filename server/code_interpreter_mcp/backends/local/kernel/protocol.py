"""The wire format between the server and a sandboxed worker: length-prefixed JSON frames with a size cap.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON encoding one object. The worker
imports this module inside the sandbox, so it must stay stdlib-only and free of package-relative imports.

Everything a worker sends is untrusted (user code shares its process and can write to the pipe), so the decoder
enforces a maximum frame size before buffering a frame and insists on a JSON object.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
# Host -> worker frames carry user code; the engine caps code far below this.
MAX_REQUEST_BYTES = 256 * 1024 * 1024
READ_CHUNK = 64 * 1024


class ProtocolError(Exception):
    """A frame that is too large, not JSON, or not an object: the peer is broken or hostile."""


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode(obj: dict[str, Any]) -> bytes:
    """One frame: header + compact UTF-8 JSON."""
    body = _ENCODER.encode(obj).encode("utf-8", "surrogatepass")
    return HEADER.pack(len(body)) + body


def _decode_body(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    # "replace": lone surrogates (possible in user-made strings) must not travel on into JSON-RPC results.
    try:
        obj = json.loads(bytes(body).decode("utf-8", "replace"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame is a JSON {type(obj).__name__}, expected an object")
    return obj


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, take whole frames out. Keeps partial frames across calls,
    so a reader may be cancelled between reads without losing data."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= HEADER_SIZE:
            (length,) = HEADER.unpack_from(self._buf, 0)
            if length > self.max_frame:
                raise ProtocolError(f"frame of {length} bytes exceeds the cap of {self.max_frame} bytes")

    def next(self) -> dict[str, Any] | None:
        """The next complete frame, or None when more bytes are needed."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        (length,) = HEADER.unpack_from(buf, 0)
        if length > self.max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds the cap of {self.max_frame} bytes")
        end = HEADER_SIZE + length
        if len(buf) < end:
            return None
        body = memoryview(buf)[HEADER_SIZE:end]
        try:
            obj = _decode_body(body)
        finally:
            body.release()
        del buf[:end]
        # A following frame's header may already be here: check its size now rather than after buffering it.
        if len(buf) >= HEADER_SIZE and HEADER.unpack_from(buf, 0)[0] > self.max_frame:
            raise ProtocolError("frame exceeds the cap")
        return obj

    @property
    def pending(self) -> int:
        return len(self._buf)


def write_all(fd: int, data: bytes) -> None:
    """Blocking write of a whole buffer (worker side; the host uses non-blocking writes)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_frame(fd: int, decoder: FrameDecoder) -> dict[str, Any] | None:
    """Blocking read of one frame from `fd` (worker side). None at end of file."""
    while True:
        frame = decoder.next()
        if frame is not None:
            return frame
        data = os.read(fd, READ_CHUNK)
        if not data:
            return None
        decoder.feed(data)


# Output clipping, shared by the worker (normal runs) and the host (output of a worker that died mid-run).

_BYTES_PER_CHAR = 4  # UTF-8 worst case, when sizing reads for a character budget


def split_budget(cap: int, out_size: int, err_size: int) -> tuple[int, int]:
    """Share a character cap between stdout and stderr: each gets half, and what one leaves the other may use.
    Sizes are in bytes, a fair proxy for characters when deciding the split."""
    if out_size + err_size <= cap:
        return cap, cap
    half = cap // 2
    if err_size < half:
        return cap - err_size, max(err_size, 1)
    if out_size < half:
        return max(out_size, 1), cap - out_size
    return half, cap - half


TRUNCATED_MARK = "\n[... output truncated:"  # where a clipped capture's head ends


def clip_capture(fd: int, budget: int, size: int | None = None) -> tuple[str, bool, int]:
    """The head and tail of a capture file within `budget` characters: (text, truncated, size in bytes)."""
    if size is None:
        size = os.fstat(fd).st_size
    if size == 0:
        return "", False, 0
    if size <= budget * _BYTES_PER_CHAR:
        text = os.pread(fd, size, 0).decode("utf-8", "replace")
        if len(text) <= budget:
            return text, False, size
        head_src = tail_src = text
        what = f"{len(text)} characters"
    else:
        half = budget * _BYTES_PER_CHAR // 2
        head_src = os.pread(fd, half, 0).decode("utf-8", "replace")
        tail_src = os.pread(fd, half, size - half).decode("utf-8", "replace")
        what = f"{size} bytes"
    marker = f"{TRUNCATED_MARK} {what} in all ...]\n"
    room = max(budget - len(marker), 0)
    head_n = room * 2 // 5
    tail_n = room - head_n
    return head_src[:head_n] + marker + (tail_src[-tail_n:] if tail_n else ""), True, size


AT_BYTES = 4 * 1024 * 1024  # an output placed past this much stdout goes after it


def chars_at(fd: int, places: list[int]) -> dict[int, int]:
    """Characters of the capture's UTF-8 before each byte offset (sorted), in one pass over the bytes read once."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    out: dict[int, int] = {}
    done = chars = 0
    for at in places:
        chars += len(decoder.decode(os.pread(fd, at - done, done)))
        done = at
        out[at] = chars
    return out
