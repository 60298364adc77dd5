"""The machine side of the end-to-end harness: the test user, short directories, polling.

Everything here is synchronous except the few helpers that wait inside a trio test; the
session-scoped fixtures that use it run outside any event loop (pytest-trio gives every
test its own `trio.run`), so they poll with plain deadlines.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

if TYPE_CHECKING:
    import signal
    from collections.abc import Callable, Sequence

# The account the suite logs in as. Overridable so that two people sharing a machine
# (or a developer next to CI) do not sweep each other's processes.
USER_NAME = os.environ.get("SWITCHER_E2E_USER", "swe2e")

# Tools the suite drives. sshd must be called by absolute path: it re-executes itself and
# refuses to start otherwise.
SSHD = Path("/usr/sbin/sshd")
# The interpreter the test user runs switcher with. The test venv's python lives under
# /root (mode 0700), which the test user cannot execute; Debian's own python is readable
# by everyone.
SYSTEM_PYTHON = Path("/usr/bin/python3")
CLIENT_TOOLS = ("ssh", "ssh-agent", "ssh-add", "ssh-keygen", "tmux", "setsid", "pkill", "pgrep")
ACCOUNT_TOOLS = ("useradd", "usermod")

# How often polling loops look again. Small enough that waits end soon after the
# condition holds, large enough not to load a 2-core CI machine.
POLL_INTERVAL = 0.05

# Bounds for teardown, which must finish even when the thing being torn down misbehaves.
# These are hang guards, not expectations about speed.
TEARDOWN_GRACE = 10.0

# Where a process whose parent is gone may linger as a zombie: in a container, PID 1 does
# not always reap. A zombie holds no resources, so it counts as stopped.
_ZOMBIE_STATES = frozenset({"Z", "X"})


def missing_prerequisites() -> list[str]:
    """Say what this machine lacks for the end-to-end suite, in words fit for a skip reason."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("not running as root (the suite creates a user and runs sshd)")
    if not SSHD.is_file():
        missing.append(f"{SSHD} is missing (install openssh-server)")
    if not SYSTEM_PYTHON.is_file():
        missing.append(f"{SYSTEM_PYTHON} is missing (the test user runs switcher with it)")
    missing.extend(
        f"{tool} is not on PATH"
        for tool in (*CLIENT_TOOLS, *ACCOUNT_TOOLS)
        if not shutil.which(tool)
    )
    return missing


@attrs.frozen
class UserAccount:
    """The unprivileged account that sessions log in as and switcher runs as."""

    name: str
    uid: int
    gid: int
    home: Path

    def environment(self, **extra: str) -> dict[str, str]:
        """Build the small, explicit environment a login would give this user."""
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "SHELL": "/bin/bash",
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
        }
        env.update(extra)
        return env

    def process_options(self, **extra_env: str) -> dict[str, Any]:
        """Return `subprocess.Popen` keyword arguments that run a command as this user."""
        # extra_groups=[] drops root's supplementary groups, which would otherwise leak
        # into the child and grant it access the real user would not have.
        return {
            "user": self.uid,
            "group": self.gid,
            "extra_groups": [],
            "cwd": str(self.home),
            "env": self.environment(**extra_env),
        }


def ensure_user(name: str = USER_NAME) -> UserAccount:
    """Create the test user if it is missing, and unlock it for public-key login."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, timeout=60)
        entry = pwd.getpwnam(name)
    # useradd leaves the password field as "!", which sshd (without PAM) treats as a
    # locked account and refuses even for key login; "*" means "no password" instead.
    subprocess.run(["usermod", "-p", "*", name], check=True, timeout=60)
    home = Path(entry.pw_dir)
    home.mkdir(mode=0o755, exist_ok=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    return UserAccount(name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=home)


def short_dir(prefix: str, *, owner: UserAccount | None = None, mode: int = 0o755) -> Path:
    """Make a directory directly under /tmp, short enough for Unix socket paths.

    sun_path holds 108 bytes; pytest's tmp_path is often longer than that.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)
    path.chmod(mode)
    return path


def remove_tree(path: Path) -> None:
    """Remove a directory tree, tolerating one that is already gone."""
    shutil.rmtree(path, ignore_errors=True)


def is_running(pid: int) -> bool:
    """Tell whether a process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    state = status.rpartition(")")[2].split()[0]
    return state not in _ZOMBIE_STATES


def signal_pid(pid: int, signum: signal.Signals) -> None:
    """Send a signal to one process, ignoring one that has already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def wait_sync(condition: Callable[[], bool], *, within: float) -> bool:
    """Poll a condition outside any event loop; say whether it held before the bound."""
    deadline = time.monotonic() + within
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)


def _user_has_processes(account: UserAccount) -> bool:
    found = subprocess.run(
        ["pgrep", "-u", str(account.uid)], capture_output=True, check=False, timeout=30
    )
    return found.returncode == 0


