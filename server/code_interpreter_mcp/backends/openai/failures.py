"""Turning openai SDK and transport exceptions into the project's error taxonomy, with secrets scrubbed.

Every CIError raised by this package is built here (or with `Scrubber`), and raised `from None`: a chained SDK
exception could carry the API key (a 401 message echoes it) into a logged traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx2
import openai

from ... import errors

EXPIRED_MARKER = "container is expired"
MAX_RETRY_AFTER_S = 120.0  # the SDK's own ceiling: a longer server delay means "do not retry"


class Scrubber:
    """Removes the configured secrets (whatever their shape) and anything key-like from a text."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return errors.redact(text)


def status_message(exc: openai.APIStatusError) -> str:
    """The API's own error message (the `error.message` of the body), else the SDK's text."""
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return body["message"]
    return exc.message or str(exc)


def is_expired_message(message: str | None) -> bool:
    return bool(message) and EXPIRED_MARKER in str(message).lower()


def retry_after_s(headers: Any) -> float | None:
    """Server-directed delay from retry-after-ms / retry-after (seconds); None when absent or unparsable."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)
        except ValueError:
            continue
    return None


def reported_failure(body: dict[str, Any], scrub: Scrubber, when: str, default: str) -> errors.CIError:
    """The error an API failure reported in a payload (a failed response, an `error` stream event) stands for.
    `when` says where it happened ("while the code ran"); `default` is the message when the body has none."""
    message = scrub(str(body.get("message") or default))
    code = str(body.get("code") or "")
    if is_expired_message(message):
        return errors.ContainerExpired(f"The container expired {when}: {message}")
    if code == "rate_limit_exceeded":
        return errors.RateLimited(f"Rate limited {when}: {message}")
    if code in ("", "server_error"):
        return errors.UpstreamUnavailable(f"The API failed {when}: {message}")
    return errors.BackendError(f"The API reported an error {when} ({code}): {message}")


def map_exception(exc: BaseException, what: str, scrub: Scrubber, *, container_op: bool = False) -> errors.CIError:
    """Classify an SDK or transport exception raised while doing `what` (e.g. "listing files").

    container_op: the request's path is the container's own, so a bare 404 means the container is gone
    (ContainerExpired). Elsewhere (responses.create) a 404 only means that when its message names a container.
    """
    if isinstance(exc, errors.CIError):
        return exc
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = scrub(status_message(exc))
        if is_expired_message(message):
            return errors.ContainerExpired(f"The container expired ({what}): {message}")
        if status in (401, 403):
            return errors.AuthFailed(f"The API refused the credentials while {what} (HTTP {status}): {message}")
        if status == 404:
            low = message.lower()
            if "file" in low:
                return errors.FileNotFound(f"Not found while {what}: {message}")
            if "model" in low or "deployment" in low:
                return errors.BackendError(
                    f"The API does not know the model while {what}: {message}",
                    hint="Set CODE_INTERPRETER_OPENAI_MODEL (or the Azure deployment) to a model that supports "
                    "the code_interpreter tool.",
                )
            if "container" in low or container_op:
                return errors.ContainerExpired(f"The container no longer exists ({what}): {message}")
            return errors.BackendError(
                f"Not found while {what} (HTTP 404): {message}",
                hint="Check OPENAI_BASE_URL (or the Azure endpoint and API version): the endpoint may not serve "
                "the Responses and Containers APIs.",
            )
        if status == 429:
            wait = retry_after_s(exc.response.headers)
            hint = f"Wait {wait:.0f} s and try again." if wait and wait >= 1 else None
            return errors.RateLimited(f"Rate limited while {what}: {message}", hint=hint)
        if status >= 500 or status == 408:
            return errors.UpstreamUnavailable(f"The API failed while {what} (HTTP {status}): {message}")
        return errors.BackendError(f"The API rejected the request while {what} (HTTP {status}): {message}")
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return errors.UpstreamUnavailable(f"The API timed out while {what}.")
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        detail = scrub(str(exc.__cause__ or exc)) if isinstance(exc, openai.APIConnectionError) else scrub(str(exc))
        return errors.UpstreamUnavailable(
            f"Could not reach the API while {what}: {detail or type(exc).__name__}",
            hint="Check the network and OPENAI_BASE_URL / the Azure endpoint, then try again.",
        )
    if isinstance(exc, openai.APIError):
        return errors.BackendError(f"The API failed while {what}: {scrub(exc.message)}")
    return errors.BackendError(f"Unexpected failure while {what}: {type(exc).__name__}: {scrub(str(exc))}")


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: 408/409/429/5xx, timeouts, connection errors, streams cut mid-body."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError | httpx2.TransportError)
