"""The `local` backend: a persistent Python worker per container, isolated with bubblewrap on this host."""

from .backend import LocalBackend

__all__ = ["LocalBackend"]
