"""Driving the installer: uv (from the `uv` package) or, without it, pip, always inside the installer sandbox.

Resolving the requirements to exact pins for the server's interpreter and platform is one command (`uv pip
compile`, or `pip install --dry-run --report`); installing exactly those pins, without dependencies, into a target
folder another (`uv pip install --target --no-deps`, `pip install --target --no-deps`). Installing requirements
with their dependencies in one command is the third (the same resolution, done by the same installer, for a set
that cannot be in the store yet). Wheels only
(`--no-build`, `--only-binary=:all:`) unless the operator allows builds, which then run in the same sandbox. uv
copies files out of its cache (`--link-mode copy`) instead of hard-linking them: a finished set must share no inode
with the cache that later installer sandboxes can write.

This module knows the installers' command lines and outputs; what the pins mean (keys, the store) is the cache's,
and what a failure means is `failures.py`'s.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ..errors import PackageInstallFailed, SandboxUnavailable
from . import sandbox
from .failures import classify
from .index import IndexConfig

logger = logging.getLogger(__name__)

ToolName = Literal["uv", "pip"]
Phase = Literal["downloading", "installing"]
PhaseCallback = Callable[[Phase], Awaitable[None]]
# Lines of the installers' stderr that mark a phase: resolution is done, then the downloads.
_UV_PHASES: tuple[tuple[str, Phase], ...] = (("Resolved ", "downloading"), ("Prepared ", "installing"))
_PIP_PHASES: tuple[tuple[str, Phase], ...] = (("Installing collected packages", "installing"),)


@dataclass(frozen=True)
class Tool:
    name: ToolName
    command: list[str]  # the uv binary, or the interpreter running pip
    readonly: tuple[str, ...] = ()  # what the sandbox must see to run it, beyond the interpreter


def find_tool(preference: Literal["auto", "uv", "pip"]) -> Tool | None:
    """uv from the `uv` package (or PATH), else pip for the server's interpreter; None when neither exists."""
    if preference in ("auto", "uv"):
        uv_bin = _find_uv()
        if uv_bin:
            return Tool("uv", [uv_bin], (os.path.realpath(uv_bin),))
        if preference == "uv":
            return None
    if importlib.util.find_spec("pip") is not None:
        return Tool("pip", [interpreter(), "-I", "-m", "pip"])
    return None


def _find_uv() -> str | None:
    try:
        import uv

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        import shutil

        return shutil.which("uv")


def interpreter() -> str:
    """The interpreter the run's sandbox uses, and so the one sets are resolved for (not its realpath: a venv's
    interpreter is what makes its site-packages the base the set goes in front of)."""
    return os.path.abspath(sys.executable)


