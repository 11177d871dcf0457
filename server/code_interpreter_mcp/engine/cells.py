"""A cell as models write it, made ready to run: a uniformly indented cell dedented, and its top-level
`!pip install X` / `%pip install X` lines taken out and turned into package requirements.

Models trained on notebooks write `pip install` lines where a run cannot honour them: the sandbox has no network,
and what may be installed is the operator's policy. So those lines never reach the sandbox; their requirements join
the run's `packages` and go through the packages mechanism (policy, installer sandbox, cache), with its result and
its errors. Every other `!` and `%` line is left for the backend (the local worker runs them through IPython's
transformer and a small shell of its own). An installer option the caller may not choose (`-i`, `--index-url`,
`-r`, `-e`, …) is refused here, like a URL in `packages`.

Knows nothing of backends, sessions or MCP.
"""

from __future__ import annotations

import ast
import re
import shlex
import textwrap
from dataclasses import dataclass, field

from ..errors import BadRequirement

# `!pip install`, `%pip install`, `!pip3 install`, `!python -m pip install`, `!uv pip install`, `%uv pip install`
_PIP_LINE = re.compile(
    r"^[!%](?:\s*)(?:(?:python3?|py)\s+-m\s+pip|pip3?|uv\s+pip)\s+install\b(?P<args>.*)$",
)
_ANY_PIP_LINE = re.compile(r"^[!%].*\binstall\b", re.MULTILINE)
# Options that only change how pip talks or prints, not what is installed: dropped.
_HARMLESS = {
    "-q", "--quiet", "-qq", "-qqq", "-U", "--upgrade", "--user", "--no-cache-dir", "--no-warn-script-location",
    "--disable-pip-version-check", "--no-input", "--upgrade-strategy", "--progress-bar", "--root-user-action",
    "-v", "--verbose", "--system", "--break-system-packages", "--pre", "--no-color",
}  # fmt: skip
# Of those, the ones that take a value (`--progress-bar off`).
_HARMLESS_WITH_VALUE = {"--upgrade-strategy", "--progress-bar", "--root-user-action"}


@dataclass
class Cell:
    code: str  # what the backend runs
    requirements: list[str] = field(default_factory=list)  # from pip lines, raw (normalised by packages)
    pip_lines: int = 0


def _compiles(code: str) -> bool:
    try:
        compile(code, "<cell>", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def dedent_cell(code: str) -> str:
    """The cell without the indentation every non-blank line shares (a cell pasted from inside a block), as
    IPython does; a cell whose first line is not indented is left as it is, so valid code never changes."""
    for line in code.splitlines():
        if line.strip():
            if line[0] not in " \t":
                return code
            break
    else:
        return code
    return textwrap.dedent(code)


def _pip_requirements(args: str, line: str) -> list[str]:
    """The requirements of one pip line's arguments; options that would choose an index or a file are refused."""
    try:
        tokens = shlex.split(args, comments=True)
    except ValueError as exc:
        raise BadRequirement(f"Cannot read the line {line.strip()!r}: {exc}.") from None
    out: list[str] = []
    skip_value = False
    for token in tokens:
        if skip_value:
            skip_value = False
            continue
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            if name in _HARMLESS:
                skip_value = name in _HARMLESS_WITH_VALUE and "=" not in token
                continue
            raise BadRequirement(
                f"The option {token!r} in {line.strip()!r} is not accepted: the index and the installer's options "
                "are the server operator's.",
                hint="Name only the packages, e.g. `%pip install tabulate 'scipy>=1.13'`.",
            )
        out.append(token)
    if not out:
        raise BadRequirement(f"The line {line.strip()!r} names no package.", hint="e.g. `%pip install tabulate`.")
    return out


def prepare_cell(code: str) -> Cell:
    """Dedent the cell and take out its top-level pip lines (each becomes a blank line, so line numbers in
    tracebacks still match the code as sent)."""
    code = dedent_cell(code)
    if "pip" not in code or _ANY_PIP_LINE.search(code) is None:  # the common case: nothing to scan
        return Cell(code)
    if _compiles(code):  # such a line outside a string is a SyntaxError: here they are all inside strings
        return Cell(code)
    lines = code.split("\n")
    requirements: list[str] = []
    count = 0
    continued = False
    for i, line in enumerate(lines):
        # Only unindented lines outside a bracket or string continuation: an indented pip line is inside a block
        # (the worker says why it cannot run there), and a line after a backslash belongs to the one before.
        if not continued:
            m = _PIP_LINE.match(line.rstrip())
            if m is not None and not line.rstrip().endswith("\\"):
                requirements.extend(_pip_requirements(m.group("args"), line))
                lines[i] = ""
                count += 1
        continued = line.rstrip().endswith("\\")
    if not count:
        return Cell(code)
    return Cell("\n".join(lines), requirements, count)
