"""Removing a directory tree however deep, wide or hostile it is, so clean-up always reclaims the disk.

Python 3.11's `shutil.rmtree` recurses once per level and joins full paths: code in a sandbox that makes a
1,000-level tree hits the recursion limit (or PATH_MAX), and with `ignore_errors` the disk is silently never
reclaimed. This walk is iterative and holds one directory descriptor at a time: it descends by name relative to
the current directory (never following a symlink), climbs back through "..", checks that it arrived where it
came from (device and inode), and removes each emptied directory from its parent. Directories the code made
unreadable are given back their owner's permissions first. Knows nothing of containers, sessions or files'
meaning.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int | None) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        # A directory chmod'ed to 000 by the code that made it: open it as a path only, give it back rwx.
        path_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.chmod(f"/proc/self/fd/{path_fd}", 0o700)
        finally:
            os.close(path_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _empty_files(fd: int) -> str | None:
    """Unlink every non-directory in `fd`; the name of one subdirectory left, or None when it is empty."""
    st = os.fstat(fd)
    if st.st_mode & 0o700 != 0o700:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
    return None


def remove_tree_strict(path: Path) -> None:
    """Remove `path` (a file, a symlink or a directory tree); raise OSError when something stays."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        os.unlink(path)
        return
    fd = _open_dir(str(path), None)
    trail: list[tuple[int, int]] = [(top.st_dev, top.st_ino)]
    names: list[str] = []
    try:
        while True:
            child = _empty_files(fd)
            if child is not None:
                child_fd = _open_dir(child, fd)
                st = os.fstat(child_fd)
                os.close(fd)
                fd = child_fd
                trail.append((st.st_dev, st.st_ino))
                names.append(child)
                continue
            if not names:
                break
            name = names.pop()
            trail.pop()
            parent_fd = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent_fd
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != trail[-1]:
                raise OSError(f"the tree under {path} moved while it was being removed")
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def remove_tree(path: Path | str) -> None:
    """Remove `path` best-effort, as `shutil.rmtree(ignore_errors=True)` did, but at any depth; what could not
    be removed is logged, never raised."""
    try:
        remove_tree_strict(Path(path))
    except OSError as exc:
        logger.warning("could not remove %s completely: %s", path, exc)
