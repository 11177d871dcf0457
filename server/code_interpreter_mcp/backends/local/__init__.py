"""The `local` backend: a persistent Python worker per container, isolated with bubblewrap on this host.

Sub-packages by responsibility (each `__init__` says what it owns), layered so that none imports upwards:
- `kernel`: what runs inside the sandbox (the worker's REPL, cells, output capture), stdlib only.
- `sandbox`: the sandbox itself (profile, bubblewrap mounts and namespaces, seccomp, memory limits, rlimits, uids).
- `tracking`: a container's data folder from the host (inotify change tracking, listing, symlink-proof file ops).
- `workers`: containers and their workers (pool, caps and eviction, warm spares, one run, quota, the probe).
- `backend`: `LocalBackend`, the Backend protocol as a thin adapter over the parts above.

Installed package sets: the store's whole folder of sets is a field of the `LaunchSpec`, bound read-only by
`sandbox.bubblewrap` (put on the path as it is by `sandbox.unsandboxed`); each run names its sets
(`workers.runs`) and `kernel.sitepaths` puts them first on sys.path, so a set installed later needs no new worker.
"""

from .backend import LocalBackend

__all__ = ["LocalBackend"]
