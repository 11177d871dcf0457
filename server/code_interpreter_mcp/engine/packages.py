"""The packages step of a run: what the session's code may import besides the server's own environment.

A run asks for packages with its `packages` argument or a PEP 723 `# /// script` block. The session remembers its
requirements (the latest per project name, persisted in the registry like its input files), so every later run,
and a container that replaces an expired, evicted or crashed one, gets the same set without being asked. The set
comes from the one `PackageManager` (policy, installer sandbox, shared cache); its progress goes to the run's
relay, and cancelling the call cancels the install. The backend gets the set's folder in `ExecRequest`.

Leases: each container holds a lease on every set its worker used (modules imported from an older set still load
from it), given back once the container is retired and the run that retired it is over (`settle`), so a set is
never evicted under a live worker. A worker already using the session's set costs nothing more per run.

It knows the registry and the package manager; nothing of MCP, of how a backend mounts a set, nor of installers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ..backends.base import Progress
from ..errors import BadInput, CIError, PackagesUnsupported
from ..models import Distribution, PackagesInfo
from ..packages import InstalledSet, PackageManager, gather_requirements, normalize_requirements
from ..sessions import ContainerRecord, Session
from .context import EngineContext

logger = logging.getLogger(__name__)


def _name(requirement: str) -> str:
    return str(canonicalize_name(Requirement(requirement).name))


def merge_requirements(stored: list[str], wanted: list[str]) -> list[str]:
    """The session's requirements after a run asks for `wanted`: a project named again takes its new
    constraint (`alpha>=2` replaces `alpha<2`), the others stay."""
    names = {_name(r) for r in wanted}
    return normalize_requirements([r for r in stored if _name(r) not in names] + wanted)


@dataclass
class RunPackages:
    """The set one run imports from, and what its result says about it."""

    requirements: list[str]
    installed: InstalledSet
    info: PackagesInfo

    @property
    def paths(self) -> list[Path]:
        return [self.installed.path]


@dataclass
class _Held:
    requirements: list[str]
    installed: InstalledSet
    keys: set[str] = field(default_factory=set)  # one lease each
    again: RunPackages | None = None  # what a later run with the same requirements gets (built once)

    def later_run(self) -> RunPackages:
        if self.again is None:
            self.again = _for_run(self.requirements, self.installed, seconds=0.0, reused=True)
        return self.again


class Packages:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.manager = PackageManager(ctx.settings)
        self._held: dict[str, _Held] = {}  # container id -> the set its worker uses, and the keys it leased
        self._retired: list[str] = []  # leases of retired containers, given back by `settle`

    async def start(self) -> None:
        """Prepare the installer off the start-up path; a failure now is raised again by the first install."""
        if not (self.ctx.capabilities.packages and self.manager.enabled):
            return
        try:
            await self.manager.start()
        except CIError as exc:
            logger.warning("packages are not usable yet: %s", exc.user_text())

    async def aclose(self) -> None:
        self._held.clear()
        self._retired.clear()
        await self.manager.aclose()

    def wanted(self, packages: list[str] | None, code: str) -> list[str]:
        """What one run asks for, checked before anything starts (BadRequirement, or the backend's refusal)."""
        if packages is not None and not isinstance(packages, list):
            raise BadInput('packages must be a list of requirement strings, e.g. ["tabulate"].')
        wanted = gather_requirements(packages, code)
        caps = self.ctx.capabilities
        if wanted and not caps.packages:
            raise PackagesUnsupported(
                f"The {self.ctx.backend.name} backend cannot install packages ({', '.join(wanted)}).",
                hint=f"Run without packages (and without a `# /// script` dependencies block): it runs code in "
                f"{caps.preinstalled or 'an image of its own'}.",
            )
        return wanted

    async def prepare(
        self, session: Session, rec: ContainerRecord, wanted: list[str], progress: Progress
    ) -> RunPackages | None:
        """The session's set for a run in `rec`, installed if needed; None when the session has no packages.
        A failure leaves the session's requirements and its container's set as they were."""
        if not self.ctx.capabilities.packages:
            return None
        requirements = merge_requirements(session.packages, wanted) if wanted else list(session.packages)
        if not requirements:
            return None
        held = self._held.get(rec.state.id)
        if held is not None and held.requirements == requirements:
            return held.later_run()
        installed = await self.manager.ensure(requirements, progress)
        if held is None:
            self._held[rec.state.id] = _Held(requirements, installed, {installed.key})
        else:
            if installed.key in held.keys:
                self.manager.release(installed.key)  # this container leases it already
            held.keys.add(installed.key)
            held.requirements, held.installed, held.again = requirements, installed, None
        if requirements != session.packages:
            await self.ctx.reg.save_packages(session, requirements)
        return _for_run(requirements, installed, seconds=installed.seconds, reused=installed.reused)

    def adopt(self, rec: ContainerRecord, run: RunPackages) -> None:
        """The run moved to a new container (the old one was found expired): it uses the run's set too."""
        if rec.state.id not in self._held and self.manager.lease(run.installed.key):
            self._held[rec.state.id] = _Held(run.requirements, run.installed, {run.installed.key})

    def container_gone(self, rec: ContainerRecord) -> None:
        held = self._held.pop(rec.state.id, None)
        if held is not None:
            self._retired.extend(held.keys)

    def settle(self) -> None:
        """Give back the leases of retired containers (after the run that replaced one has leased its set)."""
        retired, self._retired = self._retired, []
        for key in retired:
            self.manager.release(key)


def _for_run(requirements: list[str], installed: InstalledSet, *, seconds: float, reused: bool) -> RunPackages:
    info = PackagesInfo(
        requirements=requirements,
        distributions=[Distribution(name=n, version=v) for n, v in installed.distributions],
        reused=reused,
        seconds=round(seconds, 3),
    )
    return RunPackages(requirements, installed, info)
