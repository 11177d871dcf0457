"""One run of `run_code`: its arguments checked, the container acquired and the run's input files put in, the code
executed (once more in a new container if the backend finds the old one expired), the container harvested, the
JSON resolved and the result shaped.

There is one run flow for every backend: the harvest exists for every run, and its listing starts when the code
finished if the backend signals that (`Capabilities.signals_code_done`), else when `execute` returns. Runs in the
background (a run registry with handles, `get_run`, `cancel_run`) would start `Runner.run_code` in a task of
their own; this module knows nothing of them, of MCP, nor of how results reach a client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from ..backends.base import ExecError, ExecOutcome, ExecRequest, StructuredRequest
from ..config import Settings
from ..errors import BadInput, ContainerExpired
from ..sessions import ContainerRecord, Session
from .cells import prepare_cell
from .containers import Containers
from .context import EngineContext
from .envs import check_env, kept_env
from .harvest import Harvest, Harvested
from .inputs import Inputs
from .json_result import resolve_json
from .packages import Packages, RunPackages
from .progress import ProgressRelay, ProgressSink, Relays
from .shaping import RunOutput, Shaper

MAX_CODE_CHARS = 2_000_000


@dataclass
class RunArgs:
    code: str
    timeout_s: float
    structured: StructuredRequest | None
    instructions: str | None


def check_run_args(
    settings: Settings,
    code: str,
    timeout_s: float | None,
    output_schema: dict[str, Any] | None,
    json_strategy: str | None,
    instructions: str | None,
) -> RunArgs:
    if not isinstance(code, str):
        raise BadInput("code must be a string of Python source.")
    if len(code) > MAX_CODE_CHARS:
        raise BadInput(
            f"code is {len(code)} characters; the limit is {MAX_CODE_CHARS}.",
            "Upload large data with upload_file and read it from /mnt/data instead.",
        )
    timeout = settings.default_timeout_s if timeout_s is None else timeout_s
    if not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
        raise BadInput(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    if timeout > settings.max_timeout_s:
        raise BadInput(f"timeout_s {timeout} exceeds the server's maximum of {settings.max_timeout_s} s.")
    strategy = json_strategy or settings.structured_strategy
    if strategy not in ("two_pass_sentinel", "single_pass"):
        raise BadInput(f"json_strategy must be 'two_pass_sentinel' or 'single_pass', got {strategy!r}.")
    sreq = None
    if output_schema is not None:
        from .. import structured  # jsonschema is imported only when a schema is used: faster start-up

        sreq = StructuredRequest(schema=output_schema, nonce=structured.new_nonce(), strategy=strategy)  # type: ignore[arg-type]
    if instructions is not None and not isinstance(instructions, str):
        raise BadInput("instructions must be a string.")
    return RunArgs(code=code, timeout_s=timeout, structured=sreq, instructions=instructions)


CANCELLED_MESSAGE = (
    "The run was stopped by cancel_run: interrupted like a timeout, so variables and imports are kept (only code "
    "that ignores the interrupt is killed, and then the next result says state_lost)."
)


class Stop:
    """Asks a run's execution to stop the way a timeout does; set from outside the run (`cancel_run`)."""

    def __init__(self) -> None:
        self.requested = False
        self._scope: anyio.CancelScope | None = None

    def set(self) -> None:
        self.requested = True
        if self._scope is not None:
            self._scope.cancel()

    @contextmanager
    def scope(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that `set()` cancels, at once when the stop was asked for already."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self.requested:
                scope.cancel()
            try:
                yield scope
            finally:
                self._scope = None


async def stoppable(
    execute: Awaitable[tuple[ExecOutcome, ContainerRecord, bool]], stop: Stop | None, rec: ContainerRecord
) -> tuple[ExecOutcome, ContainerRecord, bool]:
    """`execute`, cancelled when `stop` is set: a backend stops a cancelled run by interrupting it first, and the
    run goes on to its harvest with a 'cancelled' outcome instead of ending with the request."""
    if stop is None:
        return await execute
    with stop.scope():
        return await execute
    return ExecOutcome(status="cancelled", error=ExecError("Cancelled", CANCELLED_MESSAGE)), rec, False


class Runner:
    def __init__(
        self, ctx: EngineContext, containers: Containers, inputs: Inputs, relays: Relays, packages: Packages
    ) -> None:
        self.ctx = ctx
        self.packages = packages
        self.containers = containers
        self.inputs = inputs
        self.relays = relays
        self.shaper = Shaper(ctx.settings, ctx.backend.name, ctx.capabilities.model)

    async def run_code(
        self,
        session: Session,
        code: str,
        *,
        files: list[str] | None = None,
        output_schema: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        instructions: str | None = None,
        json_strategy: str | None = None,
        progress: ProgressSink | None = None,
        packages: list[str] | None = None,
        on_output: Callable[[str, str], None] | None = None,
        stop: Stop | None = None,
        env: dict[str, str] | None = None,
        persist_env: bool = False,
    ) -> RunOutput:
        """One run, start to result. `on_output` receives what the code prints as it runs (backends that stream
        it); `stop` set while it runs stops it the way a timeout does (interrupt first), and it ends 'cancelled'."""
        started = time.monotonic()
        args = check_run_args(self.ctx.settings, code, timeout_s, output_schema, json_strategy, instructions)
        if args.structured is not None:
            await self.ctx.guard.check_schema(args.structured.schema)  # compiled off the loop, time-limited
        cell = prepare_cell(args.code)  # dedented; its pip lines become requirements
        args.code = cell.code
        if cell.requirements and (packages is None or isinstance(packages, list)):
            packages = [*(packages or []), *cell.requirements]
        wanted = self.packages.wanted(packages, args.code)
        run_env = check_env(self.ctx.settings, env)
        if (run_env or session.env) and not self.ctx.capabilities.env:
            raise BadInput(
                f"The {self.ctx.backend.name} backend cannot set environment variables for a run "
                f"({', '.join(sorted({**session.env, **run_env})[:5])}).",
                "Set them in the code instead (os.environ['NAME'] = ...).",
            )
        await self.ctx.ready()
        relay = ProgressRelay(progress, args.timeout_s)
        async with session.lock:
            reg = self.ctx.reg
            await reg.touch_session(session)
            if persist_env and run_env:
                await reg.save_env(session, kept_env(self.ctx.settings, session.env, run_env))
            merged_env = {**session.env, **run_env}
            rec, state_lost = await self.containers.acquire(session)
            warnings: list[str] = []
            if files:
                await self.inputs.add_run_inputs(session, rec, files)
            pkgs = await self._packages(session, rec, wanted, relay)
            request = ExecRequest(
                code=args.code,
                timeout_s=args.timeout_s,
                instructions=args.instructions,
                structured=args.structured,
                run_number=rec.runs + 1,
                package_paths=pkgs.paths if pkgs is not None else [],
                env=merged_env,
                on_output=on_output if self.ctx.capabilities.streams_output else None,
            )
            self.relays.add(relay)
            try:
                outcome, rec, lost_again, (records, harvest_warnings) = await self._execute_and_harvest(
                    session, rec, request, relay, stop
                )
            finally:
                self.relays.discard(relay)
            if pkgs is not None:
                self.packages.adopt(rec, pkgs)
            self.packages.settle()
            if outcome.state_restored is not None:
                state_lost = outcome.state_lost  # what an earlier loss took came back; only this run's own counts
            else:
                state_lost = state_lost or lost_again or outcome.state_lost
            if instructions and not self.ctx.capabilities.model:
                warnings.append("instructions were ignored: they guide the model of the openai backend only.")
            rec.runs += 1
            warnings.extend(outcome.warnings)
            warnings.extend(harvest_warnings)
            reg.save_container_later(rec)  # activity times: written by housekeeping, not on the hot path
            resolved = await resolve_json(self.ctx.backend, outcome, args.structured, args.code, self.ctx.guard)
        result = self.shaper.run_result(
            session,
            rec,
            outcome,
            records,
            state_lost,
            warnings,
            resolved,
            started,
            code=args.code,
            packages=pkgs.info if pkgs is not None else None,
            execution_count=rec.runs,
        )
        return RunOutput(result=result, images=await self.shaper.inline_images(result, records))

    async def _packages(
        self, session: Session, rec: ContainerRecord, wanted: list[str], relay: ProgressRelay
    ) -> RunPackages | None:
        """The session's package set for this run; a long install sends progress (resolving, downloading,
        installing) and the relay's ticks."""
        if not wanted and not session.packages:
            return None
        self.relays.add(relay)
        try:
            return await self.packages.prepare(session, rec, wanted, relay.backend_progress)
        finally:
            self.relays.discard(relay)

    async def _execute_and_harvest(
        self,
        session: Session,
        rec: ContainerRecord,
        request: ExecRequest,
        relay: ProgressRelay,
        stop: Stop | None = None,
    ) -> tuple[ExecOutcome, ContainerRecord, bool, Harvested]:
        """Run and harvest. A backend that says when the code finished gets the listing started right then (a
        model takes seconds more to write its answer), and each file its answer cites starts downloading at once."""
        harvest = Harvest(self.ctx, self.containers, session, rec)
        early = self.ctx.capabilities.signals_code_done
        async with harvest.fetching(alongside=early):
            if early:
                request.code_done = harvest.code_done
            outcome, rec, lost = await stoppable(self._execute(session, rec, request, relay), stop, rec)
            await harvest.run_ended(rec, outcome)
        return outcome, rec, lost, await harvest.finish()

    async def _execute(
        self, session: Session, rec: ContainerRecord, request: ExecRequest, relay: ProgressRelay
    ) -> tuple[ExecOutcome, ContainerRecord, bool]:
        backend = self.ctx.backend
        try:
            return await backend.execute(rec.state, request, relay.backend_progress), rec, False
        except ContainerExpired:
            # Never reuse an expired container: a new one, the inputs again, and one more try.
            rec = await self.containers.replace(session, rec)
            request.run_number = 1
            request.code_done = None  # the early harvest watched the old container
            return await backend.execute(rec.state, request, relay.backend_progress), rec, True
