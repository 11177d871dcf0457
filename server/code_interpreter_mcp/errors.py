"""The error taxonomy: every failure a caller can see has a stable code, a message and a hint.

Engine and backends raise `CIError` subclasses; the MCP face turns them into `ToolError` results and the CLI
into a JSON error on stderr. Messages never carry API keys or tokens: `redact` scrubs anything that looks like one.
"""

from __future__ import annotations

import re
from typing import ClassVar

_SECRET_RE = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9._\-]{8,}|api[_-]?key=[^&\s]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Remove anything shaped like an API key or bearer token from a message."""
    return _SECRET_RE.sub("[redacted]", text)


class CIError(Exception):
    """Base of every user-facing error. `code` is stable; `hint` says what to do next."""

    code: ClassVar[str] = "error"
    default_hint: ClassVar[str] = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = redact(message)
        self.hint = redact(hint) if hint is not None else self.default_hint
        super().__init__(self.message)

    def user_text(self) -> str:
        text = f"[{self.code}] {self.message}"
        if self.hint:
            text += f" Hint: {self.hint}"
        return text

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class BadInput(CIError):
    code = "bad_input"
    default_hint = "Check the argument types and values against the tool's input schema."


class NotFound(CIError):
    code = "not_found"
    default_hint = "Call list_container_files to see the files and ids this session has."


class SessionNotFound(NotFound):
    code = "session_not_found"
    default_hint = "Omit session_id to start a new session, or pass the session_id a previous result returned."


class RunNotFound(NotFound):
    code = "not_found"
    default_hint = "Pass the run_id a run_code result returned (with its session_id, if you passed one)."


class FileNotFound(NotFound):
    code = "file_not_found"


class FileTooLarge(CIError):
    code = "file_too_large"
    default_hint = "Pass save_to with a host directory to save the file instead of returning it inline."


class PathRefused(CIError):
    code = "path_refused"
    default_hint = "Name a regular file inside the container's data folder (no '..', no absolute paths, no symlinks)."


class ContainerExpired(CIError):
    code = "container_expired"
    default_hint = "Run again: a new container is created and the session's input files are uploaded again."


class DownloadFailed(CIError):
    code = "download_failed"
    default_hint = "Try again; harvested copies of earlier files stay available with download_file."


class RateLimited(CIError):
    code = "rate_limited"
    default_hint = "Wait a little and try again."


class UpstreamUnavailable(CIError):
    code = "upstream_unavailable"
    default_hint = "The remote service failed; try again in a moment."


class RegistryUnavailable(CIError):
    code = "registry_unavailable"
    default_hint = (
        "The server's database (DATABASE_URL) did not answer: try again in a few seconds; the server reconnects "
        "by itself once it is back."
    )


class SessionElsewhere(CIError):
    code = "session_elsewhere"
    default_hint = (
        "The session's home is another replica that is alive: send its calls there (route on session_id, or keep "
        "a client on one replica); this replica takes it over once that one stops or its lease runs out."
    )


class StoreUnavailable(CIError):
    code = "store_unavailable"
    default_hint = (
        "The server's shared store of files (STORE_URL) did not answer: try again in a few seconds; files harvested "
        "meanwhile are kept on the server and uploaded once it is back."
    )


class AuthFailed(CIError):
    code = "auth_failed"
    default_hint = "Check OPENAI_API_KEY (or the Azure settings) in the server's environment."


class SessionBusy(CIError):
    code = "session_busy"

    def __init__(self, run_id: str, what: str = "run more code") -> None:
        self.run_id = run_id
        super().__init__(
            f"This session is still running {run_id}; it cannot {what} until that run ends (one run at a time).",
            f"Call get_run(run_id={run_id!r}) to wait for it (waiting again is cheap), cancel_run to stop it, "
            "or use another session.",
        )


class RunLost(CIError):
    code = "run_lost"
    default_hint = "Run the code again; files harvested before stay downloadable (list_container_files)."


class ExecutionTimeout(CIError):
    code = "timeout"
    default_hint = "Raise timeout_s, or split the work into smaller runs."


class SandboxUnavailable(CIError):
    code = "sandbox_unavailable"
    default_hint = (
        "Install bubblewrap (apt-get install bubblewrap) and allow unprivileged user namespaces, or start the "
        "server with --unsafe-no-sandbox to run code without isolation (not recommended)."
    )


class InvalidSchema(CIError):
    code = "invalid_schema"
    default_hint = "Pass a valid JSON Schema object as output_schema, e.g. {'type': 'object', 'properties': {...}}."


class OutputInvalid(CIError):
    code = "output_invalid"
    default_hint = "Make the code's last expression (or the printed JSON block) match the schema."


class BackendError(CIError):
    code = "backend_error"
    default_hint = "See the message; run `code-interpreter-mcp doctor` to check the backend's configuration."


class ResponseMalformed(CIError):
    code = "response_malformed"
    default_hint = "The model's response had an unexpected shape; try again."


class FileSuperseded(CIError):
    """A version past the session's history quota: its copy was dropped; `current_file_id` names the latest."""

    code = "file_superseded"

    def __init__(self, message: str, current_file_id: str | None, hint: str | None = None) -> None:
        self.current_file_id = current_file_id
        if hint is None:
            hint = "Raise CODE_INTERPRETER_FILE_HISTORY_MB to keep more earlier versions."
            if current_file_id is not None:
                hint = f"download_file({current_file_id!r}) returns the current version. " + hint
        super().__init__(message, hint)


