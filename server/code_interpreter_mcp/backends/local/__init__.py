"""The `local` backend: a persistent Python worker per container, isolated with bubblewrap on this host.

Modules, one responsibility each (layered top to bottom):
- `backend`: `LocalBackend`, the Backend protocol as a thin adapter over the parts below.
- `probe`: which isolation works here, proven at start-up by a real worker; the unsafe fallback when allowed.
- `containers`: the record of each container, its folder on the host, the registry (create, resume, delete);
  `uids`: the dedicated uid range and who holds which uid.
- `runs`: one run: send, wait, interrupt at the time limit or on a quota breach. `outcome`: what a run reports
  (a worker's answer, death or kill as an `ExecOutcome`). `streaming`: live output read from the capture files.
- `pool`: the containers' workers: spawn, respawn after death, interrupt-then-kill, stray-process clean-up, and
  the registry of launchers by isolation mode. `capacity`: the caps on live workers, LRU eviction of idle ones,
  the warm spares. `memory`: a container's memory limit for all its processes (cgroup v2, v1, or the RSS
  fallback); `procs`: a worker's process tree seen from the host.
- `quota`: the disk quota from the folder's change events and what a breach does. `folder`: a container's data
  folder (listing and real usage kept by `changes`' inotify tracker over `inotify` and `tree`, uploads,
  downloads) over `files`, the symlink-proof blocking file operations.
- `service`: the backend's background tasks on the event loop (reading inotify, refilling spares).
- `process`: the host end of one worker (frames, interrupt, kill, captured output).
- `launcher`: the "where a worker runs" seam (launch, poll, wait, signal, kill, modelled on Popen);
  `bubblewrap` and `unsandboxed` implement it.
- `sandbox`: what a sandbox consists of (profile, paths, environment, rlimits); `seccomp`: the BPF filter;
  `fonts`: the prebuilt matplotlib font cache.
- Inside the sandbox, stdlib only, loaded by file path: `worker` (start-up, the request loop, process hygiene),
  `cell` (running one cell), `protocol` (the wire format, shared with `process`), `sitepaths` (the session's
  installed package sets on sys.path).

Installed package sets: the store's whole folder of sets is a field of the `LaunchSpec`, bound read-only by
`bubblewrap` (put on the path as it is by `unsandboxed`); each run names its sets (`runs`) and `sitepaths` puts
them first on sys.path, so a set installed later needs no new worker.

Where coming features go: another limit on what a container may hold is a tracker callback like `quota`'s; another
policy of whom to evict or how many spares to keep is `capacity`'s (spares take their folder and uid from
`containers`); a worker that runs elsewhere is a new launcher module and one `pool.LAUNCHERS` entry.
"""

from .backend import LocalBackend

__all__ = ["LocalBackend"]
