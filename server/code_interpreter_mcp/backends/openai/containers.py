"""Explicit containers through the Containers API: create, refresh (retrieve), delete.

Never `{"type": "auto"}` (it bills a container per request and hides its id). Times and status come from the
API, not a local clock: `expires_at = last_active_at + expires_after.minutes * 60`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import replace
from typing import Any

import openai
from openai import AsyncOpenAI

from ..base import ContainerState
from .failures import Scrubber, is_expired_message, map_exception, status_message

USABLE_STATUSES = {"running", "active"}  # the docstring says "active", the docs examples show "running"


def _number(value: Any, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return default


def state_from_api(
    obj: Any, fallback: ContainerState | None = None, fallback_expires_s: float = 1200.0
) -> ContainerState:
    """A ContainerState from a container object (create/retrieve), defensively: fields may be missing."""
    now = time.time()
    created = _number(getattr(obj, "created_at", None), fallback.created_at if fallback else now)
    last = _number(getattr(obj, "last_active_at", None), fallback.last_active_at if fallback else created)
    expires = getattr(obj, "expires_after", None)
    minutes = _number(getattr(expires, "minutes", None), -1.0)
    expires_s = minutes * 60.0 if minutes > 0 else (fallback.expires_after_s if fallback else fallback_expires_s)
    raw_status = str(getattr(obj, "status", "") or "unknown")
    status = "running" if raw_status.lower() in USABLE_STATUSES else raw_status.lower()
    extra = dict(fallback.extra) if fallback else {}
    extra.update({"api_status": raw_status, "name": getattr(obj, "name", None)})
    memory = getattr(obj, "memory_limit", None)
    if memory:
        extra["memory_limit"] = memory
    return ContainerState(
        id=str(getattr(obj, "id", fallback.id if fallback else "")),
        backend="openai",
        created_at=created,
        last_active_at=last,
        expires_after_s=expires_s,
        status=status,
        isolation="remote",
        extra=extra,
    )


def container_name(session_id: str) -> str:
    """A name that groups a session's containers without revealing its (secret) id to the provider."""
    return "code-interpreter-mcp-" + hashlib.sha256(session_id.encode()).hexdigest()[:12]


async def create(
    client: AsyncOpenAI, session_id: str, expires_after_s: float, memory_limit: str, scrub: Scrubber
) -> ContainerState:
    minutes = max(1, math.ceil(expires_after_s / 60.0))
    try:
        obj = await client.containers.create(
            name=container_name(session_id),
            expires_after={"anchor": "last_active_at", "minutes": minutes},
            memory_limit=memory_limit,  # type: ignore[arg-type]  # validated by Settings' Literal
        )
    except Exception as exc:
        raise map_exception(exc, "creating a container", scrub) from None
    return state_from_api(obj, fallback_expires_s=minutes * 60.0)


async def refresh(client: AsyncOpenAI, container: ContainerState, scrub: Scrubber) -> ContainerState:
    """The container as the API sees it now. An expired or vanished container comes back with status
    "expired" instead of raising; other failures raise."""
    try:
        obj = await client.containers.retrieve(container.id)
    except openai.NotFoundError:
        return replace(container, status="expired", extra={**container.extra, "api_status": "not_found"})
    except openai.BadRequestError as exc:
        if is_expired_message(status_message(exc)):
            return replace(container, status="expired", extra={**container.extra, "api_status": "expired"})
        raise map_exception(exc, "checking the container", scrub, container_op=True) from None
    except Exception as exc:
        raise map_exception(exc, "checking the container", scrub, container_op=True) from None
    return state_from_api(obj, fallback=container)


async def delete(client: AsyncOpenAI, container: ContainerState, scrub: Scrubber) -> None:
    """Delete; a container that is already gone or expired counts as deleted."""
    try:
        await client.containers.delete(container.id)
    except openai.NotFoundError:
        return
    except openai.BadRequestError as exc:
        if is_expired_message(status_message(exc)):
            return
        raise map_exception(exc, "deleting the container", scrub) from None
    except Exception as exc:
        raise map_exception(exc, "deleting the container", scrub) from None
