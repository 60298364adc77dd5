"""Security checks that need no second user: who an agent may be, and what logs hold.

The checks that need another unprivileged user (peer credentials, foreign sockets,
squatting, ptrace) are in tests/e2e/test_security.py; docs/SECURITY.md maps every check
to the test that proves it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio

from fakes import FakeAgent
from procs import ALLOW_ROOT, SWITCHER, accepts, control_request, notify_socket, wait_ready
from switcher.core import BackendUnavailableError, host_hash, open_backend
from world import World, answer, identities

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from pathlib import Path

# Hang guard for a test that runs a daemon and real OpenSSH tools; it turns a hang into a
# failure, nothing more.
GUARD = 60

OPENSSH_TOOLS = ("ssh-agent", "ssh-add", "ssh-keygen")
needs_openssh = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in OPENSSH_TOOLS),
    reason="needs OpenSSH's ssh-agent, ssh-add and ssh-keygen on PATH",
)


@attrs.define(eq=False)
class RootlessDaemon:
    """A `switcher daemon` subprocess of this test's user, with its paths and outputs."""

    process: trio.Process
    socket: Path
    control: Path
    log: Path
    output: Path  # its stdout and stderr

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@contextlib.asynccontextmanager
async def running_daemon(
    directory: Path, *, socket_path: Path, control_path: Path, agents_dirs: Sequence[Path]
) -> AsyncIterator[RootlessDaemon]:
    """Run `switcher daemon --log-level debug` until the block ends, then SIGTERM it."""
    log, output = directory / "daemon.log", directory / "daemon.out"
    argv = [
        *SWITCHER,
        "daemon",
        *ALLOW_ROOT,
        "--socket-path",
        str(socket_path),
        "--control-path",
        str(control_path),
        "--agents-dirs",
        ":".join(str(d) for d in agents_dirs),
        "--log-level",
        "debug",
        "--log-file",
        str(log),
    ]
    notify = notify_socket(directory / "n.sock")
    with output.open("ab") as stream:
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=stream,
            env={**os.environ, "NOTIFY_SOCKET": str(directory / "n.sock")},
        )
    try:
        with notify:
            await wait_ready(process, notify)
        yield RootlessDaemon(process, socket_path, control_path, log, output)
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


async def connect_and_close(path: Path, *, refuse_pid: int | None) -> None:
    """Open a backend connection the way the daemon does, and close it at once."""
    stream = await open_backend(str(path), refuse_pid=refuse_pid)
    await stream.aclose()


class TestRefusePid:
    async def test_a_listener_in_this_very_process_is_refused(self, short_tmp: Path) -> None:
        """open_backend(refuse_pid=our pid) refuses our own listener; without it, it connects."""
        path = short_tmp / "self.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, trio.fail_after(5):
            listener.bind(str(path))
            listener.listen(4)
            with pytest.raises(BackendUnavailableError) as refused:
                await connect_and_close(path, refuse_pid=os.getpid())
            await connect_and_close(path, refuse_pid=None)
        assert str(refused.value) == "listener is switcher itself"


class TestOwnSockets:
    async def test_the_daemons_own_sockets_are_never_backends(self, short_tmp: Path) -> None:
        """Sockets named like forwarded agents are skipped when they are the daemon's own.

        The agent socket sits at ssh-*/agent.* (the pre-10.1 layout) and the control socket
        at s.<this host>.sshd.* (10.1): discovery would take both, but for the (dev, inode)
        exclusion that the daemon passes it.
        """
        session = short_tmp / "ssh-switcher01"
        session.mkdir(mode=0o700)
        agent_path = session / "agent.sock"
        control_path = short_tmp / f"s.{host_hash()}.sshd.Switcher01"
        with trio.fail_after(GUARD):
            async with running_daemon(
                short_tmp,
                socket_path=agent_path,
                control_path=control_path,
                agents_dirs=[short_tmp],
            ) as daemon:
                await control_request(daemon.control, {"v": 1, "cmd": "refresh"})
                listed = await control_request(daemon.control, {"v": 1, "cmd": "list"})
            skipped = {
                e["path"]: e["reason"]
                for e in daemon.events()
                if e["event"] == "switcher.discovery.skipped"
            }
        assert (
            listed["backends"],
            skipped.get(str(agent_path)),
            skipped.get(str(control_path)),
        ) == ([], "our own socket", "our own socket")


class TestOtherHost:
    async def test_a_socket_forwarded_for_another_host_is_never_used(self, world: World) -> None:
        """A newer s.<other host>.sshd.* socket (an NFS home) is never probed nor chosen."""
        other_hash = host_hash(f"not-{socket.gethostname()}")
        assert other_hash != host_hash()
        ours, theirs = FakeAgent("ours", keys=[b"ours"]), FakeAgent("theirs", keys=[b"theirs"])
        with trio.fail_after(10):
            ours_path, _ = await world.start_agent(
                ours, world.agents_dir / f"s.{host_hash()}.sshd.OurSession"
            )
            await world.start_agent(theirs, world.agents_dir / f"s.{other_hash}.sshd.Elsewhere0")
            daemon = await world.start_daemon()
            await daemon.prober.refresh()
            reply = await identities(world)
            backends = [b.path for b in daemon.registry.snapshot().backends]
        assert (reply, backends, theirs.connections) == (answer(ours), [str(ours_path)], 0)


