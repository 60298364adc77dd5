"""Finding the agent sockets that sshd forwarded for our live sessions,
and checking the local agents the user named (``--local-agent``).

Pure file-system inspection, no I/O on the sockets themselves: whether a
candidate is alive is the prober's business. Everything here uses ``lstat``
and ``scandir`` without following symlinks, so a planted link can never
lead us to somebody else's socket.
"""

from __future__ import annotations

import enum
import hashlib
import os
import socket
import stat

import attrs

# OpenSSH misc-agent.c: the host hash in 10.1+ socket names is the first 10
# characters of SHA-512(gethostname()), each digest byte mapped onto this
# alphabet by ``byte % 62``.
_HOST_HASH_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_HOST_HASH_LEN = 10

# Name shapes from OpenSSH: session.c (before 10.1) makes a mkdtemp
# directory ``ssh-XXXXXXXXXX`` holding ``agent.<sshd pid>``; misc-agent.c
# (10.1+) names sockets ``s.<hosthash>.<tag>.<random>`` in ~/.ssh/agent.
_LEGACY_DIR_PREFIX = "ssh-"
_LEGACY_SOCKET_PREFIX = "agent."
_AGENT_DIR_PREFIX = "s."
_FORWARDED_TAG = "sshd"

# Which entries matter in the directories a scan looks into: whoever
# watches them for changes can ignore everything else (a busy /tmp).
AGENTS_DIR_PREFIXES = (_LEGACY_DIR_PREFIX, _AGENT_DIR_PREFIX)
SESSION_DIR_PREFIXES = (_LEGACY_SOCKET_PREFIX,)


class Layout(enum.Enum):
    """Which OpenSSH naming scheme a candidate socket follows."""

    TMP = "tmp"  # /tmp/ssh-*/agent.* (OpenSSH before 10.1)
    AGENT_DIR = "agent-dir"  # ~/.ssh/agent/s.<hash>.sshd.* (OpenSSH 10.1 and later)
    LOCAL = "local"  # a local agent named with --local-agent: the last resort


def host_hash(hostname: str | bytes | None = None) -> str:
    """The 10-character host tag OpenSSH 10.1+ puts in agent socket names."""
    if hostname is None:
        hostname = socket.gethostname()
    if isinstance(hostname, str):
        hostname = hostname.encode()
    digest = hashlib.sha512(hostname).digest()
    return "".join(
        _HOST_HASH_ALPHABET[b % len(_HOST_HASH_ALPHABET)] for b in digest[:_HOST_HASH_LEN]
    )


@attrs.frozen
class Candidate:
    """A socket that looks like a forwarded agent of ours, or a local agent named to us.

    A local agent is a candidate whether or not its socket is there: it is
    reported on every scan, with dev and ino 0 while its socket is missing,
    and with ``refused`` saying why, when its path fails a safety check.
    """

    path: str
    layout: Layout
    dev: int
    ino: int
    ctime: float  # when the socket was made: the session's age, for ranking
    order: int = 0  # a local agent's place among --local-agent flags
    refused: str | None = None  # why we must not connect to it (local agents only)

    @property
    def missing(self) -> bool:
        return (self.dev, self.ino) == (0, 0)


@attrs.frozen
class Skipped:
    path: str
    reason: str


@attrs.frozen
class ScanResult:
    candidates: tuple[Candidate, ...]
    # Only entries that looked like agent sockets are listed; unrelated files
    # in a shared /tmp are not even stat'ed.
    skipped: tuple[Skipped, ...]
    # Directories we looked into (or would have, had they existed), each with
    # the prefixes of the entry names that matter there: what to watch for
    # the next change.
    watched: tuple[tuple[str, tuple[str, ...]], ...]
    errors: tuple[Skipped, ...]


@attrs.frozen
class ScanSettings:
    agents_dirs: tuple[str, ...]
    uid: int
    host_hash: str
    # (st_dev, st_ino) of our own listening sockets: never relay to ourselves.
    exclude: frozenset[tuple[int, int]] = frozenset()
    # Local agents' sockets (absolute, expanded), in the order given.
    local_agents: tuple[str, ...] = ()


def _socket_problem(st: os.stat_result, settings: ScanSettings) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if not stat.S_ISSOCK(st.st_mode):
        return "not a socket"
    if st.st_uid != settings.uid:
        return f"owned by uid {st.st_uid}"
    if (st.st_dev, st.st_ino) in settings.exclude:
        return "our own socket"
    return None


def _parent_problem(st: os.stat_result, settings: ScanSettings) -> str | None:
    """Whether a local agent's directory lets others swap its socket (/tmp's sticky bit won't)."""
    if st.st_uid not in (settings.uid, 0):
        return f"directory owned by uid {st.st_uid}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return "directory writable by group or others"
    return None


