"""Live output of a run: what the code printed so far, kept within a cap, and its newest lines for progress
messages.

It owns the buffering only: the backend feeds it (synchronously, from `ExecRequest.on_output`), the run registry
reads it for 'running' results and progress. It knows nothing of backends, registries or MCP.
"""

from __future__ import annotations

from collections import deque

RECENT_LINES = 5
MESSAGE_CHARS = 600


class _Kept:
    """A stream's text within `cap` characters: the head and the newest tail, the middle dropped."""

    def __init__(self, cap: int) -> None:
        self.head_cap = cap // 3
        self.tail_cap = cap - self.head_cap
        self.head = ""
        self.tail = ""
        self.dropped = 0

    def add(self, text: str) -> None:
        if len(self.head) < self.head_cap:
            room = self.head_cap - len(self.head)
            self.head += text[:room]
            text = text[room:]
        self.tail += text
        if len(self.tail) > self.tail_cap * 2:  # trim in batches: appends stay cheap
            cut = len(self.tail) - self.tail_cap
            self.dropped += cut
            self.tail = self.tail[cut:]

    def text(self) -> tuple[str, bool]:
        tail, dropped = self.tail, self.dropped
        if len(tail) > self.tail_cap:
            dropped += len(tail) - self.tail_cap
            tail = tail[-self.tail_cap :]
        if dropped:
            return f"{self.head}\n…[{dropped} characters truncated]…\n{tail}", True
        return self.head + tail, False


class LiveOutput:
    def __init__(self, cap: int) -> None:
        self._streams = {"stdout": _Kept(cap), "stderr": _Kept(cap)}
        self._partial = {"stdout": "", "stderr": ""}
        self._recent: deque[str] = deque(maxlen=RECENT_LINES)
        self.version = 0  # changes whenever something was printed

    def feed(self, stream: str, text: str) -> None:
        kept = self._streams.get(stream)
        if kept is None or not text:
            return
        kept.add(text)
        self.version += 1
        lines = (self._partial[stream] + text).split("\n")
        self._partial[stream] = lines.pop()[-MESSAGE_CHARS:]
        prefix = "" if stream == "stdout" else "stderr: "
        self._recent.extend(prefix + line for line in lines[-RECENT_LINES:] if line.strip())

    def text(self, stream: str) -> tuple[str, bool]:
        return self._streams[stream].text()

    def newest(self) -> str:
        """The newest few lines (a line still being written included), for a progress message."""
        lines = list(self._recent)
        for stream, partial in self._partial.items():
            if partial.strip():
                lines.append(partial if stream == "stdout" else f"stderr: {partial}")
        return "\n".join(lines[-RECENT_LINES:])[-MESSAGE_CHARS:]