@attrs.define
class _Reader:
    """Reads the big-endian fields of an SSH wire-format buffer in order."""

    data: bytes
    offset: int = 0

    def uint32(self) -> int:
        (value,) = struct.unpack_from(">I", self.data, self.offset)
        self.offset += 4
        return int(value)

    def string(self) -> bytes:
        length = self.uint32()
        value = self.data[self.offset : self.offset + length]
        self.offset += length
        return value


def ed25519_private_bytes(private_key: Path) -> bytes:
    """The 64 secret bytes (seed, then public half) of an unencrypted OpenSSH ed25519 key.

    These are the bytes ssh-add sends in ADD_IDENTITY (PROTOCOL.key, "openssh-key-v1").
    """
    lines = private_key.read_text().splitlines()
    data = base64.b64decode("".join(line for line in lines if not line.startswith("-----")))
    magic = b"openssh-key-v1\0"
    assert data.startswith(magic)
    outer = _Reader(data, len(magic))
    cipher, kdf, _kdf_options = outer.string(), outer.string(), outer.string()
    assert (cipher, kdf) == (b"none", b"none")
    for _ in range(outer.uint32()):
        outer.string()  # the public keys
    inner = _Reader(outer.string(), 8)  # the private section, after its two check words
    key_type, _public, secret = inner.string(), inner.string(), inner.string()
    assert (key_type, len(secret)) == (b"ssh-ed25519", 64)
    return secret


def renderings(name: str, secret: bytes) -> dict[str, str]:
    """Ways a secret could show up in a text log: raw, hex, base64, as a bytes repr."""
    forms = {
        f"{name} hex": secret.hex(),
        f"{name} HEX": secret.hex().upper(),
        f"{name} base64": base64.b64encode(secret).decode(),
        f"{name} repr": repr(secret)[2:-1],
        # A prefix catches a truncated rendering (a repr cut at 80 characters, say).
        f"{name} prefix hex": secret[:12].hex(),
        f"{name} prefix repr": repr(secret[:12])[2:-1],
    }
    if secret.isascii():
        forms[f"{name} text"] = secret.decode()
    return forms


def leaked(text: str, forms: dict[str, str]) -> list[str]:
    return sorted(name for name, form in forms.items() if form in text)


