"""The sandbox a worker runs in, whoever starts it: nothing here knows containers, runs or the pool.

- `profile`: what a sandbox consists of (the isolation mode chosen at start-up, paths, the scrubbed environment,
  rlimits, passwd/group); `seccomp`: the BPF filter; `fonts`: the prebuilt matplotlib font cache.
- `launcher`: the "where a worker runs" seam (launch, poll, wait, signal, kill, modelled on Popen);
  `bubblewrap` (mounts, namespaces, the bwrap command line) and `unsandboxed` implement it.
- `memory`: a container's memory limit for all its processes (cgroup v2, v1, or the RSS fallback); `procs`: a
  worker's process tree seen from the host; `uids`: the dedicated uid range and who holds which uid.

Depends only on `kernel` (the files it mounts, the wire format). Another way to isolate a worker is a new
launcher module here and one `workers.pool.LAUNCHERS` entry.
"""
