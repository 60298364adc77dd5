"""Security, end to end: only the owner reaches the agent, and only the owner's sessions serve.

switcher runs as the test user (A) from the world-readable install; a second unprivileged
user (B) plays the neighbour on a shared host: it connects to A's sockets, plants agents
where A's daemon looks, and squats the paths A's daemon wants. Root only sets the stage
(a rename or a chown that B could not do, to reach one check past the others) and watches.

docs/SECURITY.md names the test that proves each check; keep the two in step.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import os
import shlex
import signal
import socket as socketlib
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
from _openssh import KeyPair, make_keypair
from _system import (
    SYSTEM_PYTHON,
    TEARDOWN_GRACE,
    UserAccount,
    describe,
    remove_tree,
    run_as,
    short_dir,
    sweep_user,
    wait_until,
    wait_until_listening,
    wait_until_serving,
)

from switcher.core import BackendUnavailableError, open_backend
from switcher.served import socket_answers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from _switcher import SwitcherInstall

pytestmark = pytest.mark.e2e

# Hang guard for a whole test: a daemon, an agent or two and a few commands run as other
# users on a loaded 2-core CI machine. It turns a hang into a failure, nothing more.
TEST_GUARD = 120

# Hang guard for one command run as a test user, so a hang names the command.
STEP_GUARD = 30

# An agent-protocol REQUEST_IDENTITIES (length 1, type 11) and its FAILURE answer.
REQUEST_IDENTITIES = b"\x00\x00\x00\x01\x0b"
FAILURE = b"\x00\x00\x00\x01\x05"

# A control-protocol request any daemon answers.
STATUS_REQUEST = b'{"v": 1, "cmd": "status"}\n'

# Connects to a Unix socket, sends hex-encoded bytes, and reports as JSON its pid and
# whatever came back before the end of the stream (one read is enough: a refused peer
# gets nothing at all, an accepted one gets a whole reply at once).
PEER_CLIENT = r"""
import json, os, socket, sys
reply, error = b"", None
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.settimeout(20)
try:
    client.connect(sys.argv[1])
    client.sendall(bytes.fromhex(sys.argv[2]))
    reply = client.recv(65536)
except OSError as exc:
    error = type(exc).__name__
print(json.dumps({"pid": os.getpid(), "reply": reply.hex(), "error": error}))
"""

# A planted "agent": answers REQUEST_IDENTITIES with one key (blob in hex) and anything
# else with FAILURE, and records every connection and every byte count it receives, so a
# test can tell whether switcher ever talked to it. Standard library only, so that any
# user can run it with the system python.
PLANTED_AGENT = r"""
import socket, struct, sys, threading
path, record, blob = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
lock = threading.Lock()

def note(line):
    with lock, open(record, "a") as stream:
        stream.write(line + "\n")

def string(data):
    return struct.pack(">I", len(data)) + data

def frame(kind, body=b""):
    return struct.pack(">IB", len(body) + 1, kind) + body

answer = frame(12, struct.pack(">I", 1) + string(blob) + string(b"planted"))

def serve(conn):
    with conn:
        note("connection")
        buffer = b""
        while data := conn.recv(65536):
            note(f"bytes {len(data)}")
            buffer += data
            while len(buffer) > 4 and len(buffer) >= 4 + int.from_bytes(buffer[:4], "big"):
                size = int.from_bytes(buffer[:4], "big")
                kind, buffer = buffer[4], buffer[4 + size:]
                conn.sendall(answer if kind == 11 else frame(5))

server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(16)
note("listening")
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def python_argv(script: str, *args: str) -> list[str]:
    """Run a standard-library script with the system python, isolated from the environment."""
    return [str(SYSTEM_PYTHON), "-I", "-c", script, *args]


async def run_bounded(
    account: UserAccount, argv: Sequence[str], **extra_env: str
) -> subprocess.CompletedProcess[bytes]:
    """Run a command as `account`; fail the test, naming the command, if it hangs."""
    with trio.move_on_after(STEP_GUARD):
        return await run_as(account, argv, **extra_env)
    pytest.fail(f"{shlex.join(argv)} as {account.name} hung for {STEP_GUARD}s")


def listed_keys(result: subprocess.CompletedProcess[bytes]) -> tuple[int, list[str]]:
    """The exit status and output lines of `ssh-add -L`, for whole-value comparison."""
    return result.returncode, result.stdout.decode().splitlines()