def sweep_user(account: UserAccount) -> None:
    """Stop everything the test user still runs and remove what it leaves in /tmp.

    Every process of this account was started by the suite (sessions, daemons, tmux), so
    a user-wide sweep is how a failed test still leaves a clean machine behind.
    """
    for signum in ("TERM", "KILL"):
        subprocess.run(
            ["pkill", f"-{signum}", "-u", str(account.uid)],
            capture_output=True,
            check=False,
            timeout=30,
        )
        if wait_sync(lambda: not _user_has_processes(account), within=TEARDOWN_GRACE / 2):
            break
    # switcher's default socket directory and any forwarded-agent directory sshd could
    # not clean up because its session process was killed.
    remove_tree(Path(f"/tmp/switcher-{account.uid}"))
    for directory in Path("/tmp").glob("ssh-*"):
        try:
            owner = directory.lstat().st_uid
        except FileNotFoundError:
            continue
        if owner == account.uid and directory.is_dir():
            remove_tree(directory)


def forwarded_agent_sockets(account: UserAccount) -> list[Path]:
    """List the agent sockets sshd forwarded for this user (OpenSSH before 10.1 layout)."""
    found: list[Path] = []
    # Not Path.glob: sshd removes a session's directory while we list it.
    for directory in Path("/tmp").glob("ssh-*"):
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            path = directory / name
            if not name.startswith("agent."):
                continue
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            if info.st_uid == account.uid and stat.S_ISSOCK(info.st_mode):
                found.append(path)
    return sorted(found)


def free_tcp_port() -> int:
    """Ask the kernel for a port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def tcp_listening(port: int) -> bool:
    """Whether something accepts TCP connections on this loopback port."""
    try:
        # Loopback answers or refuses at once; the timeout only bounds a wedged stack.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


def tail(path: Path, *, start: int = 0, limit: int = 20_000) -> str:
    """Read what a log file gained since `start`, capped so a runaway log stays readable."""
    try:
        with path.open("rb") as stream:
            stream.seek(start)
            data = stream.read()
    except FileNotFoundError:
        return f"({path} does not exist)"
    text = data.decode(errors="replace")
    if len(text) > limit:
        text = "[...]\n" + text[-limit:]
    return text


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition inside a trio test until it holds; the caller bounds the wait."""
    # Polling, not an Event: the conditions are other processes' files and sockets,
    # which tell us nothing when they change.
    while not condition():
        await trio.sleep(POLL_INTERVAL)


async def wait_until_listening(path: Path, *, alive: Callable[[], bool]) -> None:
    """Wait until a Unix socket accepts connections, failing early if its owner died.

    Existence alone is not readiness: a socket file can exist before listen() is called,
    and a stale file can outlive its server.
    """
    while True:
        if not alive():
            raise RuntimeError(f"the process meant to listen on {path} exited")
        probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await probe.connect(str(path))
        except OSError:
            await trio.sleep(POLL_INTERVAL)
        else:
            return
        finally:
            probe.close()


# An agent-protocol request any agent (and any switcher) answers: REQUEST_IDENTITIES.
_IDENTITIES_REQUEST = b"\x00\x00\x00\x01\x0b"


async def wait_until_serving(path: Path, *, alive: Callable[[], bool]) -> None:
    """Wait until an agent socket answers a request, failing early if its owner died.

    A switcher listens from the moment its socket exists and queues clients until it
    serves: a connection alone says nothing, a reply says it serves.
    """
    while True:
        if not alive():
            raise RuntimeError(f"the process meant to serve {path} exited")
        try:
            stream = await trio.open_unix_socket(str(path))
        except OSError:
            await trio.sleep(POLL_INTERVAL)
            continue
        async with stream:
            try:
                await stream.send_all(_IDENTITIES_REQUEST)
                if await stream.receive_some(5):
                    return
            except trio.BrokenResourceError:
                pass
        await trio.sleep(POLL_INTERVAL)


async def run_as(
    account: UserAccount,
    argv: Sequence[str],
    **extra_env: str,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command as the test user and capture its output; never raise on exit status."""
    return await trio.run_process(
        list(argv),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        stdin=subprocess.DEVNULL,
        **account.process_options(**extra_env),
    )


def describe(result: subprocess.CompletedProcess[bytes]) -> str:
    """Render a finished command for an assertion message."""
    return (
        f"command {result.args!r} exited {result.returncode}\n"
        f"stdout: {result.stdout.decode(errors='replace')!r}\n"
        f"stderr: {result.stderr.decode(errors='replace')!r}"
    )


# The second unprivileged account, for the security tests: "the other user", who must
# never reach the test user's agent and whose sockets must never serve it.
OTHER_USER_NAME = os.environ.get("SWITCHER_E2E_OTHER_USER", f"{USER_NAME}2")
