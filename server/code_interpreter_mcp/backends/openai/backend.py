"""OpenAIBackend: the Backend protocol over OpenAI's hosted Code Interpreter (Responses API + Containers API).

One run is ONE streamed Responses call bound to an explicit container. Nothing else happens before the run (the
engine keeps the previous file listing) and nothing sequential after it: the outcome carries the cited files at
once, so the engine can start their downloads while it lists files and refreshes the container.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import anyio
import httpx2
from openai import AsyncOpenAI

from ... import errors
from ...config import Settings
from ..base import (
    Capabilities,
    ContainerState,
    CopySink,
    ExecError,
    ExecOutcome,
    ExecRequest,
    FetchResult,
    Progress,
    RemoteFile,
    RepairOutcome,
    no_progress,
)
from . import containers, files, parsing, responses, shell_lines
from .client import api_key, build_client, endpoint, model_name
from .failures import Scrubber

log = logging.getLogger(__name__)

MODEL_OVERHEAD_S = 120.0  # time allowed on top of the code's timeout for the model's own turns


class OpenAIBackend:
    name = "openai"
    isolation = "remote"
    # repair_json makes a second structured pass; the stream says when the code_interpreter call completed
    capabilities = Capabilities(
        model=True,
        signals_code_done=True,
        streams_output=True,
        packages=False,  # the hosted container has no network for an installer
        preinstalled="OpenAI's hosted image, which already ships several hundred common packages (numpy, pandas, "
        "matplotlib, scipy, scikit-learn, seaborn, statsmodels, sympy, openpyxl, tabulate and more): import them "
        "directly",
    )

    def __init__(
        self,
        settings: Settings,
        *,
        http_client: httpx2.AsyncClient | None = None,
        retry_base_s: float = 0.5,
        retry_cap_s: float = 8.0,
        model_overhead_s: float = MODEL_OVERHEAD_S,
    ) -> None:
        """`http_client` routes the SDK through a caller's client (tests: the emulator); retry_* tune download
        backoff; a run may take its timeout_s plus model_overhead_s before it counts as timed out."""
        self.settings = settings
        self._http_client = http_client
        self._client: AsyncOpenAI | None = None
        self._download_client: AsyncOpenAI | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        self._scrub = Scrubber([key])
        self._policy = files.RetryPolicy(
            attempts=settings.openai_max_retries + 1, base_s=retry_base_s, cap_s=retry_cap_s
        )
        self._created: set[str] = set()
        self._model_overhead_s = model_overhead_s
        self.model = model_name(settings)

    # ----- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        api_key(self.settings)  # AuthFailed with a hint when missing
        if self._client is None:
            try:
                self._client = build_client(self.settings, self._http_client)
            except errors.CIError:
                raise
            except Exception as exc:  # e.g. the SDK refusing a malformed endpoint
                raise errors.BackendError(f"Cannot configure the OpenAI client: {self._scrub(str(exc))}") from None
            self._download_client = self._client.with_options(max_retries=0)
            self._limiter = anyio.CapacityLimiter(self.settings.download_concurrency)

    async def save_state(self) -> None:
        """Nothing to save: a hosted container's variables live (and die) with it at OpenAI."""

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if self.settings.delete_containers_on_shutdown and self._created:
            stale = [ContainerState(cid, self.name, 0.0, 0.0, 0.0, isolation="remote") for cid in self._created]
            with anyio.move_on_after(10):
                async with anyio.create_task_group() as tg:
                    for container in stale:
                        tg.start_soon(self._destroy_quietly, client, container)
        if self._http_client is None:  # an injected client belongs to the caller
            await client.close()

    async def _destroy_quietly(self, client: AsyncOpenAI, container: ContainerState) -> None:
        try:
            await containers.delete(client, container, self._scrub)
            self._created.discard(container.id)
        except errors.CIError as exc:
            log.warning("could not delete container %s at shutdown: %s", container.id, exc.message)

    def _api(self) -> AsyncOpenAI:
        if self._client is None:
            raise errors.BackendError("The openai backend is not started.", hint="Call start() first.")
        return self._client

    # ----- containers ---------------------------------------------------------------------------------------

    async def create_container(
        self, session_id: str, expires_after_s: float, owner: str | None = None
    ) -> ContainerState:
        state = await containers.create(
            self._api(), session_id, expires_after_s, self.settings.openai_memory_limit, self._scrub
        )
        self._created.add(state.id)
        return state

    async def refresh(self, container: ContainerState) -> ContainerState:
        return await containers.refresh(self._api(), container, self._scrub)

    async def destroy(self, container: ContainerState) -> None:
        await containers.delete(self._api(), container, self._scrub)
        self._created.discard(container.id)

    # ----- runs ---------------------------------------------------------------------------------------------

    async def execute(self, container: ContainerState, request: ExecRequest, progress: Progress) -> ExecOutcome:
        code = shell_lines.translate(request.code)  # `!cmd` lines as Python: the model is given Python to run
        if code is not request.code:
            request = dataclasses.replace(request, code=code)
        kwargs = responses.run_request(self.model, container.id, request)
        deadline = request.timeout_s + self._model_overhead_s
        final: dict[str, Any] | None = None
        with anyio.move_on_after(deadline):
            final = await responses.stream_final(
                self._api(), kwargs, progress, self._scrub, "running the code", request.code_done, request.on_output
            )
        if final is None:
            return ExecOutcome(
                status="timeout",
                error=ExecError(type="TimeoutError", message=f"No answer from the API within {deadline:g} s."),
                warnings=["The remote run may still be going on in the container."],
                model_calls=1,
            )
        return parsing.parse_run(final, request, container, self._scrub)

    async def repair_json(self, schema: dict[str, Any], raw: str, problems: list[str]) -> RepairOutcome | None:
        kwargs = responses.repair_request(self.model, schema, raw, problems)
        final = await responses.stream_final(self._api(), kwargs, no_progress, self._scrub, "repairing the JSON")
        text, usage = parsing.parse_repair(final, self._scrub)
        return RepairOutcome(text=text, usage=usage)

    # ----- files --------------------------------------------------------------------------------------------

    async def list_files(self, container: ContainerState) -> list[RemoteFile]:
        return await files.list_files(self._api(), container, self._scrub)

    async def fetch_file(self, container: ContainerState, file: RemoteFile, dest: Path, max_bytes: int) -> FetchResult:
        self._api()
        assert self._download_client is not None and self._limiter is not None
        return await files.fetch_file(
            self._download_client, container, file, dest, max_bytes, self._scrub, self._policy, self._limiter
        )

    async def fetch_files(
        self, container: ContainerState, files: list[RemoteFile], max_bytes: int, sink: CopySink
    ) -> list[FetchResult | errors.CIError]:
        """Each file streamed to a new path of the sink (the bytes are known only once downloaded)."""
        out: list[FetchResult | errors.CIError] = [errors.DownloadFailed("not fetched")] * len(files)

        async def one(i: int, file: RemoteFile) -> None:
            dest = sink.new_path()
            try:
                res = await self.fetch_file(container, file, Path(dest), max_bytes)
            except errors.CIError as exc:
                out[i] = exc
            else:
                res.path = dest
                out[i] = res

        async with anyio.create_task_group() as tg:  # the downloads' own limiter bounds them
            for i, file in enumerate(files):
                tg.start_soon(one, i, file)
        return out

    async def put_file(self, container: ContainerState, src: Path, dest_path: str) -> RemoteFile:
        return await files.put_file(self._api(), container, src, dest_path, self.settings.max_file_bytes, self._scrub)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "backend": self.name,
            "isolation": self.isolation,
            "endpoint": self._scrub(endpoint(s)),
            "azure": bool(s.azure_endpoint),
            "model": self.model,
            "memory_limit": s.openai_memory_limit,
            "max_retries": s.openai_max_retries,
            "timeout_s": s.openai_timeout_s,
            "download_concurrency": s.download_concurrency,
            "api_key": "set" if s.openai_api_key else None,
        }