# Whether something accepts connections on a Unix socket right now: the daemon's own check.
accepts = socket_answers


def answers(path: Path) -> bool:
    """Whether the agent socket at ``path`` answers a request (a switcher that listens but
    is still starting holds it until it serves, or closes it if it refuses to start)."""
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as client:
        try:
            client.connect(str(path))
            client.sendall(REQUEST_IDENTITIES)
            return bool(client.recv(5))
        except OSError:
            return False


@contextlib.asynccontextmanager
async def user_process(
    account: UserAccount, argv: Sequence[str], *, log: Path | None = None
) -> AsyncIterator[trio.Process]:
    """Run a command as `account` until the block ends, then kill and reap it."""
    with contextlib.ExitStack() as files:
        output: Any = subprocess.DEVNULL
        if log is not None:
            output = files.enter_context(log.open("ab"))
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            **account.process_options(),
        )
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


@attrs.define(eq=False)
class UserDaemon:
    """A `switcher daemon` running as the test user, with its sockets and its JSON log."""

    process: trio.Process
    socket: Path
    control: Path
    log: Path

    def events(self, name: str) -> list[dict[str, Any]]:
        """The log events called `name`, oldest first."""
        found: list[dict[str, Any]] = []
        for line in self.log.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
        return found


def daemon_flags(
    *, socket: Path | None, control: Path | None, agents_dirs: Sequence[Path]
) -> list[str]:
    """`switcher daemon` flags; a path left as None keeps its default."""
    flags = ["--agents-dirs", ":".join(str(directory) for directory in agents_dirs)]
    if socket is not None:
        flags += ["--socket-path", str(socket)]
    if control is not None:
        flags += ["--control-path", str(control)]
    return flags


@contextlib.asynccontextmanager
async def user_daemon(
    install: SwitcherInstall,
    account: UserAccount,
    directory: Path,
    *,
    agents_dirs: Sequence[Path],
) -> AsyncIterator[UserDaemon]:
    """Run `switcher daemon` as `account` with both sockets and a debug log in `directory`."""
    socket, control, log = (
        directory / "agent.sock",
        directory / "control.sock",
        directory / "daemon.log",
    )
    argv = [
        str(install.executable),
        "daemon",
        *daemon_flags(socket=socket, control=control, agents_dirs=agents_dirs),
        "--log-level",
        "debug",
        "--log-file",
        str(log),
    ]
    async with user_process(account, argv, log=directory / "daemon-stderr.log") as process:
        await wait_until_serving(socket, alive=lambda: process.returncode is None)
        yield UserDaemon(process=process, socket=socket, control=control, log=log)
        with trio.move_on_after(TEARDOWN_GRACE, shield=True):
            process.send_signal(signal.SIGTERM)
            await process.wait()


