"""A container's data folder seen from the host: what is in it, what changed, and symlink-proof file operations.

- `folder`: the data folder (listing and real usage, uploads, downloads); `files`: the blocking file operations
  that never follow a link out of the folder.
- `changes`: the inotify change tracker that keeps the listing and usage without rescans; `inotify`: the kernel
  interface; `index`: the folder's entries by path; `tree`: scans, snapshots and diffs (the fallback when inotify
  is unavailable or overflows).

Depends on nothing else of the local backend. The disk quota is a tracker callback (`tracker.set_quota`), enforced
by `workers.quota`, which can stop workers; another limit on what a folder may hold is another such callback.
"""