class StorageQuota(CIError):
    code = "storage_quota"
    default_hint = (
        "Close sessions whose files are no longer needed with close_session(delete_files=true), or ask the "
        "operator to raise CODE_INTERPRETER_MAX_STORED_MB."
    )


class BadRequirement(BadInput):
    code = "bad_requirement"
    default_hint = (
        'Pass PEP 508 requirement strings naming packages on the index, e.g. "tabulate" or "scikit-learn>=1.5" '
        "(no URLs, local paths or pip options)."
    )


class PackageError(CIError):
    """Base of the errors of installing packages: the server and the session are left as they were."""

    code = "package_error"
    default_hint = "Check the package names and versions, or run without packages."


class PackageNotFound(PackageError):
    code = "package_not_found"
    default_hint = "Check the spelling of the package name (and the version asked for) on the package index."


class PackageNoWheel(PackageError):
    code = "package_no_wheel"
    default_hint = (
        "Ask for a version that publishes a wheel for this platform, or another package; building from source "
        "is off unless the operator sets CODE_INTERPRETER_PACKAGE_ALLOW_BUILDS=true."
    )


class PackageConflict(PackageError):
    code = "package_conflict"
    default_hint = "Loosen or change the version constraints so that one set of versions satisfies them all."


class PackageIndexUnreachable(PackageError):
    code = "package_index_unreachable"
    default_hint = (
        "The package index could not be reached. Offline, point CODE_INTERPRETER_PACKAGE_FIND_LINKS at a local "
        "folder of wheels; otherwise check CODE_INTERPRETER_PACKAGE_INDEX_URL or the proxy settings."
    )


class PackageRefused(PackageError):
    code = "package_refused"
    default_hint = (
        "The operator's policy (CODE_INTERPRETER_PACKAGES, CODE_INTERPRETER_PACKAGE_ALLOWLIST) does not allow "
        "this; run without packages or ask the operator."
    )


class PackageTooLarge(PackageError):
    code = "package_too_large"
    default_hint = "Ask for fewer or smaller packages, or the operator can raise CODE_INTERPRETER_PACKAGE_SET_MAX_MB."


class PackageInstallTimeout(PackageError):
    code = "package_timeout"
    default_hint = (
        "Ask for fewer or smaller packages, or the operator can raise CODE_INTERPRETER_PACKAGE_INSTALL_TIMEOUT_S."
    )


class PackageInstallFailed(PackageError):
    code = "package_install_failed"
    default_hint = "See the installer's message; run `code-interpreter-mcp doctor` to check the package settings."


class PackagesUnsupported(PackageError):
    code = "packages_unsupported"
    default_hint = "Run without packages: this backend cannot install them."


class CapacityError(CIError):
    code = "capacity"
    default_hint = (
        "Every sandbox worker is busy running code: retry in a moment, close sessions you no longer need "
        "(close_session), or raise CODE_INTERPRETER_MAX_LIVE_CONTAINERS (or ..._PER_OWNER)."
    )