class TestNoPayloadInLogs:
    @needs_openssh
    async def test_keys_and_passphrases_never_reach_a_real_daemons_logs(
        self, short_tmp: Path
    ) -> None:
        """ssh-add of a key, lock, unlock, through a debug-logging daemon: not a byte logged."""
        marker = secrets.token_hex(8)
        passphrase = f"lock-{marker}-passphrase".encode()
        key = short_tmp / "key"
        with trio.fail_after(GUARD):
            await trio.run_process(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"comment-{marker}",
                    "-f",
                    key,
                ]
            )
        private = ed25519_private_bytes(key)
        askpass = short_tmp / "askpass"
        askpass.write_text(f"#!/bin/sh\nprintf '%s\\n' '{passphrase.decode()}'\n")
        askpass.chmod(0o700)
        session = short_tmp / "agents" / "ssh-payload001"
        session.mkdir(parents=True, mode=0o700)
        agent_socket = session / "agent.1"
        with trio.fail_after(GUARD):
            agent = await trio.lowlevel.open_process(
                ["ssh-agent", "-D", "-a", str(agent_socket)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                while not accepts(agent_socket):
                    assert agent.poll() is None, "ssh-agent exited"
                    await trio.sleep(0.02)
                async with running_daemon(
                    short_tmp,
                    socket_path=short_tmp / "s.sock",
                    control_path=short_tmp / "c.sock",
                    agents_dirs=[short_tmp / "agents"],
                ) as daemon:
                    environment = {
                        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                        "HOME": str(short_tmp),
                        "SSH_AUTH_SOCK": str(daemon.socket),
                        # ssh-add -x and -X read the passphrase through askpass, twice
                        # for -x; "force" uses it even without a display or a tty.
                        "SSH_ASKPASS": str(askpass),
                        "SSH_ASKPASS_REQUIRE": "force",
                    }
                    statuses = []
                    for args in (["-q", str(key)], ["-x"], ["-X"], ["-D"]):
                        result = await trio.run_process(
                            ["ssh-add", *args],
                            env=environment,
                            stdin=subprocess.DEVNULL,
                            capture_stdout=True,
                            capture_stderr=True,
                            check=False,
                        )
                        statuses.append(result.returncode)
            finally:
                agent.kill()
                with trio.CancelScope(shield=True):
                    await agent.wait()
        relayed: dict[str, int] = {}
        for event in daemon.events():
            if event["event"] == "switcher.proxy.connection_closed":
                for name, count in event["requests"].items():
                    relayed[name] = relayed.get(name, 0) + count
        text = daemon.log.read_text() + daemon.output.read_text()
        forms = {
            **renderings("passphrase", passphrase),
            **renderings("private key", private),
            **renderings("seed", private[:32]),
            "marker": marker,  # in the passphrase and in the key's comment
        }
        assert (statuses, leaked(text, forms)) == ([0, 0, 0, 0], [])
        # The secrets did pass through this daemon, to a real agent that took them.
        assert {name: relayed.get(name) for name in ("ADD_IDENTITY", "LOCK", "UNLOCK")} == {
            "ADD_IDENTITY": 1,
            "LOCK": 1,
            "UNLOCK": 1,
        }

    def test_a_crashing_connection_logs_no_payload(self, short_tmp: Path) -> None:
        """A bug that crashes a connection is logged with its traceback, but no payload byte.

        The daemon logs unexpected exceptions with structlog's dict_tracebacks, whose
        default shows each frame's local variables: the request bytes in the relay's
        frames would land in the log. Run in a subprocess, because logging is configured
        once per process.
        """
        passphrase = f"crash-{secrets.token_hex(8)}-passphrase".encode()
        result = subprocess.run(
            [sys.executable, "-c", CRASH_SCRIPT, str(short_tmp), passphrase.decode()],
            capture_output=True,
            text=True,
            timeout=GUARD,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        text = (short_tmp / "crash.log").read_text()
        events = [json.loads(line)["event"] for line in text.splitlines()]
        assert (
            "switcher.proxy.connection_crashed" in events,
            leaked(text + result.stdout + result.stderr, renderings("passphrase", passphrase)),
        ) == (True, [])


class TestInitSnippet:
    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a socket to another uid")
    @pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
    @pytest.mark.parametrize(("owner", "exported"), [(0, True), (65534, False)])
    def test_exports_only_a_socket_of_ours(
        self, short_tmp: Path, owner: int, exported: bool
    ) -> None:
        """The init snippet exports SSH_AUTH_SOCK only for a socket its shell's user owns.

        The daemon start in the snippet is replaced by `true`, so only the snippet's own
        check (`[ -S ] && [ -O ]`) stands between a login shell and another uid's socket.
        """
        from switcher.cli._init import snippet  # noqa: PLC0415 - written alongside this test

        path = short_tmp / "agent.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(path))
            os.chown(path, owner, -1)
            code = snippet("bash", ["true"], path)
            script = f'SSH_AUTH_SOCK=/previous\n{code}\necho "$SSH_AUTH_SOCK"\n'
            result = subprocess.run(
                ["bash", "--norc", "-c", script],
                capture_output=True,
                text=True,
                timeout=GUARD,
                check=False,
            )
        assert result.stdout == (f"{path}\n" if exported else "/previous\n"), result.stderr


# Runs the agent proxy with the daemon's own logging set-up and a backend connection whose
# send_all fails in a way nothing expects (a stand-in for any bug), then sends it a LOCK
# request carrying the passphrase in argv[2].
CRASH_SCRIPT = r"""
import functools, socket, struct, sys
from pathlib import Path

import trio

from switcher.cli._logging import configure_logging
from switcher.core import (
    Candidate, Health, Layout, MessageType, ProbeResult, Registry, encode, serve_agent_proxy,
)


class Buggy(trio.abc.Stream):
    async def send_all(self, data):
        raise RuntimeError("a bug in the relay")

    async def wait_send_all_might_not_block(self):
        pass

    async def receive_some(self, max_bytes=None):
        await trio.sleep_forever()

    async def aclose(self):
        pass


async def main(directory, secret):
    sink = configure_logging("debug", directory / "crash.log")
    registry = Registry()
    registry.reconcile([Candidate(str(directory / "agent.1"), Layout.TMP, 1, 1, 1.0)])
    backend = registry.snapshot().backends[0]
    registry.record_probe(backend.id, ProbeResult(Health.HEALTHY, latency=0.001, key_count=1))

    async def connect(backend):
        return Buggy()

    async def rescan():
        pass

    listening = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listening.bind(str(directory / "proxy.sock"))
    listening.listen(4)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(
            serve_agent_proxy, trio.SocketListener(listening),
            registry=registry, rescan=rescan, grace=0.1, connect=connect,
        ))
        client = await trio.open_unix_socket(str(directory / "proxy.sock"))
        async with client:
            await client.send_all(encode(MessageType.LOCK, struct.pack(">I", len(secret)) + secret))
            while await client.receive_some():
                pass
        server.stop_accepting()
        await server.wait_stopped()
        nursery.cancel_scope.cancel()
    sink.close()


trio.run(main, Path(sys.argv[1]), sys.argv[2].encode())
"""
