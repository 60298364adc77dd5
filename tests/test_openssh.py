"""Real OpenSSH tools through a real daemon: ssh-agent behind, ssh-add in front.

Both directory layouts are covered: /tmp/ssh-*/agent.* (OpenSSH before
10.1) and ~/.ssh/agent/s.<hosthash>.sshd.* (10.1 and later).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest
import trio

from procs import Daemon, control_request, start_daemon, terminate
from switcher.core import host_hash

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("ssh-agent", "ssh-add", "ssh-keygen")),
    reason="needs OpenSSH's ssh-agent, ssh-add and ssh-keygen (Debian: openssh-client)",
)


def keygen(path: Path, comment: str = "switcher-test") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        timeout=60,
    )
    return path


def ssh_add(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ssh-add against ``sock``; the timeout only guards against a hang."""
    env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
    env.pop("DISPLAY", None)
    env.pop("SSH_ASKPASS", None)
    return subprocess.run(
        ["ssh-add", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@attrs.define(eq=False)
class Agents:
    """Real ssh-agent processes standing in for forwarded sessions."""

    root: Path
    processes: list[subprocess.Popen[bytes]] = attrs.Factory(list)
    _count: int = 0

    def start(self, path: Path) -> Path:
        """Run ``ssh-agent -D -a path`` and wait until it accepts."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        process = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        for _ in range(1000):
            if ssh_add(path, "-l").returncode in (0, 1):
                return path
            if process.poll() is not None:
                raise AssertionError(f"ssh-agent exited with {process.returncode}")
        raise AssertionError("ssh-agent never accepted")

    def legacy(self) -> Path:
        """A socket where sshd before 10.1 puts one: DIR/ssh-XXXX/agent.PID."""
        self._count += 1
        return self.start(self.root / "tmp" / f"ssh-test{self._count:06d}" / f"agent.{self._count}")

    def agent_dir(self) -> Path:
        """A socket where sshd 10.1+ puts one: ~/.ssh/agent/s.HASH.sshd.RANDOM."""
        self._count += 1
        name = f"s.{host_hash()}.sshd.rand{self._count:06d}"
        return self.start(self.root / "home" / ".ssh" / "agent" / name)

    @property
    def dirs(self) -> list[Path]:
        return [self.root / "home" / ".ssh" / "agent", self.root / "tmp"]

    def stop_all(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=30)


@pytest.fixture
def agents(short_tmp: Path) -> Iterator[Agents]:
    running = Agents(short_tmp)
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture
def key(short_tmp: Path) -> Path:
    return keygen(short_tmp / "id_test")


async def daemon_for(short_tmp: Path, agents: Agents) -> Daemon:
    (short_tmp / "d").mkdir()
    return await start_daemon(short_tmp / "d", agents=agents.dirs)


@pytest.fixture
async def stop_daemon() -> AsyncIterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        yield started
    finally:
        with trio.CancelScope(shield=True):
            for daemon in started:
                await terminate(daemon)


class TestThroughTheDaemon:
    @pytest.mark.parametrize("layout", ["legacy", "agent_dir"])
    async def test_add_list_sign_delete(
        self,
        short_tmp: Path,
        agents: Agents,
        key: Path,
        layout: str,
        stop_daemon: list[Daemon],
    ) -> None:
        """ssh-add adds, lists, signs with (-T) and deletes a key through switcher."""
        getattr(agents, layout)()
        with trio.fail_after(60):
            daemon = await daemon_for(short_tmp, agents)
            stop_daemon.append(daemon)
        sock = daemon.socket_path
        fingerprint = subprocess.run(
            ["ssh-keygen", "-l", "-f", f"{key}.pub"], capture_output=True, text=True, check=True
        ).stdout
        assert ssh_add(sock, "-l").returncode == 1  # reached an agent with no keys
        assert ssh_add(sock, str(key)).returncode == 0
        listed = ssh_add(sock, "-l")
        assert (listed.returncode, listed.stdout) == (0, fingerprint)
        assert ssh_add(sock, "-T", f"{key}.pub").returncode == 0
        assert ssh_add(sock, "-d", f"{key}.pub").returncode == 0
        assert ssh_add(sock, "-l").returncode == 1

    async def test_signing_a_file_with_ssh_keygen(
        self, short_tmp: Path, agents: Agents, key: Path, stop_daemon: list[Daemon]
    ) -> None:
        """`ssh-keygen -Y sign` signs through switcher, and the signature verifies."""
        backend = agents.legacy()
        assert ssh_add(backend, str(key)).returncode == 0
        with trio.fail_after(60):
            daemon = await daemon_for(short_tmp, agents)
            stop_daemon.append(daemon)
        data = short_tmp / "data"
        data.write_text("signed through switcher\n")
        env = {**os.environ, "SSH_AUTH_SOCK": str(daemon.socket_path)}
        subprocess.run(
            ["ssh-keygen", "-Y", "sign", "-f", f"{key}.pub", "-n", "file", str(data)],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        signers = short_tmp / "allowed"
        signers.write_text(f"tester {Path(f'{key}.pub').read_text()}")
        with data.open("rb") as message:
            verified = subprocess.run(
                [
                    "ssh-keygen",
                    "-Y",
                    "verify",
                    "-f",
                    str(signers),
                    "-I",
                    "tester",
                    "-n",
                    "file",
                    "-s",
                    f"{data}.sig",
                ],
                stdin=message,
                capture_output=True,
                timeout=60,
                check=False,
            )
        assert verified.returncode == 0

    async def test_identities_answer_over_64_kib(
        self, short_tmp: Path, agents: Agents, stop_daemon: list[Daemon]
    ) -> None:
        """Hundreds of keys (an answer over 64 KiB) are listed in full through switcher."""
        backend = agents.legacy()
        keys = [
            keygen(short_tmp / f"k{i:03d}", comment=f"{i:03d}-" + "c" * 400) for i in range(170)
        ]
        assert ssh_add(backend, *map(str, keys)).returncode == 0
        direct = ssh_add(backend, "-L")
        assert len(direct.stdout) > 64 * 1024
        with trio.fail_after(60):
            daemon = await daemon_for(short_tmp, agents)
            stop_daemon.append(daemon)
        assert ssh_add(daemon.socket_path, "-L").stdout == direct.stdout

    async def test_newest_session_wins_and_a_killed_one_falls_back(
        self, short_tmp: Path, agents: Agents, stop_daemon: list[Daemon]
    ) -> None:
        """The newer of two agents serves; once it is killed (stale file), the older serves."""
        old_key, new_key = keygen(short_tmp / "old"), keygen(short_tmp / "new")
        old = agents.legacy()
        assert ssh_add(old, str(old_key)).returncode == 0
        new = agents.agent_dir()
        assert ssh_add(new, str(new_key)).returncode == 0
        with trio.fail_after(60):
            daemon = await daemon_for(short_tmp, agents)
            stop_daemon.append(daemon)
            # Both probed: an unprobed session never outranks a probed one, so
            # "newest wins" is about two agents the daemon has heard from.
            await control_request(daemon.control_path, {"v": 1, "cmd": "refresh"})
        assert ssh_add(daemon.socket_path, "-L").stdout == Path(f"{new_key}.pub").read_text()
        killed = agents.processes[1]
        killed.kill()
        killed.wait(timeout=30)
        assert new.exists()  # a killed agent leaves its socket file behind
        assert ssh_add(daemon.socket_path, "-L").stdout == Path(f"{old_key}.pub").read_text()

    async def test_no_agent_fails_promptly(
        self, short_tmp: Path, agents: Agents, stop_daemon: list[Daemon]
    ) -> None:
        """With no live agent, `ssh-add -l` through switcher exits 1 rather than hanging."""
        with trio.fail_after(60):
            daemon = await daemon_for(short_tmp, agents)
            stop_daemon.append(daemon)
        result = ssh_add(daemon.socket_path, "-l")
        assert (result.returncode, result.stderr) == (
            1,
            "error fetching identities: agent refused operation\n",
        )
