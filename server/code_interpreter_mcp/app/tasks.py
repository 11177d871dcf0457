"""MCP tasks over the engine's runs."""

from __future__ import annotations

from contextvars import ContextVar

_task_call: ContextVar[bool] = ContextVar("task_call", default=False)


def task_requested() -> bool:
    """Whether the tool call being handled was made as a task (the run then returns at once)."""
    return _task_call.get()
