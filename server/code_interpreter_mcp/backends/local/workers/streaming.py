"""Live output of a local run: what the worker's capture files gained since the last look, passed to
`ExecRequest.on_output` while the code runs.

The worker's stdout and stderr go to capture files on the host (truncated before and after each run); the
backend's wait loop calls `CaptureTail.poll` every few hundred milliseconds. It owns the offsets and the UTF-8
decoding across reads, nothing else: it knows nothing of the worker protocol or the engine.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable

MAX_READ = 64 * 1024  # per stream and look: a flood of output is skipped ahead to its newest part


class CaptureTail:
    def __init__(self, fds: dict[str, int], on_output: Callable[[str, str], None] | None) -> None:
        self.fds = fds
        self.on_output = on_output
        self.offsets = dict.fromkeys(fds, 0)
        self.decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in fds}

    def poll(self) -> None:
        """Pass on what each capture file gained (blocking, but only a bounded pread of a local file)."""
        if self.on_output is None:
            return
        for name, fd in self.fds.items():
            try:
                size = os.fstat(fd).st_size
                if size < self.offsets[name]:  # truncated by the worker: a new run's output starts at 0
                    self.offsets[name] = 0
                start = max(self.offsets[name], size - MAX_READ)
                data = os.pread(fd, size - start, start) if size > start else b""
            except OSError:
                continue
            skipped = start - self.offsets[name]
            self.offsets[name] = start + len(data)
            text = self.decoders[name].decode(data)
            if skipped:
                text = f"…[{skipped} bytes skipped]…\n{text}"
            if text:
                self.on_output(name, text)