def _local_candidate(path: str, order: int, settings: ScanSettings) -> Candidate:
    """A local agent as it is now: present, missing (dev and ino 0), or refused and why."""
    try:
        parent = os.stat(os.path.dirname(path))
        st = os.lstat(path)
    except FileNotFoundError:
        # Not started yet, or stopped: still a candidate, tried as a last resort.
        return Candidate(path, Layout.LOCAL, 0, 0, 0.0, order)
    except OSError as exc:
        return Candidate(path, Layout.LOCAL, 0, 0, 0.0, order, exc.strerror or "lstat failed")
    problem = _socket_problem(st, settings) or _parent_problem(parent, settings)
    return Candidate(path, Layout.LOCAL, st.st_dev, st.st_ino, st.st_ctime, order, problem)


def _dir_problem(st: os.stat_result, settings: ScanSettings) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != settings.uid:
        return f"directory owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        # sshd's mkdtemp makes it 0700; a writable one could hold a planted socket.
        return "directory writable by group or others"
    return None


class _Scan:
    def __init__(self, settings: ScanSettings) -> None:
        self.settings = settings
        self.candidates: list[Candidate] = []
        self.skipped: list[Skipped] = []
        self.watched: list[tuple[str, tuple[str, ...]]] = []
        self.errors: list[Skipped] = []
        self.forwarded_prefix = f"{_AGENT_DIR_PREFIX}{settings.host_hash}.{_FORWARDED_TAG}."

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append(Skipped(path, reason))

    def consider_socket(self, path: str, layout: Layout) -> None:
        try:
            st = os.lstat(path)
        except OSError as exc:  # vanished between listing and lstat
            self.skip(path, exc.strerror or "lstat failed")
            return
        problem = _socket_problem(st, self.settings)
        if problem is not None:
            self.skip(path, problem)
            return
        self.candidates.append(Candidate(path, layout, st.st_dev, st.st_ino, st.st_ctime))

    def scan_legacy_dir(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except OSError as exc:
            self.skip(path, exc.strerror or "lstat failed")
            return
        problem = _dir_problem(st, self.settings)
        if problem is not None:
            self.skip(path, problem)
            return
        self.watched.append((path, SESSION_DIR_PREFIXES))
        try:
            with os.scandir(path) as entries:
                names = [e.name for e in entries if e.name.startswith(_LEGACY_SOCKET_PREFIX)]
        except OSError as exc:
            self.errors.append(Skipped(path, exc.strerror or "cannot list"))
            return
        for name in sorted(names):
            self.consider_socket(os.path.join(path, name), Layout.TMP)

    def scan_agents_dir(self, top: str) -> None:
        # Watched even when missing: ~/.ssh/agent does not exist until
        # OpenSSH 10.1 makes it. The configured dir itself may be a symlink
        # (/tmp on some hosts): scandir follows it.
        self.watched.append((top, AGENTS_DIR_PREFIXES))
        try:
            with os.scandir(top) as entries:
                names = [e.name for e in entries]
        except FileNotFoundError:
            return
        except OSError as exc:
            self.errors.append(Skipped(top, exc.strerror or "cannot list"))
            return
        for name in sorted(names):
            if name.startswith(_LEGACY_DIR_PREFIX):
                self.scan_legacy_dir(os.path.join(top, name))
            elif name.startswith(_AGENT_DIR_PREFIX):
                path = os.path.join(top, name)
                if name.startswith(self.forwarded_prefix):
                    self.consider_socket(path, Layout.AGENT_DIR)
                elif f".{_FORWARDED_TAG}." in name:
                    self.skip(path, "forwarded for a different host")
                else:
                    self.skip(path, "not a forwarded agent")


def scan(settings: ScanSettings) -> ScanResult:
    """Look through the agents dirs once and list the forwarded agents found."""
    state = _Scan(settings)
    seen: set[str] = set()
    for top in settings.agents_dirs:
        real = os.path.realpath(top)  # "/tmp", "/tmp/" and an alias are one dir
        if real in seen:
            continue
        seen.add(real)
        state.scan_agents_dir(top)
    local = [_local_candidate(p, i, settings) for i, p in enumerate(settings.local_agents)]
    # A local agent named to us is local, even where a forwarded one could be
    # (ssh-agent's own sockets in /tmp look just like sshd's).
    named = {(c.dev, c.ino) for c in local if not c.missing}
    forwarded = [c for c in state.candidates if (c.dev, c.ino) not in named]
    # A local agent's socket may come, go or be replaced (ssh-agent restarted):
    # its directory is watched for its name.
    watched = [
        *state.watched,
        *((os.path.dirname(p) or ".", (os.path.basename(p),)) for p in settings.local_agents),
    ]
    return ScanResult(
        candidates=(*forwarded, *local),
        skipped=tuple(state.skipped),
        watched=tuple(watched),
        errors=tuple(state.errors),
    )
