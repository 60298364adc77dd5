"""Real OpenSSH for the end-to-end suite: keys, the laptop's agents, sshd, ssh sessions.

The "laptop" (ssh-agent, ssh) runs as root; the "server" account is the test user.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio
from _system import (
    SSHD,
    TEARDOWN_GRACE,
    UserAccount,
    describe,
    free_tcp_port,
    tail,
    tcp_listening,
    wait_sync,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Sequence

# How long sshd and ssh-agent get to come up. A hang guard for session-scoped fixtures,
# which run outside trio and so outside any test's fail_after.
STARTUP_BOUND = 30.0

# sshd picks its port from a free one we found; another process can take it between our
# probe and sshd's bind, so try a few times before calling the machine broken.
SSHD_START_ATTEMPTS = 3

# Options every ssh invocation shares. BatchMode makes a missing key an error instead of
# a password prompt; the throwaway known-hosts file keeps the laptop's files untouched;
# -F /dev/null keeps root's own ssh configuration (and its keys) out of the test.
SSH_COMMON_OPTIONS = (
    "-F",
    "/dev/null",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
)


@attrs.frozen
class KeyPair:
    """An ed25519 key made for the test, with its private and public halves on disk."""

    private: Path
    public: Path

    @property
    def public_line(self) -> str:
        """The public key line, as `ssh-add -L` prints it."""
        return self.public.read_text().strip()

    def fingerprint_line(self) -> str:
        """The fingerprint line, as `ssh-add -l` prints it."""
        shown = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(self.public)],
            capture_output=True,
            check=True,
            timeout=30,
        )
        return shown.stdout.decode().strip()


def make_keypair(directory: Path, name: str) -> KeyPair:
    """Generate an unencrypted ed25519 key; the public half is readable by everyone."""
    private = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@laptop", "-f", str(private)],
        check=True,
        timeout=60,
    )
    public = private.with_name(f"{name}.pub")
    # The test user signs with `ssh-add -T key.pub` and so must read the public half.
    public.chmod(0o644)
    return KeyPair(private=private, public=public)


@attrs.define(eq=False)
class ClientAgent:
    """An ssh-agent on the laptop side, holding one key."""

    socket: Path
    key: KeyPair
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def running_client_agent(
    socket_path: Path, key: KeyPair, log: Path, *, add_options: Sequence[str] = ()
) -> Iterator[ClientAgent]:
    """Run `ssh-agent -D -a SOCKET` in the foreground, load `key` (with `ssh-add
    add_options`, e.g. destination constraints), and stop it afterwards."""
    with log.open("ab") as log_stream:
        process = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(socket_path)],
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=log_stream,
        )
    try:
        if not wait_sync(
            lambda: socket_path.exists() or process.poll() is not None, within=STARTUP_BOUND
        ):
            raise RuntimeError(f"ssh-agent did not create {socket_path}:\n{tail(log)}")
        if process.poll() is not None:
            raise RuntimeError(f"ssh-agent exited {process.returncode}:\n{tail(log)}")
        added = subprocess.run(
            ["ssh-add", "-q", *add_options, str(key.private)],
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "SSH_AUTH_SOCK": str(socket_path),
            },
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            timeout=STARTUP_BOUND,
        )
        if added.returncode != 0:
            raise RuntimeError(f"cannot load the laptop key:\n{describe(added)}")
        yield ClientAgent(socket=socket_path, key=key, process=process)
    finally:
        _stop_popen(process)


def _stop_popen(process: subprocess.Popen[bytes]) -> None:
    """Terminate a child politely, then firmly, and always reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=TEARDOWN_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@attrs.define(eq=False)
class Sshd:
    """A private sshd on loopback that lets the test user in with the laptop keys."""

    port: int
    log: Path
    process: subprocess.Popen[bytes]
    account: UserAccount

    def log_size(self) -> int:
        """Where the log ends now, so a test can print only what it caused."""
        return self.log.stat().st_size

    def destination(self) -> str:
        """The user@host to log in to."""
        return f"{self.account.name}@127.0.0.1"

    def ssh_argv(self, *, key: KeyPair | None, forward_agent: bool) -> list[str]:
        """The ssh command line (without the remote command) for logging in to this sshd."""
        argv = ["ssh", *SSH_COMMON_OPTIONS, "-p", str(self.port)]
        if key is not None:
            # Offer exactly this agent key, so a session's identity is the one the test
            # chose, whatever else the agent or root's home might hold.
            argv += ["-o", "IdentitiesOnly=yes", "-i", str(key.public)]
        argv.append("-A" if forward_agent else "-a")
        argv.append(self.destination())
        return argv


