"""Process hygiene, as OpenSSH's ssh-agent does it."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

# linux/prctl.h
_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def disable_ptrace() -> bool:
    """Make this process non-dumpable: no core dumps, no ptrace by other same-uid processes.

    Key material and passphrases pass through our buffers; ssh-agent does the
    same (``prctl(PR_SET_DUMPABLE, 0)``). Returns whether it took effect
    (False off Linux or if libc cannot be loaded).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        return False
    return bool(libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open descriptors to the hard limit; return (old, new).

    Every relayed connection holds two descriptors (client and backend), so
    the common soft limit of 1024 caps us near 500 concurrent clients while
    the hard limit is usually far higher. Running out is handled (accept
    backs off, clients get FAILURE), but there is no reason to run out early.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard
