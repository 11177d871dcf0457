"""What runs inside the sandbox: the worker's REPL and everything it loads, stdlib only.

The server never imports these modules to run them: `worker` is started as a script inside the sandbox (or bare in
unsafe mode) and loads its siblings by file path under private names, so nothing of the server's package is
importable in there. Only `protocol` (the wire format) is also imported on the host side, by `workers.process` and
`sandbox.bubblewrap`, and `snapshot`/`restore` for their shared limits and wording, by `workers.snapshots`.
- `worker`: start-up, the request loop, process hygiene.
- `cell`: running one cell (compile, run, output capture, the interrupt).
- `protocol`: the frames between worker and host, and the output budget split.
- `sitepaths`: the session's installed package sets on sys.path.
- `snapshot` / `restore`: the namespace saved after runs (a forked child streams it to the host), and loaded into
  a new worker before its first run.
- `charts`: what a saved matplotlib figure shows, read from its artists (type, labels, the values plotted).
- `display`: rich outputs (`display()`, the last value's MIME bundle, `plt.show()`, PIL's `show()`), in order;
  `frames`: a DataFrame's markdown and first rows as data.
- `magics`: `!`/`%` lines through IPython's transformer, and the small `get_ipython()` shell that answers them.

Where coming features go: anything that must run next to the user's variables (a
display hook) is a new stdlib-only module here, listed in `KERNEL_FILES` so the sandbox mounts it.
"""

from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
# Mounted side by side into the sandbox (sandbox.bubblewrap); the worker loads the others by file path.
KERNEL_FILES = (
    "worker.py",
    "cell.py",
    "protocol.py",
    "sitepaths.py",
    "magics.py",
    "snapshot.py",
    "restore.py",
    "charts.py",
    "display.py",
    "frames.py",
)