def _sshd_config(directory: Path, port: int, account: UserAccount) -> str:
    return "\n".join(
        [
            "ListenAddress 127.0.0.1",
            f"Port {port}",
            f"HostKey {directory / 'host_ed25519'}",
            "PidFile none",
            # Without PAM, sshd needs no system configuration and no logind session,
            # which would otherwise kill the user's processes at logout.
            "UsePAM no",
            f"AllowUsers {account.name}",
            "PermitRootLogin no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            # StrictModes checks every directory up to / and rejects /tmp (mode 1777),
            # where this root-owned, 0644 key file has to live.
            "StrictModes no",
            "AllowAgentForwarding yes",
            "AllowTcpForwarding no",
            "X11Forwarding no",
            "PermitUserEnvironment no",
            "AcceptEnv LANG LC_*",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            # VERBOSE names the key each login used, which is what a failure report needs.
            "LogLevel VERBOSE",
            "",
        ]
    )


@contextlib.contextmanager
def running_sshd(
    directory: Path, account: UserAccount, authorized: Sequence[KeyPair]
) -> Iterator[Sshd]:
    """Run `sshd -D -e` on a free loopback port until the block ends."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / "host_ed25519")],
        check=True,
        timeout=60,
    )
    keys_file = directory / "authorized_keys"
    keys_file.write_text("".join(f"{key.public_line}\n" for key in authorized))
    keys_file.chmod(0o644)
    # sshd's privilege-separation child chroots here; Debian's service unit creates it,
    # a container that never started the service does not have it.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = directory / "sshd.log"
    for _attempt in range(SSHD_START_ATTEMPTS):
        port = free_tcp_port()
        config = directory / "sshd_config"
        config.write_text(_sshd_config(directory, port, account))
        with log.open("ab") as log_stream:
            process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_stream,
                stderr=log_stream,
            )
        try:
            came_up = wait_sync(
                lambda: process.poll() is not None or tcp_listening(port),  # noqa: B023 - used at once
                within=STARTUP_BOUND,
            )
            if came_up and process.poll() is None:
                yield Sshd(port=port, log=log, process=process, account=account)
                return
        finally:
            _stop_popen(process)
    raise RuntimeError(f"sshd did not start in {SSHD_START_ATTEMPTS} attempts:\n{tail(log)}")


class _LineReader:
    """Split a trio byte stream into lines."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def readline(self) -> str:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line.decode(errors="replace")
            chunk = await self._stream.receive_some()
            if not chunk:
                raise EOFError(f"stream ended; unread: {bytes(self._buffer)!r}")
            self._buffer += chunk


@attrs.frozen
class ShellResult:
    """What a command run inside an ssh session printed, and how it exited."""

    returncode: int
    output: str


@attrs.define(eq=False)
class SshSession:
    """A logged-in `ssh -A` session whose remote side is a shell reading our commands.

    While it runs, sshd keeps its forwarded agent socket; closing the shell's input logs
    out, the way a user typing `exit` would.
    """

    agent: ClientAgent
    process: trio.Process
    log: Path
    _reader: _LineReader
    # Filled in by the first command: the forwarded socket sshd made for this session.
    agent_socket: Path = Path()

    async def run(self, script: str) -> ShellResult:
        """Run a shell snippet in the session and wait for it to finish.

        stdin is /dev/null so the snippet cannot eat the commands that follow it; a
        random marker ends the output so no command output can fake the end.
        """
        assert self.process.stdin is not None
        marker = f"__done_{secrets.token_hex(8)}__"
        framed = f"{{\n{script}\n}} </dev/null 2>&1\nprintf '\\n%s %s\\n' {marker} \"$?\"\n"
        await self.process.stdin.send_all(framed.encode())
        lines: list[str] = []
        while True:
            line = await self._reader.readline()
            if line.startswith(f"{marker} "):
                # The marker's leading newline guarantees a line of its own; drop the
                # empty line it adds after output that already ended with a newline.
                output = "\n".join(lines)
                return ShellResult(returncode=int(line.split()[1]), output=output.strip("\n"))
            lines.append(line)

    async def logout(self) -> None:
        """End the session and wait until sshd has removed its forwarded socket."""
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        await self.process.wait()
        await wait_until(lambda: not self.agent_socket.exists())


