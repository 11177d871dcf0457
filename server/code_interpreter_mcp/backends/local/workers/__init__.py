"""The containers' workers seen from the host: the registry, the pool, the caps, one run, and start-up's probe.

- `containers`: the record of each container, its folder on the host, the registry (create, resume, delete).
- `pool`: spawn, respawn after death, interrupt-then-kill, stray-process clean-up, the launchers by isolation mode;
  `process`: the host end of one worker (frames, interrupt, kill, captured output).
- `capacity`: the caps on live workers, LRU eviction of idle ones, the warm spares.
- `runs`: one run: send, wait, interrupt at the time limit or on a quota breach; `outcome`: what a run reports (a
  worker's answer, death or kill as an `ExecOutcome`); `streaming`: live output read from the capture files.
- `quota`: what a breach of the data folder's quota does to the run and the worker.
- `service`: the backend's background tasks on the event loop (reading inotify, refilling spares).
- `probe`: which isolation works here, proven at start-up by a real worker.

Uses `sandbox` (how a worker is started), `tracking` (its folder) and `kernel.protocol` (the frames). Another
policy of whom to evict or how many spares to keep is `capacity`'s; restoring a container's state into a new worker
belongs with `pool`'s spawn.
"""
