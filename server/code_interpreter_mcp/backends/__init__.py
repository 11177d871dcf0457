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
EXTRAS: dict[str, str] = {"openai": "openai"}  # backend -> the package extra (and top-level module) it needs


def create_backend(settings: Settings) -> Backend:
    """Instantiate the backend named by settings.backend: `cls(settings)`."""
    try:
        target = BACKENDS[settings.backend]
    except KeyError:
        raise ValueError(f"unknown backend {settings.backend!r}; known: {', '.join(BACKENDS)}") from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get(settings.backend)
        if extra is None or exc.name is None or exc.name.split(".")[0] != extra:
            raise
        from ..errors import BadInput

        raise BadInput(
            f"The {settings.backend} backend needs the `{extra}` extra, which is not installed.",
            f"Install it with: pip install 'code-interpreter-mcp[{extra}]' (or uv tool install "
            f"'code-interpreter-mcp[{extra}]'), then start the server again.",
        ) from None
    return getattr(module, cls_name)(settings)  # type: ignore[no-any-return]
