"""Installed package sets on the worker's sys.path, INSIDE the sandbox: a run names the session's sets (relative
to the store folder the launcher bound, `cfg["packages_dir"]`), and the worker puts them first on sys.path and
drops sets it no longer names, before the cell runs. Loaded by worker.py by file path: stdlib only.

A set's folder goes on sys.path directly, never through `site.addsitedir`, so `.pth` files in it never run. A
module already imported from somewhere else that a newly added set also provides cannot be swapped in a live
interpreter: the run gets a warning naming it (the new version takes effect after a restart of the session)
rather than a silent mix of two versions. Unchanged sets cost one list comparison per run.
"""

from __future__ import annotations

import importlib
import os
import sys

_SKIP_SUFFIXES = (".dist-info", ".data", ".pth", ".egg-info")


class Sets:
    """The sets this worker has put on sys.path, in order."""

    def __init__(self, root: str | None) -> None:
        self.root = root
        self.current: list[str] = []
        self.names: object = None  # as the last run named them

    def use(self, names: object) -> list[str]:
        """Make exactly the named sets importable, first on sys.path; warnings for modules that stay stale."""
        if names == self.names or (not names and not self.current):
            return []
        wanted = self._paths(names)
        self.names = names
        if wanted == self.current:
            return []
        added = [p for p in wanted if p not in self.current]
        before = [p for p in sys.path if p not in wanted]  # where modules imported so far came from
        for path in self.current:
            if path not in wanted:
                _remove(path)
        for path in reversed(wanted):
            _remove(path)
            sys.path.insert(0, path)
        self.current = wanted
        importlib.invalidate_caches()
        warnings: list[str] = []
        for path in added:
            warnings.extend(_stale_modules(path, before))
        return warnings

    def _paths(self, names: object) -> list[str]:
        if not isinstance(names, list) or not names:
            return []
        if self.root is None:
            raise RuntimeError("this worker has no package store mounted")
        paths = []
        for name in names:
            # The host names sets as <key>/site; nothing may point outside the store.
            if not isinstance(name, str) or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"bad package set name {name!r}")
            path = os.path.join(self.root, name)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"package set {name!r} is not in the store")
            paths.append(path)
        return paths


def _remove(path: str) -> None:
    while path in sys.path:
        sys.path.remove(path)


def _top_level_names(path: str) -> set[str]:
    """The importable top-level names a set folder provides (packages, modules, extension modules)."""
    names = set()
    try:
        entries = os.listdir(path)
    except OSError:
        return names
    for entry in entries:
        if entry.startswith((".", "__pycache__")) or entry.endswith(_SKIP_SUFFIXES):
            continue
        if os.path.isdir(os.path.join(path, entry)):
            if entry.isidentifier():
                names.add(entry)
        elif entry.endswith((".py", ".so", ".pyd")):
            names.add(entry.split(".", 1)[0])
    return names


def _same_file(a: str, b: str) -> bool:
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


def _stale_modules(path: str, entries: list[str]) -> list[str]:
    """Warnings for modules imported before from elsewhere that the set at `path` provides in another version.
    The same file at the same place relative to its sys.path entry is the same version: no warning."""
    warnings = []
    for name in sorted(_top_level_names(path)):
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None) if module is not None else None
        if not isinstance(where, str):
            continue
        where = os.path.abspath(where)
        if where.startswith(path + os.sep):
            continue
        entry = next((e for e in entries if e and where.startswith(os.path.abspath(e) + os.sep)), None)
        if entry is not None and _same_file(where, os.path.join(path, os.path.relpath(where, entry))):
            continue
        warnings.append(
            f"module {name!r} was already imported from {os.path.dirname(where)}; this session keeps using that "
            "version until it restarts (close_session, then run again) and the version in its packages takes "
            "effect"
        )
    return warnings
