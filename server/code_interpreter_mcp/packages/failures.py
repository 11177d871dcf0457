"""What an installer's failure means: uv's and pip's stderr mapped onto the package errors of `errors.py`.

The patterns are uv's and pip's real messages (the tests produce each one against real wheels). The resolver's own
explanation is kept, trimmed, in the message: it is what tells the caller which constraint to change. This module
knows nothing of running the installer.
"""

from __future__ import annotations

import re

from ..errors import (
    PackageConflict,
    PackageError,
    PackageIndexUnreachable,
    PackageInstallFailed,
    PackageNotFound,
    PackageNoWheel,
)

MAX_EXPLANATION = 900

_UNREACHABLE = re.compile(
    r"error sending request for url|tcp connect error|dns error|failed to lookup address|Connection refused"
    r"|Network is unreachable|No route to host|operation timed out|Failed to read `--find-links`"
    r"|Failed to establish a new connection|NewConnectionError|Temporary failure in name resolution"
    r"|Max retries exceeded|Could not fetch URL|ConnectTimeoutError|ReadTimeoutError|ProxyError"
    r"|HTTP status server error|SSL: CERTIFICATE_VERIFY_FAILED|invalid peer certificate",
    re.IGNORECASE,
)
_UV_NO_WHEEL = re.compile(
    r"has no usable wheels|no wheels with a matching (platform|Python ABI|Python implementation) tag"
    r"|building from source is disabled|has no wheels? (are )?available",
    re.IGNORECASE,
)
_UV_NOT_FOUND = re.compile(
    r"Because (?P<name>\S+) was not found in the (package registry|provided package locations)", re.IGNORECASE
)
_UV_NO_VERSION = re.compile(r"there is no version of (?P<name>\S+)|only (?P<only>\S+) .*is available and you require")
_PIP_NO_VERSION = re.compile(
    r"Could not find a version that satisfies the requirement (?P<req>\S+) \(from versions: (?P<versions>[^)]*)\)"
)


def trim(text: str, limit: int = MAX_EXPLANATION) -> str:
    """An installer's message as one readable paragraph: prefixes, progress noise and blank lines dropped."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("Using CPython", "Resolved ", "Prepared ", "DEBUG", "Collecting ")):
            continue
        line = re.sub(r"^(error|ERROR|cause|hint|WARNING|warning):\s*", "", line)
        if line and line not in lines:
            lines.append(line)
    out = " ".join(lines)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def classify(tool: str, stderr: str, stdout: str = "") -> PackageError:
    """The package error an installer's failed run stands for."""
    text = stderr + ("\n" + stdout if stdout else "")
    return _classify_uv(text) if tool == "uv" else _classify_pip(text)


def _classify_uv(text: str) -> PackageError:
    if "No solution found when resolving dependencies" in text:
        explanation = trim(text.split("No solution found when resolving dependencies", 1)[1])
        if _UV_NO_WHEEL.search(text):
            return PackageNoWheel(f"No installable wheel: {explanation}")
        found = _UV_NOT_FOUND.search(text)
        if found:
            return PackageNotFound(f"No package named {found.group('name')!r} on the index: {explanation}")
        if _UV_NO_VERSION.search(explanation) and not re.search(r"\bdepends? on\b", explanation):
            return PackageNotFound(f"No version matches what was asked: {explanation}")
        return PackageConflict(f"The requirements conflict: {explanation}")
    if _UNREACHABLE.search(text):
        return PackageIndexUnreachable(f"The package index could not be reached: {trim(text, 400)}")
    if _UV_NO_WHEEL.search(text):
        return PackageNoWheel(f"No installable wheel: {trim(text)}")
    return PackageInstallFailed(f"The installer failed: {trim(text)}")


def _classify_pip(text: str) -> PackageError:
    if "ResolutionImpossible" in text or "conflicting dependencies" in text:
        cause = text.split("The conflict is caused by:", 1)
        detail = trim(cause[1].split("To fix this", 1)[0]) if len(cause) == 2 else trim(text)
        return PackageConflict(f"The requirements conflict: {detail}")
    if _UNREACHABLE.search(text):
        return PackageIndexUnreachable(f"The package index could not be reached: {trim(text, 400)}")
    missing = _PIP_NO_VERSION.search(text)
    if missing:
        req, versions = missing.group("req"), missing.group("versions").strip()
        if versions == "none":
            # pip does not tell an unknown name from one that has no wheel for this platform.
            return PackageNotFound(
                f"No installable distribution of {req!r} on the index (unknown name, or no wheel for this platform).",
                hint="Check the name on the package index, and that it publishes a wheel for this platform.",
            )
        return PackageNotFound(f"No version of {req!r} matches; available: {versions}.")
    if "Failed to build" in text or "metadata-generation-failed" in text:
        return PackageInstallFailed(f"Building from source failed: {trim(text)}")
    return PackageInstallFailed(f"The installer failed: {trim(text)}")