@contextlib.asynccontextmanager
async def ssh_session(sshd: Sshd, agent: ClientAgent, log_dir: Path) -> AsyncIterator[SshSession]:
    """Log in with `ssh -A` forwarding `agent`; log out (or kill ssh) when the block ends."""
    log = log_dir / f"ssh-{time.monotonic_ns()}.log"
    argv = [
        *sshd.ssh_argv(key=agent.key, forward_agent=True),
        # -T: no terminal, so the remote shell reads our pipe and prints no prompts.
        "-T",
        "exec bash --noprofile --norc -s",
    ]
    with log.open("ab") as log_stream:
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_stream,
            env=_laptop_environment(agent),
        )
    try:
        assert process.stdout is not None
        session = SshSession(
            agent=agent, process=process, log=log, reader=_LineReader(process.stdout)
        )
        # Both the login handshake and the socket's location arrive with this answer.
        # sshd creates the socket before it starts the shell, so it exists from here on.
        where = await session.run('printf "%s\\n" "$SSH_AUTH_SOCK"')
        if where.returncode != 0 or not where.output.startswith("/"):
            raise RuntimeError(f"session has no forwarded agent: {where}\n{tail(log)}")
        session.agent_socket = Path(where.output)
        yield session
    finally:
        await _end_process(process)


async def _end_process(process: trio.Process) -> None:
    """Log out by closing the shell's input, then reap ssh; kill it if it will not go."""
    with trio.move_on_after(TEARDOWN_GRACE, shield=True):
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                await stream.aclose()
        await process.wait()
    if process.returncode is None:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


def _laptop_environment(agent: ClientAgent) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "SSH_AUTH_SOCK": str(agent.socket),
    }


async def ssh_once(
    sshd: Sshd, agent: ClientAgent, command: str
) -> subprocess.CompletedProcess[bytes]:
    """Run one command over `ssh -A` and return its result."""
    argv = [*sshd.ssh_argv(key=agent.key, forward_agent=True), "-T", command]
    return await trio.run_process(
        argv,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        stdin=subprocess.DEVNULL,
        env=_laptop_environment(agent),
    )


def outbound_ssh_command(sshd: Sshd) -> str:
    """A shell command, for the test user, that logs back in to sshd through its agent."""
    argv = [*sshd.ssh_argv(key=None, forward_agent=False), "true"]
    return shlex.join(argv)


# Destination constraints (`ssh-add -h`, bound to sessions with session-bind@openssh.com)
# arrived in OpenSSH 8.9; an older ssh-add cannot add such a key at all.
DESTINATION_CONSTRAINTS_SINCE = (8, 9)


def openssh_version() -> tuple[int, int] | None:
    """The local OpenSSH client's (major, minor) version from `ssh -V`, or None if unknown."""
    shown = subprocess.run(["ssh", "-V"], capture_output=True, check=False, timeout=30)
    # ssh prints "OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL ..." on stderr.
    found = re.search(rb"OpenSSH_(\d+)\.(\d+)", shown.stderr + shown.stdout)
    if found is None:
        return None
    return int(found[1]), int(found[2])


def known_hosts_name(sshd: Sshd) -> str:
    """The name ssh and ssh-add look this sshd up by in known_hosts: `[127.0.0.1]:PORT`."""
    return f"[127.0.0.1]:{sshd.port}"


def known_hosts_line(sshd: Sshd) -> str:
    """A known_hosts line that names this sshd's own host key."""
    # running_sshd keeps the host key beside the log.
    key_type, key_blob = (sshd.log.parent / "host_ed25519.pub").read_text().split()[:2]
    return f"{known_hosts_name(sshd)} {key_type} {key_blob}"


@contextlib.contextmanager
def running_constrained_agent(
    socket_path: Path,
    key: KeyPair,
    log: Path,
    *,
    known_hosts: Path,
    destinations: Sequence[str],
) -> Iterator[ClientAgent]:
    """Run a laptop ssh-agent holding `key` only for `destinations` (`ssh-add -h`).

    `known_hosts` is where ssh-add looks up the host keys the constraints name (`-H`):
    ssh-agent identifies hosts by key, never by name.
    """
    constraints = [argument for destination in destinations for argument in ("-h", destination)]
    with running_client_agent(
        socket_path, key, log, add_options=("-H", str(known_hosts), *constraints)
    ) as agent:
        yield agent
