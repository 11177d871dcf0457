"""The operator's unsafe no-sandbox mode (unsafe_no_sandbox): the worker runs as a bare child of the server.

Only rlimits and a scrubbed environment apply: the code can read and write this user's files and use the network.
The probe selects this only when bubblewrap does not work and the operator opted in; nothing here decides that.
"""

from __future__ import annotations

import contextlib
import os
import signal

from . import profile as sandbox
from .launcher import LaunchedWorker, LaunchSpec, PopenWorker, WorkerFds, pidfd, popen, signal_pid, worker_config


class UnsandboxedLauncher:
    """Starts the worker with the server's own interpreter, in the container's data folder, with nothing around it."""

    sandboxed = False

    async def launch(self, spec: LaunchSpec, fds: WorkerFds, log_fd: int) -> LaunchedWorker:
        tmp = str(spec.root / "tmp")
        mplconfigdir = str(spec.root / "tmp" / "matplotlib")
        cfg = worker_config(
            spec,
            fds,
            workdir=str(spec.data),
            mplconfigdir=mplconfigdir,
            mpl_cache=str(spec.mpl_cache) if spec.mpl_cache else None,
            may_kill_strays=False,
            packages_dir=str(spec.packages) if spec.packages is not None else None,
        )
        env = sandbox.sandbox_env(home=tmp, tmp=tmp, mplconfigdir=mplconfigdir, threads=spec.threads)
        argv = sandbox.worker_command(str(sandbox.WORKER_FILE), cfg)
        return BareWorker(popen(argv, env, str(spec.data), log_fd, fds.all()))


class BareWorker(PopenWorker):
    """The child process is the worker itself; its process group holds what it started."""

    sandboxed = False

    async def post_launch(self) -> None:
        self.worker_pid = self.popen.pid
        self._worker_pidfd = pidfd(self.popen.pid)

    def _kill_tree(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if self.popen.poll() is None:
                os.killpg(self.popen.pid, signal.SIGKILL)
        signal_pid(self._popen_pidfd, self.popen.pid, signal.SIGKILL)

    def pids(self) -> dict[str, int]:
        return {"worker": self.popen.pid}
