"""`switcher init SHELL`: the login-script code, evaluated by real shells in a clean environment."""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from procs import (
    ALLOW_ROOT,
    LOG_NAME,
    PID_NAME,
    SOCKET_NAME,
    SWITCHER,
    Reaper,
    accepts,
    daemon_flags,
    log_events,
    run_cli,
)

# Every shell (and the daemon it starts) gets this long before the test gives up.
HANG_GUARD_S = 20
SHELLS = ["bash", "zsh", "fish"]
# Any uid that is not ours: chown to it needs root, and it need not exist.
OTHER_UID = 65534


def login(
    shell: str, home: Path, init_args: list[str], *, before: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run what a login script would, in ``env -i``: evaluate `switcher init SHELL ARGS`,
    then print SSH_AUTH_SOCK. ``SSH_AUTH_SOCK`` starts as ``/previous``."""
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    init = shlex.join([*SWITCHER, "init", shell, *init_args])
    if shell == "fish":
        argv = [
            "fish",
            "--no-config",
            "-c",
            f"{before}{init} | source; printf '%s\\n' \"$SSH_AUTH_SOCK\"",
        ]
    else:
        no_rc = ["--noprofile", "--norc"] if shell == "bash" else ["-f"]
        argv = [shell, *no_rc, "-c", f'{before}eval "$({init})"; printf \'%s\\n\' "$SSH_AUTH_SOCK"']
    env = ["env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin", "SSH_AUTH_SOCK=/previous"]
    return subprocess.run(
        [*env, *argv], capture_output=True, text=True, timeout=HANG_GUARD_S, check=False
    )


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def start_command(snippet: str) -> list[str]:
    """The words of the command the snippet runs to start the daemon."""
    words = shlex.split(snippet.splitlines()[1])  # `if CMD && [ -S ... ]` / `if CMD; and ...`
    end = next(i for i, w in enumerate(words) if w in {"&&", "and"} or w.endswith(";"))
    return [w.rstrip(";") for w in words[1 : end + 1] if w not in {"&&", "and"}]


class TestLogin:
    @pytest.mark.parametrize("shell", SHELLS)
    def test_exports_the_socket_once_the_daemon_is_up(
        self, short_tmp: Path, reaper: Reaper, shell: str
    ) -> None:
        """Evaluated by SHELL in a clean environment, the code starts the daemon and exports
        its socket (even at a path that needs quoting), printing nothing else."""
        home = private_dir(short_tmp / "home")
        run = private_dir(short_tmp / "it's run")
        result = login(shell, home, daemon_flags(run))
        assert (result.returncode, result.stdout, result.stderr) == (
            0,
            f"{run / SOCKET_NAME}\n",
            "",
        )
        reaper.adopt_pid_file(run / PID_NAME)
        assert accepts(run / SOCKET_NAME)
        # The daemon's files went where the flags said (fish makes its own config dirs).
        assert list(home.rglob("switcher*")) == []

    def test_a_second_login_starts_nothing(self, short_tmp: Path, reaper: Reaper) -> None:
        """A second login evaluates the same code: same socket, same daemon, one start."""
        home = private_dir(short_tmp / "home")
        run = private_dir(short_tmp / "run")
        first = login("bash", home, daemon_flags(run))
        pid, _ = reaper.adopt_pid_file(run / PID_NAME)
        second = login("bash", home, daemon_flags(run))
        assert [(r.returncode, r.stdout, r.stderr) for r in (first, second)] == [
            (0, f"{run / SOCKET_NAME}\n", "")
        ] * 2
        assert (run / PID_NAME).read_text() == f"{pid}\n"
        started = [e for e in log_events(run / LOG_NAME) if e["event"] == "switcher.daemon.started"]
        assert len(started) == 1

    @pytest.mark.parametrize("shell", SHELLS)
    def test_keeps_ssh_auth_sock_when_the_daemon_cannot_start(
        self, short_tmp: Path, shell: str
    ) -> None:
        """When the daemon refuses to start, SSH_AUTH_SOCK keeps its value; stderr has the
        daemon's reason and one warning line."""
        home = private_dir(short_tmp / "home")
        shared = short_tmp / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        flags = [*daemon_flags(short_tmp), "--socket-path", str(shared / SOCKET_NAME)]
        result = login(shell, home, flags)
        assert (result.returncode, result.stdout, result.stderr.splitlines()) == (
            0,
            "/previous\n",
            [
                (
                    f"switcher: {shared} is writable by group or others and not sticky; "
                    "another user could replace the socket"
                ),
                (
                    f"switcher: no socket of yours at {shared / SOCKET_NAME}; "
                    "SSH_AUTH_SOCK left as it was"
                ),
            ],
        )

    @pytest.mark.skipif(os.geteuid() != 0, reason="giving a socket to another uid needs root")
    @pytest.mark.parametrize("shell", SHELLS)
    def test_never_exports_another_users_socket(self, short_tmp: Path, shell: str) -> None:
        """Even when the daemon reports success, a socket owned by someone else is not
        exported: SSH_AUTH_SOCK keeps its value and one warning line says why."""
        home = private_dir(short_tmp / "home")
        run = private_dir(short_tmp / "run")
        path = run / SOCKET_NAME
        # A held instance lock makes `daemon --daemon` answer "already running" (0) ...
        lock = os.open(run / f"{SOCKET_NAME}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with socket.socket(socket.AF_UNIX) as squatter:
                squatter.bind(str(path))  # ... while the socket there is another uid's.
                os.chown(path, OTHER_UID, -1)
                result = login(shell, home, daemon_flags(run))
        finally:
            os.close(lock)
        assert (result.stdout, result.stderr) == (
            "/previous\n",
            f"switcher: no socket of yours at {path}; SSH_AUTH_SOCK left as it was\n",
        )


class TestOutput:
    def test_runs_python_m_switcher_by_absolute_path(self) -> None:
        """Run as `python -m switcher`, the code starts this interpreter by absolute path."""
        result = run_cli("init", *ALLOW_ROOT, "bash")
        assert start_command(result.stdout) == [
            os.path.abspath(sys.executable),
            *("-m", "switcher", "daemon", "--daemon", *ALLOW_ROOT),
        ]

    def test_runs_the_switcher_script_by_absolute_path(
        self,
        short_tmp: Path,  # noqa: ARG002 (a private cwd for the relative path)
    ) -> None:
        """Run as a script by a relative path, the code names that script absolutely."""
        script = Path(sys.executable).parent / "switcher"
        if not script.is_file():
            pytest.skip(f"no console script at {script}")
        result = subprocess.run(
            ["./switcher", "init", *ALLOW_ROOT, "zsh"],
            cwd=script.parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert start_command(result.stdout) == [str(script), "daemon", "--daemon", *ALLOW_ROOT]

    def test_passes_the_daemon_flags_given_on(self, short_tmp: Path) -> None:
        """Daemon flags given to init are passed on, relative paths made absolute, and no
        others; SSH_AUTH_SOCK is the --socket-path."""
        result = subprocess.run(
            [
                *(*SWITCHER, "init", "fish"),
                *("--socket-path", "rel/s.sock", "--agents-dirs", "/a:/b"),
                *("--probe-interval", "0.5", "--log-level", "debug", *ALLOW_ROOT),
            ],
            cwd=short_tmp,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert start_command(result.stdout)[3:] == [
            *("daemon", "--daemon"),
            *("--socket-path", str(short_tmp / "rel/s.sock"), "--agents-dirs", "/a:/b"),
            *("--log-level", "debug", *ALLOW_ROOT, "--probe-interval", "0.5"),
        ]
        assert f"set -gx SSH_AUTH_SOCK '{short_tmp}/rel/s.sock'" in result.stdout

    def test_defaults_to_the_stable_socket(self) -> None:
        """Without flags, the code exports /tmp/switcher-$UID/agent.sock."""
        result = run_cli("init", *ALLOW_ROOT, "zsh")
        assert f"export SSH_AUTH_SOCK=/tmp/switcher-{os.getuid()}/agent.sock\n" in result.stdout

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
    @pytest.mark.parametrize(
        ("shell", "line"),
        [
            ("bash", 'eval "$(switcher init --allow-root bash)"'),
            ("fish", "switcher init --allow-root fish | source"),
        ],
    )
    def test_as_root_says_the_line_that_works(self, shell: str, line: str) -> None:
        """As root without --allow-root, init prints no code and names the login line that
        works for root (the daemon would refuse anyway)."""
        result = run_cli("init", shell)
        assert (result.returncode, result.stdout, result.stderr) == (
            1,
            "",
            (
                "switcher: refusing to start a daemon as root: switcher relays the agents of the "
                f"user it runs as; for root's own agents: {line}\n"
            ),
        )

    def test_an_unknown_shell_exits_2(self) -> None:
        """Only bash, zsh and fish are known; anything else is a usage error."""
        result = run_cli("init", "tcsh")
        assert (result.returncode, "invalid choice: 'tcsh'" in result.stderr) == (2, True)
