"""Dedicated host uids for containers (the root server's "bwrap-root" mode): the range, and who holds which.

A uid belongs to a container's data folder (the folder is chowned to it, and a container resumed after a restart
is known by its folder's owner), not to one worker: every worker the container gets runs as it. The registry of
containers claims and releases uids here; nothing here knows folders or workers.
"""

from __future__ import annotations

import secrets

# Per-container uids are drawn at random from [UID_BASE, UID_BASE + UID_SPAN): far from real users, system ranges
# and systemd's dynamic/nspawn ranges, and random so that two servers on one host rarely share one.
UID_BASE = 0x70000000
UID_SPAN = 1 << 24


def uid_range_mapped(base: int = UID_BASE, span: int = UID_SPAN) -> bool:
    """Whether [base, base+span) is mapped in our user namespace (false inside a rootless container)."""
    try:
        with open("/proc/self/uid_map") as fh:
            for line in fh:
                inside, _outside, count = (int(x) for x in line.split())
                if inside <= base and base + span <= inside + count:
                    return True
    except (OSError, ValueError):
        return False
    return False


class UidAllocator:
    """The dedicated uids this server's containers hold (uid = gid)."""

    def __init__(self) -> None:
        self._held: set[int] = set()

    def allocate(self, dedicated: bool) -> tuple[int | None, int | None]:
        """A fresh (uid, gid), or (None, None) when containers run as the server's own uid."""
        if not dedicated:
            return None, None
        while True:
            uid = UID_BASE + secrets.randbelow(UID_SPAN)
            if uid not in self._held:
                self._held.add(uid)
                return uid, uid

    def claim(self, uid: int) -> bool:
        """Take a uid found on disk (a resumed container); False when it is outside the range or already held."""
        if not (UID_BASE <= uid < UID_BASE + UID_SPAN) or uid in self._held:
            return False
        self._held.add(uid)
        return True

    def release(self, uid: int | None) -> None:
        if uid is not None:
            self._held.discard(uid)