async def control_call(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Send one control request (as root, whom the daemon admits) and read its reply."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(json.dumps(request).encode() + b"\n")
        buffer = b""
        while not buffer.endswith(b"\n"):
            chunk = await stream.receive_some()
            if not chunk:
                raise EOFError(f"control socket closed; got {buffer!r}")
            buffer += chunk
    reply = json.loads(buffer)
    assert isinstance(reply, dict)
    return reply


@attrs.frozen
class PlantedAgent:
    """A fake agent some user runs, and the record of what reached it."""

    socket: Path  # where it was bound; a test may move the socket elsewhere
    record: Path

    def _lines(self) -> list[str]:
        return self.record.read_text().splitlines()

    def connections(self) -> int:
        """How many connections it accepted."""
        return self._lines().count("connection")

    def received_bytes(self) -> int:
        """How many bytes anyone sent it."""
        return sum(int(line.split()[1]) for line in self._lines() if line.startswith("bytes "))


@contextlib.asynccontextmanager
async def planted_agent(
    account: UserAccount, directory: Path, blob: bytes = b"planted-key"
) -> AsyncIterator[PlantedAgent]:
    """Run the planted agent as `account`, listening at `directory`/planted.sock."""
    planted = PlantedAgent(socket=directory / "planted.sock", record=directory / "planted.record")
    argv = python_argv(PLANTED_AGENT, str(planted.socket), str(planted.record), blob.hex())
    async with user_process(account, argv, log=directory / "planted.log") as process:
        await wait_until(
            lambda: (
                process.returncode is not None
                or (planted.record.exists() and "listening" in planted.record.read_text())
            )
        )
        if process.returncode is not None:
            raise RuntimeError(f"the planted agent exited {process.returncode}")
        yield planted


def owned_dir(path: Path, owner: UserAccount, mode: int) -> Path:
    """Make a directory with the given owner and exact mode."""
    path.mkdir()
    os.chown(path, owner.uid, owner.gid)
    path.chmod(mode)
    return path


def user_key(directory: Path, name: str, owner: UserAccount) -> KeyPair:
    """A fresh ed25519 key whose private half only `owner` can read (as ssh-add insists)."""
    key = make_keypair(directory, name)
    os.chown(key.private, owner.uid, owner.gid)
    key.private.chmod(0o600)
    return key


@contextlib.asynccontextmanager
async def user_agent(account: UserAccount, socket: Path, key: KeyPair) -> AsyncIterator[None]:
    """Run a real ssh-agent as `account` at `socket`, holding `key`."""
    argv = ["ssh-agent", "-D", "-a", str(socket)]
    async with user_process(account, argv) as process:
        await wait_until_listening(socket, alive=lambda: process.returncode is None)
        added = await run_bounded(
            account, ["ssh-add", "-q", str(key.private)], SSH_AUTH_SOCK=str(socket)
        )
        assert added.returncode == 0, describe(added)
        yield


def remove_path(path: Path) -> None:
    """Remove a file, a symlink (not its target) or a directory tree, if present."""
    if path.is_symlink() or path.is_file() or path.is_socket():
        path.unlink()
    elif path.exists():
        remove_tree(path)


def tree_state(path: Path) -> list[tuple[str, int, int, bytes | None]]:
    """Name, owner, mode and (for files) content of a directory and everything in it."""
    state: list[tuple[str, int, int, bytes | None]] = []
    for item in [path, *sorted(path.rglob("*"))]:
        info = item.lstat()
        content = item.read_bytes() if item.is_file() and not item.is_symlink() else None
        state.append((str(item.relative_to(path)), info.st_uid, info.st_mode, content))
    return state


def open_up(directory: Path, socket: Path) -> None:
    """What a careless chmod would do: only the peer check is left to guard the socket."""
    directory.chmod(0o755)
    socket.chmod(0o666)


def proc_owner(pid: int) -> int:
    """The uid owning /proc/PID/environ: root for a process that is not dumpable."""
    return Path(f"/proc/{pid}/environ").stat().st_uid


def squat_runtime(
    squat: str, runtime: Path, theirs: Path, us: UserAccount, other: UserAccount
) -> tuple[Path, str]:
    """Prepare `runtime` the way `squat` says; return the directory to watch and the reason."""
    if squat == "owned-by-other":
        owned_dir(runtime, other, 0o700)
        bait = runtime / "agent.sock"
        bait.write_text("B's file")
        os.chown(bait, other.uid, other.gid)
        return runtime, f"{runtime} is owned by uid {other.uid}, not by us (uid {us.uid})"
    if squat == "symlink-to-other":
        runtime.symlink_to(theirs)
        os.chown(runtime, other.uid, other.gid, follow_symlinks=False)
        return theirs, f"{runtime} is a symlink; refusing to use it"
    owned_dir(runtime, us, 0o755)
    return runtime, (
        f"{runtime} has mode 0755; it must not be accessible to group or others (chmod 700 it)"
    )


@attrs.frozen
class StartAttempt:
    """How a `switcher daemon` start ended: an exit status, or None if it came up."""

    status: int | None
    stderr: str


def started(log: Path) -> bool:
    """Whether a daemon logging to `log` has said it is serving."""
    return "switcher.daemon.started" in log.read_text()


async def attempt_start(
    install: SwitcherInstall,
    account: UserAccount,
    flags: Sequence[str],
    *,
    socket: Path | None = None,
) -> StartAttempt:
    """Start `switcher daemon` as `account` and see whether it refuses or comes up.

    Waits for one of the two (an exit, or its "started" log line on stderr, or `socket`
    answering a request when that is known to be ours), never for a length of time; a
    daemon that came up is stopped at once.
    """
    stderr_dir = short_dir("swe2e-e-")
    try:
        stderr_log = stderr_dir / "stderr"
        argv = [str(install.executable), "daemon", *flags]
        async with user_process(account, argv, log=stderr_log) as process:
            await wait_until(
                lambda: (
                    process.poll() is not None
                    or started(stderr_log)
                    or (socket is not None and answers(socket))
                )
            )
            status = process.returncode
        return StartAttempt(status=status, stderr=stderr_log.read_text())
    finally:
        remove_tree(stderr_dir)


class TestPeerCredentials:
    """Whatever the socket modes say, only the daemon's user and root get a reply."""

    @pytest.mark.parametrize(
        ("kind", "request_bytes", "event"),
        [
            ("agent", REQUEST_IDENTITIES, "switcher.proxy.peer_refused"),
            ("control", STATUS_REQUEST, "switcher.control.peer_refused"),
        ],
        ids=["agent", "control"],
    )
    async def test_another_user_is_closed_without_a_reply(
        self,
        *,
        e2e_user: UserAccount,
        other_user: UserAccount,
        switcher_install: SwitcherInstall,
        user_dir: Path,
        kind: str,
        request_bytes: bytes,
        event: str,
    ) -> None:
        """With the dir 0755 and the socket 0666, another uid gets no byte, only a log line."""
        with trio.fail_after(TEST_GUARD):
            async with user_daemon(
                switcher_install, e2e_user, user_dir, agents_dirs=[user_dir / "none"]
            ) as daemon:
                path = daemon.socket if kind == "agent" else daemon.control
                open_up(user_dir, path)
                result = await run_bounded(
                    other_user, python_argv(PEER_CLIENT, str(path), request_bytes.hex())
                )
                assert result.returncode == 0, describe(result)
                outcome = json.loads(result.stdout)
                refused = [(e["client_uid"], e["client_pid"]) for e in daemon.events(event)]
        # Closed before or after our request arrived: both are "no reply".
        assert outcome["error"] in (None, "ConnectionResetError", "BrokenPipeError"), outcome
        assert (outcome["reply"], refused) == ("", [(other_user.uid, outcome["pid"])])

    @pytest.mark.parametrize("kind", ["agent", "control"])
    async def test_root_is_answered(
        self,
        *,
        e2e_user: UserAccount,
        switcher_install: SwitcherInstall,
        user_dir: Path,
        kind: str,
    ) -> None:
        """Root may talk to another user's daemon, as it may to that user's ssh-agent."""
        with trio.fail_after(TEST_GUARD):
            async with user_daemon(
                switcher_install, e2e_user, user_dir, agents_dirs=[user_dir / "none"]
            ) as daemon:
                if kind == "agent":
                    stream = await trio.open_unix_socket(str(daemon.socket))
                    async with stream:
                        await stream.send_all(REQUEST_IDENTITIES)
                        answered: object = await stream.receive_some()
                    expected: object = FAILURE  # no agent at all: a prompt failure
                else:
                    status = await control_call(daemon.control, {"v": 1, "cmd": "status"})
                    answered = (status["ok"], status["pid"])
                    expected = (True, daemon.process.pid)
                refused = daemon.events("switcher.proxy.peer_refused") + daemon.events(
                    "switcher.control.peer_refused"
                )
        assert (answered, refused) == (expected, [])


class Plant(enum.Enum):
    """Ways a socket that is not one of our sessions can sit where the daemon looks.

    Some are only reachable with root's help (a rename or chown B could not do): they
    take away the earlier checks, so that the check named in the verdict is the one
    standing between A's clients and the planted listener.
    """

    # B's own ssh-* directory (0755, so A could reach in), B's socket, B's listener.
    FOREIGN_DIR = "foreign-dir"
    # A's private directory holding a socket file of B's, with B's listener.
    FOREIGN_SOCKET = "foreign-socket"
    # A's directory, a socket file chowned to A, but the listener is B's process.
    FOREIGN_LISTENER = "foreign-listener"
    # A's own listener, but in a directory B owns (B could swap it at any moment).
    OURS_IN_FOREIGN_DIR = "ours-in-foreign-dir"
    # A's own listener in A's directory that its group may write to.
    GROUP_WRITABLE_DIR = "group-writable-dir"
    # A's directory holding a symlink (A's) to B's socket, with B's listener.
    SYMLINK_TO_FOREIGN = "symlink-to-foreign"


# Whose process listens on the planted socket, per scenario (True: the other user's).
_LISTENER_IS_OTHER = {
    Plant.FOREIGN_DIR: True,
    Plant.FOREIGN_SOCKET: True,
    Plant.FOREIGN_LISTENER: True,
    Plant.OURS_IN_FOREIGN_DIR: False,
    Plant.GROUP_WRITABLE_DIR: False,
    Plant.SYMLINK_TO_FOREIGN: True,
}


def place(
    plant: Plant, planted: PlantedAgent, agents: Path, us: UserAccount, other: UserAccount
) -> tuple[Path, tuple[str, str]]:
    """Put the planted socket where the daemon looks; return its path and the expected verdict."""
    if plant is Plant.FOREIGN_DIR:
        directory = owned_dir(agents / "ssh-planted000", other, 0o755)
        verdict = ("skipped", f"directory owned by uid {other.uid}")
    elif plant is Plant.FOREIGN_SOCKET:
        directory = owned_dir(agents / "ssh-planted000", us, 0o700)
        verdict = ("skipped", f"owned by uid {other.uid}")
    elif plant is Plant.FOREIGN_LISTENER:
        directory = owned_dir(agents / "ssh-planted000", us, 0o700)
        verdict = ("dead", f"listener belongs to uid {other.uid}")
    elif plant is Plant.OURS_IN_FOREIGN_DIR:
        directory = owned_dir(agents / "ssh-planted000", other, 0o755)
        verdict = ("skipped", f"directory owned by uid {other.uid}")
    elif plant is Plant.GROUP_WRITABLE_DIR:
        directory = owned_dir(agents / "ssh-planted000", us, 0o770)
        verdict = ("skipped", "directory writable by group or others")
    else:
        directory = owned_dir(agents / "ssh-planted000", us, 0o700)
        link = directory / "agent.2"
        link.symlink_to(planted.socket)
        os.chown(link, us.uid, us.gid, follow_symlinks=False)
        return link, ("skipped", "symlink")
    path = directory / "agent.2"
    planted.socket.rename(path)  # a Unix socket keeps its listener when renamed
    if plant is Plant.FOREIGN_LISTENER:
        os.chown(path, us.uid, us.gid)
    return path, verdict


async def verdict_on(daemon: UserDaemon, path: Path) -> tuple[str, str | None]:
    """What the daemon made of a socket: health and error, or why it (or its dir) was skipped."""
    listed = await control_call(daemon.control, {"v": 1, "cmd": "list"})
    for backend in listed["backends"]:
        if backend["path"] == str(path):
            return backend["health"], backend["last_error"]
    # A directory found wanting is skipped whole, so its sockets are never even named.
    skipped_as = {str(path), str(path.parent)}
    reasons = [
        e["reason"] for e in daemon.events("switcher.discovery.skipped") if e["path"] in skipped_as
    ]
    if len(reasons) == 1:
        return "skipped", reasons[0]
    return "unaccounted", repr(reasons)


class TestOnlyOurSessionsServe:
    """A socket that is not one of A's own sessions never serves A and never hears a byte."""

    @pytest.mark.parametrize("plant", list(Plant), ids=[plant.value for plant in Plant])
    async def test_a_planted_agent_is_never_used(
        self,
        *,
        e2e_user: UserAccount,
        other_user: UserAccount,
        switcher_install: SwitcherInstall,
        user_dir: Path,
        plant: Plant,
    ) -> None:
        """A's own live agent serves A; the newer planted one is skipped or refused, unspoken to."""
        listener = other_user if _LISTENER_IS_OTHER[plant] else e2e_user
        # Like /tmp: everyone may create entries, nobody may remove another's.
        agents = short_dir("swe2e-a-", mode=0o1777)
        staging = short_dir("swe2e-p-", owner=listener, mode=0o755)
        try:
            legit_key = user_key(user_dir, "legit", e2e_user)
            planted_key = make_keypair(user_dir, "planted")
            planted_blob = base64.b64decode(planted_key.public_line.split()[1])
            legit_socket = owned_dir(agents / "ssh-legitimate", e2e_user, 0o700) / "agent.1"
            with trio.fail_after(TEST_GUARD):
                async with (
                    user_agent(e2e_user, legit_socket, legit_key),
                    planted_agent(listener, staging, planted_blob) as planted,
                ):
                    # Planted second, so it is the newer session: if it got through, it
                    # would be the one chosen.
                    planted_path, expected = place(plant, planted, agents, e2e_user, other_user)
                    async with user_daemon(
                        switcher_install, e2e_user, user_dir, agents_dirs=[agents]
                    ) as daemon:
                        # refresh rescans and probes everything, and waits for it all.
                        assert (await control_call(daemon.control, {"v": 1, "cmd": "refresh"}))[
                            "ok"
                        ]
                        verdicts = (
                            await verdict_on(daemon, legit_socket),
                            await verdict_on(daemon, planted_path),
                        )
                        listing = await run_bounded(
                            e2e_user, ["ssh-add", "-L"], SSH_AUTH_SOCK=str(daemon.socket)
                        )
                    heard = planted.received_bytes()
        finally:
            remove_tree(agents)
            remove_tree(staging)
        assert (verdicts, listed_keys(listing), heard) == (
            (("healthy", None), expected),
            (0, [legit_key.public_line]),
            0,
        )


async def connect_and_close(path: Path) -> None:
    """Open a backend connection the way the daemon does, and close it at once."""
    stream = await open_backend(str(path), refuse_pid=None)
    await stream.aclose()


class TestOpenBackend:
    async def test_a_listener_of_another_user_is_refused(
        self, e2e_user: UserAccount, other_user: UserAccount
    ) -> None:
        """open_backend drops a connection whose listener is another uid before sending a byte.

        This is the last line, for when discovery is fooled (a race, a rename by root):
        the kernel's word on who is listening. The test runs as root, which uid_allowed
        does not let through as a listener's uid either (only ours and root are allowed).
        """
        del e2e_user  # requested so that a machine that cannot run the suite skips first
        staging = short_dir("swe2e-p-", owner=other_user, mode=0o755)
        try:
            with trio.fail_after(TEST_GUARD):
                async with planted_agent(other_user, staging) as planted:
                    with pytest.raises(BackendUnavailableError) as refused:
                        await connect_and_close(planted.socket)
                    # It did get as far as connecting: the refusal is the check's doing.
                    await wait_until(lambda: planted.connections() == 1)
                    heard = planted.received_bytes()
        finally:
            remove_tree(staging)
        assert (str(refused.value), heard) == (f"listener belongs to uid {other_user.uid}", 0)


class TestSquatting:
    """Paths another user prepared are refused with a reason, and nothing of theirs is touched."""

    @pytest.mark.parametrize("squat", ["owned-by-other", "symlink-to-other", "mode-0755"])
    async def test_a_squatted_runtime_dir_is_refused(
        self,
        *,
        e2e_user: UserAccount,
        other_user: UserAccount,
        switcher_install: SwitcherInstall,
        squat: str,
    ) -> None:
        """With default paths, a /tmp/switcher-$UID that is not A's private dir stops the start."""
        runtime = Path(f"/tmp/switcher-{e2e_user.uid}")
        remove_path(runtime)
        # B's directory, wide open: the invitation a symlink to it would extend.
        theirs = short_dir("swe2e-v-", owner=other_user, mode=0o777)
        try:
            bait = theirs / "agent.sock"
            bait.write_text("B's file")
            os.chown(bait, other_user.uid, other_user.gid)
            watched, reason = squat_runtime(squat, runtime, theirs, e2e_user, other_user)
            before = tree_state(watched)
            with trio.fail_after(TEST_GUARD):
                attempt = await attempt_start(
                    switcher_install,
                    e2e_user,
                    daemon_flags(socket=None, control=None, agents_dirs=[Path("/nonexistent")]),
                )
            after = tree_state(watched)
        finally:
            remove_path(runtime)
            remove_tree(theirs)
        assert (attempt, after) == (StartAttempt(1, f"switcher: {reason}\n"), before)

    @pytest.mark.parametrize("which", ["agent", "control"])
    async def test_another_users_live_socket_at_our_path_is_left_alone(
        self,
        *,
        e2e_user: UserAccount,
        other_user: UserAccount,
        switcher_install: SwitcherInstall,
        user_dir: Path,
        which: str,
    ) -> None:
        """In a sticky dir, B's live socket at our socket or control path is refused and kept."""
        shared = short_dir("swe2e-t-", mode=0o1777)
        try:
            with trio.fail_after(TEST_GUARD):
                async with planted_agent(other_user, shared) as squatter:
                    ours = user_dir / "mine.sock"
                    socket, control = (
                        (squatter.socket, ours) if which == "agent" else (ours, squatter.socket)
                    )
                    attempt = await attempt_start(
                        switcher_install,
                        e2e_user,
                        daemon_flags(
                            socket=socket, control=control, agents_dirs=[user_dir / "none"]
                        ),
                    )
                    kept = (squatter.socket.lstat().st_uid, accepts(squatter.socket))
                    # Connections are accepted in order: once ours is on record, any the
                    # daemon made would be too.
                    await wait_until(lambda: squatter.connections() >= 1)
                    contacted = squatter.connections() - 1
        finally:
            remove_tree(shared)
        reason = f"{squatter.socket} is a socket owned by uid {other_user.uid}, not by us"
        assert (attempt, kept, contacted, ours.exists()) == (
            StartAttempt(1, f"switcher: {reason}\n"),
            (other_user.uid, True),
            0,
            False,
        )

    async def test_a_lock_file_planted_beside_the_socket_is_ignored(
        self,
        *,
        e2e_user: UserAccount,
        other_user: UserAccount,
        switcher_install: SwitcherInstall,
        user_dir: Path,
    ) -> None:
        """In a directory others can write, A's lock is not kept beside the socket: a lock
        file B planted there (even one A may write) neither stops A's daemon nor is touched."""
        shared = short_dir("swe2e-t-", mode=0o1777)
        try:
            lock = shared / "agent.sock.lock"
            lock.write_text("B's lock")
            os.chown(lock, other_user.uid, other_user.gid)
            lock.chmod(0o666)
            planted = (lock.stat().st_uid, lock.stat().st_mode, lock.read_bytes())
            with trio.fail_after(TEST_GUARD):
                attempt = await attempt_start(
                    switcher_install,
                    e2e_user,
                    daemon_flags(
                        socket=shared / "agent.sock",
                        control=user_dir / "control.sock",
                        agents_dirs=[user_dir / "none"],
                    ),
                )
            # The daemon was killed, so its socket stays; nothing else of A's is there.
            names = sorted(p.name for p in shared.iterdir())
            after = (lock.stat().st_uid, lock.stat().st_mode, lock.read_bytes())
        finally:
            remove_tree(shared)
        assert (attempt.status, "switcher.daemon.started" in attempt.stderr, names, after) == (
            None,
            True,
            ["agent.sock", "agent.sock.lock"],
            planted,
        )

    @pytest.mark.parametrize("route", ["symlink-of-other", "inside-dir-of-other"])
    async def test_a_socket_dir_another_user_can_redirect_is_refused(
        self,
        *,
        e2e_user: UserAccount,
        other_user: UserAccount,
        switcher_install: SwitcherInstall,
        user_dir: Path,
        route: str,
    ) -> None:
        """A --socket-path reached through B's symlink or B's directory is refused.

        The parent itself is A's private directory, which is all check_parent_dir looks at
        today; but B can repoint the symlink (or rename A's directory away inside B's own
        and put one of B's in its place), and every client using the path would then talk
        to B's socket. See docs/SECURITY.md, "Gaps".
        """
        shared = short_dir("swe2e-t-", mode=0o1777)
        theirs = short_dir("swe2e-b-", owner=other_user, mode=0o755)
        try:
            if route == "symlink-of-other":
                socket_dir = shared / "run"
                socket_dir.symlink_to(user_dir)
                os.chown(socket_dir, other_user.uid, other_user.gid, follow_symlinks=False)
            else:
                socket_dir = owned_dir(theirs / "run", e2e_user, 0o700)
            before = sorted(p.name for p in socket_dir.iterdir())
            with trio.fail_after(TEST_GUARD):
                attempt = await attempt_start(
                    switcher_install,
                    e2e_user,
                    daemon_flags(
                        socket=socket_dir / "agent.sock",
                        control=socket_dir / "control.sock",
                        agents_dirs=[user_dir / "none"],
                    ),
                )
            after = sorted(p.name for p in socket_dir.iterdir())
        finally:
            remove_tree(shared)
            remove_tree(theirs)
        assert (attempt.status, attempt.stderr.startswith("switcher: "), after) == (
            1,
            True,
            before,
        ), attempt

    async def test_a_log_file_path_planted_as_a_symlink_is_refused(
        self,
        *,
        e2e_user: UserAccount,
        other_user: UserAccount,
        switcher_install: SwitcherInstall,
        user_dir: Path,
    ) -> None:
        """A --log-file in a shared dir where B planted a symlink is refused; the target is kept.

        Otherwise the daemon appends JSON lines to whatever file of A's the link names (a
        login script, say), lines that hold names B chose (the /tmp entries discovery
        skips). fs.protected_symlinks=1 makes the kernel refuse to follow such a link, but
        not every host sets it (this one may not): switcher must not rely on it.
        """
        shared = short_dir("swe2e-t-", mode=0o1777)
        victim = user_dir / "login-script"
        victim.write_text("# A's own file\n")
        os.chown(victim, e2e_user.uid, e2e_user.gid)
        victim.chmod(0o600)
        planted = shared / "switcher.log"
        planted.symlink_to(victim)
        os.chown(planted, other_user.uid, other_user.gid, follow_symlinks=False)
        try:
            with trio.fail_after(TEST_GUARD):
                attempt = await attempt_start(
                    switcher_install,
                    e2e_user,
                    [
                        *daemon_flags(
                            socket=user_dir / "agent.sock",
                            control=user_dir / "control.sock",
                            agents_dirs=[user_dir / "none"],
                        ),
                        "--log-file",
                        str(planted),
                    ],
                    socket=user_dir / "agent.sock",
                )
            after = victim.read_text()
        finally:
            remove_tree(shared)
        assert (attempt.status, after) == (1, "# A's own file\n"), attempt


class TestProcessHygiene:
    async def test_the_daemon_is_not_dumpable(
        self, e2e_user: UserAccount, switcher_install: SwitcherInstall, user_dir: Path
    ) -> None:
        """The daemon's /proc/PID files are root's, and its environ unreadable to its own user.

        That is what PR_SET_DUMPABLE 0 does (and so ptrace and core dumps are off too);
        an ordinary process of the same user is the control.
        """
        with trio.fail_after(TEST_GUARD):
            async with (
                user_daemon(
                    switcher_install, e2e_user, user_dir, agents_dirs=[user_dir / "none"]
                ) as daemon,
                user_process(e2e_user, ["sleep", "600"]) as ordinary,
            ):
                observed = []
                for pid in (daemon.process.pid, ordinary.pid):
                    read = await run_bounded(e2e_user, ["cat", f"/proc/{pid}/environ"])
                    observed.append((proc_owner(pid), read.returncode == 0))
        assert observed == [(0, False), (e2e_user.uid, True)]


class TestInit:
    @pytest.mark.parametrize("runtime_dir", ["squatted", "clean"])
    async def test_init_never_exports_another_users_socket(
        self,
        *,
        e2e_user: UserAccount,
        other_user: UserAccount,
        switcher_install: SwitcherInstall,
        runtime_dir: str,
    ) -> None:
        """`eval "$(switcher init bash)"` keeps SSH_AUTH_SOCK when B holds the default socket path.

        B owns /tmp/switcher-$UID and listens at agent.sock in it, where every shell of A
        would send private keys (ssh-add) and passphrases (ssh-add -x). The daemon refuses
        to start there, and the snippet exports only a socket A owns; in a clean runtime
        dir the same line starts the daemon and exports its socket.
        """
        runtime = Path(f"/tmp/switcher-{e2e_user.uid}")
        remove_path(runtime)
        script = (
            "SSH_AUTH_SOCK=/previous\n"
            f'eval "$({shlex.quote(str(switcher_install.executable))} init bash)"\n'
            'printf "%s\\n" "$SSH_AUTH_SOCK"\n'
        )
        try:
            with trio.fail_after(TEST_GUARD):
                if runtime_dir == "squatted":
                    owned_dir(runtime, other_user, 0o755)
                    async with planted_agent(other_user, runtime) as squatter:
                        squatter.socket.rename(runtime / "agent.sock")
                        result = await run_bounded(e2e_user, ["bash", "--norc", "-c", script])
                        contacted = squatter.connections()
                    expected = "/previous"
                else:
                    result = await run_bounded(e2e_user, ["bash", "--norc", "-c", script])
                    contacted = 0
                    expected = str(runtime / "agent.sock")
        finally:
            sweep_user(e2e_user)  # the daemon init started, detached, in the clean case
            remove_path(runtime)
        warned = "SSH_AUTH_SOCK left as it was" in result.stderr.decode()
        assert (result.stdout.decode(), contacted, warned) == (
            f"{expected}\n",
            0,
            runtime_dir == "squatted",
        ), describe(result)