def tool_version(tool: Tool) -> str:
    """`uv 0.x.y` or `pip x.y` (blocking: for doctor)."""
    argv = [*tool.command, "--version"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return (done.stdout or done.stderr).strip().split(" from ")[0]


class Installer:
    """One installer configuration: a tool, a sandbox (or none, if the operator opted out), an index, a cache."""

    def __init__(
        self,
        tool: Tool,
        bwrap: sandbox.Bwrap | None,
        index: IndexConfig,
        tool_cache: Path,
        *,
        allow_builds: bool,
    ) -> None:
        self.tool = tool
        self.bwrap = bwrap
        self.index = index
        self.tool_cache = tool_cache
        self.allow_builds = allow_builds
        self.commands_run = 0  # how many installer commands this installer started (reuse starts none)

    @property
    def isolation(self) -> str:
        return "bubblewrap" if self.bwrap is not None else "none"

    async def resolve(self, requirements: list[str], workdir: Path) -> list[str]:
        """The exact pins (`name==version`, sorted by name) the requirements resolve to."""
        req_file = workdir / "requirements.in"
        await anyio.Path(req_file).write_text("".join(r + "\n" for r in requirements))
        py = interpreter()
        if self.tool.name == "uv":
            argv = [*self.tool.command, "pip", "compile", str(req_file), "--python", py]
            argv += ["--no-header", "--no-annotate", "--color", "never", *self._uv_build_flags()]
            done = await self.run([*argv, *self.index.uv_args], workdir)
            pins = _pins_from_lines(done.stdout)
        else:
            report = workdir / "resolution.json"
            argv = [*self.tool.command, "install", "--dry-run", "--ignore-installed", "--report", str(report)]
            argv += ["-r", str(req_file), *_PIP_QUIET, *self._pip_build_flags()]
            await self.run([*argv, *self.index.pip_args], workdir)
            pins = _pins_from_report(await anyio.Path(report).read_text())
        if not pins:
            raise PackageInstallFailed(f"The {self.tool.name} resolver returned no distributions.")
        return pins

    async def install(
        self, items: list[str], workdir: Path, target: Path, on_phase: PhaseCallback, *, exact: bool
    ) -> None:
        """Install into `target` (inside `workdir`): exactly the pins `items` without dependencies (`exact`), or
        the requirements `items` with what they need, resolved by the installer in the same command.
        `on_phase("downloading")` / `on_phase("installing")` are awaited as the installer reaches each."""
        items_file = workdir / ("pins.txt" if exact else "requirements.in")
        await anyio.Path(items_file).write_text("".join(p + "\n" for p in items))
        markers = _UV_PHASES if self.tool.name == "uv" else _PIP_PHASES

        async def on_line(line: str) -> None:
            for prefix, phase in markers:
                if line.startswith(prefix):
                    await on_phase(phase)

        no_deps = ["--no-deps"] if exact else []
        if self.tool.name == "uv":
            argv = [*self.tool.command, "pip", "install", "--target", str(target), *no_deps, "-r", str(items_file)]
            argv += ["--python", interpreter(), "--link-mode", "copy", "--color", "never", *self._uv_build_flags()]
            argv += self.index.uv_args
        else:
            argv = [*self.tool.command, "install", "--target", str(target), *no_deps, "-r", str(items_file)]
            argv += ["--no-compile", "--no-warn-script-location", *_PIP_QUIET, *self._pip_build_flags()]
            argv += self.index.pip_args
        await self.run(argv, workdir, on_line)
        # uv's lock of the target folder: nothing the run's sandbox should see.
        await anyio.Path(target / ".lock").unlink(missing_ok=True)

    def _uv_build_flags(self) -> list[str]:
        return [] if self.allow_builds else ["--no-build"]

    def _pip_build_flags(self) -> list[str]:
        return [] if self.allow_builds else ["--only-binary=:all:"]

    def _env(self, inside: bool) -> dict[str, str]:
        if self.tool.name == "uv":
            tool_env = {"UV_CACHE_DIR": str(self.tool_cache), "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
        else:
            tool_env = {"PIP_CACHE_DIR": str(self.tool_cache), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        tool_dirs = [os.path.dirname(self.tool.command[0]), os.path.dirname(interpreter())]
        if inside:
            return sandbox.installer_env({**self.index.env, **tool_env}, tool_dirs)
        return sandbox.installer_env({**self.index.host_env, **tool_env}, tool_dirs, home=str(Path.home()))

    async def run(self, argv: list[str], workdir: Path, on_line: sandbox.Line | None = None) -> sandbox.Completed:
        self.commands_run += 1
        if self.bwrap is not None:
            mounts = sandbox.Mounts(
                writable=[str(workdir), str(self.tool_cache)], readonly=self.index.readonly, chdir=str(workdir)
            )
            done = await sandbox.run_sandboxed(
                self.bwrap, mounts, argv, self._env(True), list(self.tool.readonly), on_stderr_line=on_line
            )
        else:
            done = await sandbox.run_command(argv, self._env(False), cwd=str(workdir), on_stderr_line=on_line)
        if done.returncode != 0:
            if self.bwrap is not None and done.stderr.startswith("bwrap:"):
                raise SandboxUnavailable(f"The installer sandbox failed to start: {done.stderr.strip()[:300]}")
            logger.info("installer failed (%s): %s", done.returncode, done.stderr[-2000:])
            raise classify(self.tool.name, done.stderr, done.stdout)
        return done


_PIP_QUIET = ["--disable-pip-version-check", "--no-input", "--no-color", "--progress-bar", "off"]


def _pins_from_lines(text: str) -> list[str]:
    pins: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            raise PackageInstallFailed(f"The resolver printed a line that is not a pin: {line[:200]!r}") from None
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise PackageInstallFailed(f"The resolver printed a line that is not an exact pin: {line[:200]!r}")
        pins[canonicalize_name(req.name)] = specs[0].version
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _pins_from_report(text: str) -> list[str]:
    try:
        report = json.loads(text)
        items = [(it["metadata"]["name"], it["metadata"]["version"]) for it in report.get("install", [])]
    except (ValueError, KeyError, TypeError):
        raise PackageInstallFailed("pip's resolution report could not be read.") from None
    return sorted(f"{canonicalize_name(name)}=={version}" for name, version in items)
