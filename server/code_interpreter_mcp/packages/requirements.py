"""What a caller may ask to install: PEP 508 requirement strings, checked and normalised, and the dependencies of a
PEP 723 `# /// script` block in the code.

Only requirements that name a project on the index are accepted. URLs, direct references (`name @ url`), local
paths, archives and option lines (`-e .`, `--index-url ...`, anything smuggled after a newline) are refused: the
index is the operator's choice, never the caller's. This module knows nothing of policy, installers or the cache.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name

from ..errors import BadRequirement

MAX_REQUIREMENTS = 64
MAX_REQUIREMENT_CHARS = 300

# The reference implementation's regex from the inline script metadata specification (PEP 723).
PEP723_REGEX = re.compile(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$")

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^(git|hg|svn|bzr)\+")
_ARCHIVE_RE = re.compile(r"\.(whl|zip|tar\.gz|tgz|tar\.bz2|tar\.xz|tar)$", re.IGNORECASE)


def normalize_requirement(text: object) -> str:
    """One requirement string, checked, with its name canonicalised: `"Scikit_Learn >=1.5"` -> `scikit-learn>=1.5`.

    Raises BadRequirement naming what is wrong with it."""
    if not isinstance(text, str):
        raise BadRequirement(f"A package requirement must be a string, not {type(text).__name__}.")
    raw = text.strip()
    shown = raw if len(raw) <= 80 else raw[:77] + "..."
    if not raw:
        raise BadRequirement("A package requirement is empty.")
    if len(raw) > MAX_REQUIREMENT_CHARS:
        raise BadRequirement(f"The package requirement {shown!r} is longer than {MAX_REQUIREMENT_CHARS} characters.")
    if any(c in raw for c in "\r\n\0"):
        # The pins travel to the installer as a requirements file: one line each, nothing hidden after a break.
        raise BadRequirement(f"The package requirement {shown!r} spans several lines.")
    if raw.startswith("-"):
        raise BadRequirement(f"{shown!r} is an installer option, not a requirement; options are the operator's.")
    if _URL_RE.match(raw):
        raise BadRequirement(f"{shown!r} is a URL; only packages from the configured index can be installed.")
    head = re.split(r"[\s;\[<>=!~@]", raw, maxsplit=1)[0]
    if raw.startswith((".", "/", "~", "\\")) or "/" in head or "\\" in head or _ARCHIVE_RE.search(head):
        raise BadRequirement(f"{shown!r} is a local path; only packages from the configured index can be installed.")
    try:
        req = Requirement(raw)
    except InvalidRequirement as exc:
        raise BadRequirement(f"{shown!r} is not a valid requirement: {str(exc).splitlines()[0]}") from None
    if req.url:
        raise BadRequirement(
            f"{shown!r} is a direct reference (name @ URL); only packages from the configured index can be installed."
        )
    req.name = canonicalize_name(req.name)
    req.extras = {canonicalize_name(e) for e in req.extras}
    return str(req)


def normalize_requirements(items: Iterable[object]) -> list[str]:
    """Every requirement checked and normalised, duplicates dropped, in a stable (sorted) order."""
    out = sorted({normalize_requirement(item) for item in items})
    if len(out) > MAX_REQUIREMENTS:
        raise BadRequirement(f"{len(out)} package requirements; at most {MAX_REQUIREMENTS} are accepted per run.")
    return out


def read_script_metadata(code: str) -> dict[str, object] | None:
    """The TOML of the code's `# /// script` block, or None when it has none (the specification's reference
    reading: several blocks of that type are an error)."""
    matches = [m for m in PEP723_REGEX.finditer(code) if m.group("type") == "script"]
    if not matches:
        return None
    if len(matches) > 1:
        raise BadRequirement("The code has more than one `# /// script` metadata block.")
    content = "".join(
        line[2:] if line.startswith("# ") else line[1:]
        for line in matches[0].group("content").splitlines(keepends=True)
    )
    try:
        return tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        raise BadRequirement(f"The `# /// script` block is not valid TOML: {exc}") from None


def script_dependencies(code: str) -> list[str]:
    """The `dependencies` of the code's PEP 723 block (raw strings), after checking its `requires-python`
    against the interpreter the code will run on."""
    meta = read_script_metadata(code)
    if meta is None:
        return []
    requires_python = meta.get("requires-python")
    if requires_python is not None:
        if not isinstance(requires_python, str):
            raise BadRequirement("`requires-python` in the `# /// script` block must be a string.")
        try:
            spec = SpecifierSet(requires_python)
        except InvalidSpecifier:
            raise BadRequirement(f"`requires-python = {requires_python!r}` is not a valid specifier.") from None
        running = default_environment()["python_full_version"]
        if not spec.contains(running, prereleases=True):
            raise BadRequirement(
                f"The script requires Python {requires_python}, but the sandbox runs Python {running}.",
                hint="Relax requires-python in the `# /// script` block.",
            )
    deps = meta.get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise BadRequirement("`dependencies` in the `# /// script` block must be a list of strings.")
    return list(deps)


def gather_requirements(packages: Iterable[object] | None, code: str | None = None) -> list[str]:
    """What one run asks for: its `packages` argument plus its code's PEP 723 dependencies, normalised."""
    items: list[object] = list(packages or [])
    if code:
        items.extend(script_dependencies(code))
    return normalize_requirements(items)
