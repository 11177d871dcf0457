"""The seccomp filter of a bubblewrap sandbox: a classic-BPF program handed to `bwrap --seccomp FD`.

It refuses namespace creation, mounts, keyrings, bpf, userfaultfd, perf, io_uring and the like (x86_64, aarch64),
and makes `fallocate` unsupported (EOPNOTSUPP, as on a filesystem without it): it reserves disk at about a TB/s, past
any quota watch, while glibc's posix_fallocate then falls back to writing a byte per block, which the disk quota
sees like any writer (quota.py).
This module only builds the program's bytes; how they reach bwrap is bubblewrap.py's business, and whether the
kernel honours them is the probe's.
"""

from __future__ import annotations

import platform
import struct

# Syscalls refused with EPERM. Namespace creation is the important one (the root mode has no --disable-userns);
# the rest is attack surface sandboxed code has no use for.
_DENY = {  # name: (x86_64, aarch64)
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218), "bpf": (321, 280),
    "userfaultfd": (323, 282), "perf_event_open": (298, 241), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "syslog": (103, 116), "open_by_handle_at": (304, 265),
    "acct": (163, 89), "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142), "quotactl": (179, 60),
    "lookup_dcookie": (212, 18),
}  # fmt: skip
# Syscalls answered EOPNOTSUPP: unsupported here, so callers take their portable path.
_UNSUPPORTED = {"fallocate": (285, 47)}  # name: (x86_64, aarch64)
_ARCHES = ("x86_64", "aarch64")
_ARCH = {"x86_64": (0xC000003E, 56, 435), "aarch64": (0xC00000B7, 220, 435)}  # audit arch, clone, clone3
_CLONE_NS_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_EPERM, _ENOSYS, _EOPNOTSUPP = 1, 38, 95
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06


def program(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp filter for `bwrap --seccomp FD`, or None on an architecture we have no table for."""
    machine = machine or platform.machine()
    if machine in ("amd64", "x64"):
        machine = "x86_64"
    if machine == "arm64":
        machine = "aarch64"
    if machine not in _ARCHES:
        return None
    audit_arch, nr_clone, nr_clone3 = _ARCH[machine]
    ins: list[tuple[int, int, int, int]] = []

    def stmt(code: int, k: int) -> None:
        ins.append((code, 0, 0, k))

    def jump(code: int, k: int, jt: int, jf: int) -> None:
        ins.append((code, jt, jf, k))

    stmt(_LD_W_ABS, 4)  # seccomp_data.arch
    jump(_JEQ_K, audit_arch, 1, 0)
    stmt(_RET_K, _RET_ERRNO | _ENOSYS)  # a foreign ABI (e.g. int 0x80 on x86_64)
    stmt(_LD_W_ABS, 0)  # seccomp_data.nr
    if machine == "x86_64":
        jump(_JGE_K, 0x40000000, 0, 1)  # the x32 ABI
        stmt(_RET_K, _RET_ERRNO | _ENOSYS)
    column = _ARCHES.index(machine)
    for nr in sorted(numbers[column] for numbers in _DENY.values()):
        jump(_JEQ_K, nr, 0, 1)
        stmt(_RET_K, _RET_ERRNO | _EPERM)
    for nr in sorted(numbers[column] for numbers in _UNSUPPORTED.values()):
        jump(_JEQ_K, nr, 0, 1)
        stmt(_RET_K, _RET_ERRNO | _EOPNOTSUPP)
    # clone3 hides its flags in memory a filter cannot read: ENOSYS makes glibc fall back to clone.
    jump(_JEQ_K, nr_clone3, 0, 1)
    stmt(_RET_K, _RET_ERRNO | _ENOSYS)
    jump(_JEQ_K, nr_clone, 0, 3)
    stmt(_LD_W_ABS, 16)  # low 32 bits of args[0] (little-endian): the clone flags
    jump(_JSET_K, _CLONE_NS_FLAGS, 0, 1)
    stmt(_RET_K, _RET_ERRNO | _EPERM)
    stmt(_RET_K, _RET_ALLOW)
    return b"".join(struct.pack("=HBBI", *i) for i in ins)
