"""A run's result shaped to the result budget: the files listed in full (images and the files the code named
first, up to `MAX_RESULT_FILES`, the rest counted), stdout, stderr and the model's text sharing the room the fixed
parts leave (clipped head and tail), warnings capped, `sandbox:` links made resource URIs, failure texts that say
what happened (a timeout without the interrupt's own frames, a missing JSON because the run failed, a missing
module), and the images to inline within their own caps (count, total bytes), larger ones as downscaled previews.

The budget's arithmetic is `budget`'s. This module knows the registry's records and the result models; it knows
nothing of backends' protocols, containers' lifecycle or MCP content types.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from ..artifacts import INLINE_IMAGE_TYPES, file_uri, image_preview, normalize_container_path, record_to_info
from ..backends.base import ExecOutcome
from ..config import Settings
from ..errors import CIError
from ..models import ErrorInfo, FileInfo, JsonError, MoreFiles, PackagesInfo, RunResult, dump
from ..sessions import ContainerRecord, FileRecord, Session
from .budget import cap_list, clip, json_chars, share, structured_room
from .containers import container_info
from .json_result import ResolvedJson, token_usage
from .outputs import run_outputs

_SANDBOX_LINK = re.compile(r"sandbox:(/mnt/data/[^\s)\]\"'>]+)")
_MISSING_MODULE = re.compile(r"No module named '([^'.]+)")
MAX_WARNINGS = 10
OUTPUT_CUT = (
    "Output was cut to fit the result (its head and end are kept). For all of it, write it to a file in "
    "/mnt/data and read that with download_file(file, offset=...), which pages."
)


@dataclass
class InlineImage:
    data: bytes
    mime_type: str
    file_id: str = ""
    preview: bool = False  # a downscaled copy: the full file is only linked


@dataclass
class RunOutput:
    result: RunResult
    images: list[InlineImage] = field(default_factory=list)


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


def order_files(records: list[FileRecord], code: str) -> list[FileRecord]:
    """Images first, then the files the code names (by path or name), then the rest in path order."""

    def rank(r: FileRecord) -> tuple[int, str]:
        if r.mime_type in INLINE_IMAGE_TYPES:
            return 0, r.path
        return (1 if r.path in code or r.name in code else 2), r.path

    return sorted(records, key=rank)


def list_files_within(infos: list[FileInfo], limit: int, room: int) -> list[FileInfo]:
    """The first infos, at most `limit`, whose JSON fits in `room` characters."""
    out: list[FileInfo] = []
    used = 0
    for info in infos[:limit]:
        used += json_chars(dump(info)) + 1
        if used > room:
            break
        out.append(info)
    return out


def timeout_error(err: ErrorInfo) -> ErrorInfo:
    """A timeout leads with what happened; the frames of the interruption itself (after the user's last frame)
    and its bare `KeyboardInterrupt` go."""
    tb = err.traceback
    if tb:
        lines = tb.rstrip("\n").split("\n")
        last_user = max((i for i, line in enumerate(lines) if line.lstrip().startswith('File "<')), default=-1)
        if last_user >= 0:
            keep = lines[: last_user + 2] if last_user + 1 < len(lines) else lines[: last_user + 1]
            tb = "\n".join([*keep, f"{err.type}: {err.message}"]) + "\n"
        elif lines and lines[-1].strip() == "KeyboardInterrupt":
            tb = "\n".join([*lines[:-1], f"{err.type}: {err.message}"]) + "\n"
    return ErrorInfo(type=err.type, message=err.message, traceback=tb)


def failure_hints(outcome: ExecOutcome) -> list[str]:
    """Hints that the error alone does not give."""
    err = outcome.error
    if err is None or err.type != "ModuleNotFoundError":
        return []
    m = _MISSING_MODULE.search(err.message)
    name = m.group(1) if m else "it"
    return [
        f"The sandbox has no module {name!r}: it imports what the server's own Python environment has. Install "
        f"{name} next to the server (e.g. `pip install {name}` in its environment; the `analysis` extra brings "
        f"numpy, pandas, matplotlib and openpyxl) and restart it, or ask for it with run_code(packages=[{name!r}]) "
        "where the server's package policy allows installs (a project may be named otherwise than its module: "
        "sklearn is scikit-learn)."
    ]


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
        code: str = "",
        packages: PackagesInfo | None = None,
        execution_count: int | None = None,
    ) -> RunResult:
        room = structured_room(self.settings)
        truncated = outcome.truncated
        ordered = order_files(records, code)
        infos = list_files_within(
            [record_to_info(r) for r in ordered[: self.settings.max_result_files]],
            self.settings.max_result_files,
            room // 2,
        )
        more = None
        if len(infos) < len(ordered):
            rest = ordered[len(infos) :]
            more = MoreFiles(
                count=len(rest),
                bytes=sum(r.bytes for r in rest),
                hint=f"{len(rest)} more files are not listed here: list_container_files(limit=..., cursor=..., "
                "pattern='*.csv') pages through all of them.",
            )
        err = None
        if outcome.error is not None:
            tb, cut = clip(outcome.error.traceback, 8000) if outcome.error.traceback is not None else (None, False)
            truncated = truncated or cut
            err = ErrorInfo(type=outcome.error.type, message=clip(outcome.error.message, 4000)[0], traceback=tb)
            if outcome.status == "timeout":
                err = timeout_error(err)
        if state_lost:
            warnings = [
                "The previous container was lost (expired or restarted): variables and imports are gone; "
                "input files were uploaded again and earlier files stay downloadable.",
                *warnings,
            ]
        warnings = cap_list([*warnings, *failure_hints(outcome)], MAX_WARNINGS, "warnings")
        value, json_error = resolved.value, resolved.error
        if value is None and json_error is not None and outcome.status != "ok" and not json_error.violations:
            json_error = JsonError(
                message=f"No JSON result: the run did not finish ({outcome.status}"
                + (f", {err.type}" if err else "")
                + "), so it produced none. Fix the error and run again."
            )
        if value is not None and json_chars(value) > room // 2:
            json_error = JsonError(
                message=f"The JSON result is {json_chars(value)} characters, more than the result budget allows "
                "(RESULT_BUDGET_TOKENS). Return a smaller result, or write it to a file in /mnt/data and "
                "download_file it in parts."
            )
            value, truncated = None, True
        result_repr = outcome.result_repr
        if result_repr is not None:
            result_repr, cut = clip(result_repr, 4000)
            truncated = truncated or cut
        text = rewrite_links(outcome.text, session, records) if outcome.text else None
        result = RunResult(
            session_id=session.id,
            container_id=rec.state.id,
            backend=self.backend_name,
            status=outcome.status,
            result=result_repr,
            error=err,
            json=value,
            json_error=json_error,
            files=infos,
            outputs=run_outputs(outcome.outputs, records, room // 4),
            more_files=more,
            packages=packages,
            execution_count=execution_count,
            container=container_info(rec, state_lost, outcome.state_restored),
            truncated=truncated,
            warnings=warnings,
            text="" if text is not None else None,
            structured=resolved.info,
            usage=token_usage(resolved.usage, self.model),
            model_calls=resolved.calls,
            duration_ms=round((time.monotonic() - started) * 1000, 2),
        )
        return self._fill_streams(result, {"stdout": outcome.stdout, "stderr": outcome.stderr, "text": text or ""})

    def _fill_streams(self, result: RunResult, parts: dict[str, str]) -> RunResult:
        """stdout, stderr and text share what the rest of the result leaves of the room: each within the output
        cap, measured as JSON (escapes count), shrunk until the whole result fits."""
        room = structured_room(self.settings)
        base = json_chars(dump(result))
        # Swapping a string field changes the JSON by the difference of the two strings' encodings: the shaped
        # result's size follows without dumping it again (a warm run's result is measured once).
        fields = {"stdout": result.stdout, "stderr": result.stderr, "text": result.text}
        before = sum(json_chars(v) for v in fields.values())
        sizes = {k: json_chars(v) for k, v in parts.items()}
        avail = min(room - base, self.settings.output_cap_chars * 2)
        if result.truncated or sum(sizes.values()) > avail:
            result.warnings.append(OUTPUT_CUT)
            avail -= len(OUTPUT_CUT) + 4
        for _ in range(4):
            streams, cut = dict(parts), False
            if sum(sizes.values()) > avail:
                for k, limit in share(streams, max(0, avail)).items():
                    streams[k], clipped = clip(streams[k], max(limit, 200))
                    cut = cut or clipped
            shaped = result.model_copy(
                update={
                    "stdout": streams["stdout"],
                    "stderr": streams["stderr"],
                    "text": streams["text"] if result.text is not None else None,
                    "truncated": result.truncated or cut,
                }
            )
            after = sum(json_chars(v) for v in (shaped.stdout, shaped.stderr, shaped.text))
            over = base - before + after - room
            if over <= 0:
                return shaped
            avail -= over + 200  # escapes made the streams longer as JSON than as text: try again smaller
        return shaped

    async def inline_images(self, result: RunResult, records: list[FileRecord]) -> list[InlineImage]:
        """The listed images to show inline: at most `max_inline_images`, within `inline_images_total_bytes`;
        one over `inline_image_max_bytes` as a downscaled preview within that cap."""
        settings = self.settings
        by_id = {r.file_id: r for r in records}
        images: list[InlineImage] = []
        left = settings.inline_images_total_bytes
        for info in result.files:
            r = by_id.get(info.file_id)
            if len(images) >= settings.max_inline_images or left <= 0:
                break
            if r is None or r.mime_type not in INLINE_IMAGE_TYPES or not r.local_path:
                continue
            image = await load_image(r, min(settings.inline_image_max_bytes, left))
            if image is not None:
                images.append(image)
                left -= len(image.data)
        return images


async def load_image(r: FileRecord, cap: int) -> InlineImage | None:
    """The image's bytes when within `cap`, else a downscaled preview within it, else None."""
    if not r.local_path or cap <= 0:
        return None
    if r.bytes <= cap:
        return InlineImage(data=await anyio.Path(r.local_path).read_bytes(), mime_type=r.mime_type, file_id=r.file_id)
    made = await anyio.to_thread.run_sync(image_preview, Path(r.local_path), cap)
    if made is None:
        return None
    return InlineImage(data=made[0], mime_type=made[1], file_id=r.file_id, preview=True)
