"""Registry of backends. Each entry is imported only when chosen, so the local backend never imports openai."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Settings
    from .base import Backend

BACKENDS: dict[str, str] = {
    "local": "code_interpreter_mcp.backends.local:LocalBackend",
    "openai": "code_interpreter_mcp.backends.openai:OpenAIBackend",
}


def create_backend(settings: Settings) -> Backend:
    """Instantiate the backend named by settings.backend: `cls(settings)`."""
    try:
        target = BACKENDS[settings.backend]
    except KeyError:
        raise ValueError(f"unknown backend {settings.backend!r}; known: {', '.join(BACKENDS)}") from None
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(settings)
