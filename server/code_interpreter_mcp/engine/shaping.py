"""A run's result shaped to the result budget: stdout, stderr and the model's text share the room left by the
fixed parts (clipped head and tail), `sandbox:` links become resource URIs, the lost-state warning, and the
images small enough to inline.

Per-tool budgets and paging of long outputs belong here. This module knows the registry's records and the result
models; it knows nothing of backends' protocols, containers' lifecycle or MCP content types.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import anyio

from ..artifacts import INLINE_IMAGE_TYPES, file_uri, normalize_container_path, record_to_info
from ..backends.base import ExecOutcome
from ..config import Settings
from ..errors import CIError
from ..models import ErrorInfo, RunResult
from ..sessions import ContainerRecord, FileRecord, Session
from .containers import container_info
from .json_result import ResolvedJson, token_usage

_SANDBOX_LINK = re.compile(r"sandbox:(/mnt/data/[^\s)\]\"'>]+)")


@dataclass
class InlineImage:
    data: bytes
    mime_type: str


@dataclass
class RunOutput:
    result: RunResult
    images: list[InlineImage] = field(default_factory=list)


def clip(text: str, limit: int) -> tuple[str, bool]:
    """Keep the head and the tail (the end of a traceback or a log matters most)."""
    if len(text) <= limit:
        return text, False
    head = limit * 2 // 5
    tail = limit - head - 60
    cut = len(text) - head - tail
    return f"{text[:head]}\n…[{cut} characters truncated]…\n{text[-tail:]}", True


def rewrite_links(text: str, session: Session, records: list[FileRecord]) -> str:
    """`sandbox:/mnt/data/...` links in a model's text become the files' resource URIs (this run's files first)."""
    by_path = {r.path: r for r in session.latest_files()}
    by_path.update({r.path: r for r in records})

    def sub(m: re.Match[str]) -> str:
        try:
            rel = normalize_container_path(m.group(1))
        except CIError:
            return m.group(0)
        rec = by_path.get(rel)
        return file_uri(session.id, rec.file_id, rec.name) if rec else m.group(0)

    return _SANDBOX_LINK.sub(sub, text)


def _share(parts: dict[str, str], room: int) -> dict[str, int]:
    """How many characters each part may keep: small parts keep everything, large ones split the rest."""
    sizes = {k: len(v) for k, v in parts.items()}
    share = dict.fromkeys(parts, 0)
    remaining, pending = room, sorted(parts, key=lambda k: sizes[k])
    while pending:
        k = pending.pop(0)
        share[k] = min(sizes[k], remaining // (len(pending) + 1))
        remaining -= share[k]
    return share


class Shaper:
    def __init__(self, settings: Settings, backend_name: str, model: bool) -> None:
        self.settings = settings
        self.backend_name = backend_name
        self.model = model

    def run_result(
        self,
        session: Session,
        rec: ContainerRecord,
        outcome: ExecOutcome,
        records: list[FileRecord],
        state_lost: bool,
        warnings: list[str],
        resolved: ResolvedJson,
        started: float,
    ) -> RunResult:
        budget = self.settings.result_budget_tokens * 4  # characters, roughly 4 per token
        fixed = len(json.dumps(resolved.value, default=str)) if resolved.value is not None else 0
        fixed += sum(300 + len(r.path) for r in records) + 2000
        if outcome.error is not None:
            fixed += len(outcome.error.message) + len(outcome.error.traceback or "")
        room = max(4000, min(budget - fixed, self.settings.output_cap_chars * 2))
        text = rewrite_links(outcome.text, session, records) if outcome.text else None
        parts = {"stdout": outcome.stdout, "stderr": outcome.stderr, "text": text or ""}
        truncated = outcome.truncated
        if sum(len(v) for v in parts.values()) > room:
            for k, limit in _share(parts, room).items():
                parts[k], cut = clip(parts[k], max(limit, 200))
                truncated = truncated or cut
        err = None
        if outcome.error is not None:
            tb = outcome.error.traceback
            if tb is not None:
                tb, cut = clip(tb, 8000)
                truncated = truncated or cut
            err = ErrorInfo(type=outcome.error.type, message=clip(outcome.error.message, 4000)[0], traceback=tb)
        if state_lost:
            warnings = [
                "The previous container was lost (expired or restarted): variables and imports are gone; "
                "input files were uploaded again and earlier files stay downloadable.",
                *warnings,
            ]
        result_repr = outcome.result_repr
        if result_repr is not None:
            result_repr, cut = clip(result_repr, 4000)
            truncated = truncated or cut
        return RunResult(
            session_id=session.id,
            container_id=rec.state.id,
            backend=self.backend_name,
            status=outcome.status,
            stdout=parts["stdout"],
            stderr=parts["stderr"],
            result=result_repr,
            error=err,
            json=resolved.value,
            json_error=resolved.error,
            files=[record_to_info(r) for r in records],
            container=container_info(rec, state_lost),
            truncated=truncated,
            warnings=warnings,
            text=parts["text"] if text is not None else None,
            structured=resolved.info,
            usage=token_usage(resolved.usage, self.model),
            model_calls=resolved.calls,
            duration_ms=round((time.monotonic() - started) * 1000, 2),
        )

    async def inline_images(self, records: list[FileRecord]) -> list[InlineImage]:
        images: list[InlineImage] = []
        for r in records:
            if len(images) >= self.settings.max_inline_images:
                break
            if r.mime_type in INLINE_IMAGE_TYPES and r.local_path and r.bytes <= self.settings.inline_image_max_bytes:
                data = await anyio.Path(r.local_path).read_bytes()
                images.append(InlineImage(data=data, mime_type=r.mime_type))
        return images
