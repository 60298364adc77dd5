"""Lifecycle through the real CLI: --daemon, pid and log files, re-created sockets, SIGHUP."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from fakes import AgentClient, FakeAgent
from procs import (
    ALLOW_ROOT,
    CONTROL_NAME,
    LOG_NAME,
    PID_NAME,
    SOCKET_NAME,
    SWITCHER,
    Reaper,
    accepts,
    daemon_flags,
    has_exited,
    log_events,
    logged,
    notify_socket,
    wait_exited,
    wait_logged,
    wait_ready,
)
from switcher import paths, pathsafety, pidfile
from switcher.core import MessageType, encode
from switcher.socketkeeper import SwappableListener

# Every subprocess and every wait in these tests gives up after this long.
HANG_GUARD_S = 20
FAILURE = encode(MessageType.FAILURE)


def start(
    *args: str, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`switcher daemon --daemon ARGS`, with its output captured (pipes it must not keep)."""
    return subprocess.run(
        [*SWITCHER, "daemon", "--daemon", *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
        env=env,
        pass_fds=pass_fds,
    )


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1], ...)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def events(path: Path) -> list[object]:
    return [e["event"] for e in log_events(path)]


async def wait_for_event(path: Path, event: str) -> None:
    await wait_logged(path, logged(event))


async def stop(pid: int, pidfd: int) -> None:
    os.kill(pid, signal.SIGTERM)
    await wait_exited(pidfd)


class TestDetach:
    async def test_returns_once_listening_with_a_pid_file(
        self, short_tmp: Path, reaper: Reaper
    ) -> None:
        """--daemon returns 0 only when both sockets accept, leaving a daemon that has a pid
        file, no terminal, its own session (not as its leader), "/" as cwd and /dev/null as
        stdin."""
        result = start(*daemon_flags(short_tmp))
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        assert (accepts(short_tmp / SOCKET_NAME), accepts(short_tmp / CONTROL_NAME)) == (True, True)
        pid, pidfd = reaper.adopt_pid_file(short_tmp / PID_NAME)
        fields = proc_stat(pid)
        ppid, session, tty_nr = int(fields[1]), int(fields[3]), int(fields[4])
        assert (tty_nr, session != os.getsid(0), session != pid, ppid != os.getpid()) == (
            0,
            True,
            True,
            True,
        )
        if os.geteuid() == 0:  # the daemon is not dumpable: only root may look
            assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
            assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert stat.S_IMODE((short_tmp / PID_NAME).stat().st_mode) == 0o600
        assert "switcher.daemon.started" in events(short_tmp / LOG_NAME)
        with trio.fail_after(HANG_GUARD_S):
            await stop(pid, pidfd)
        # Sockets, locks and the pid file are gone; the log stays.
        assert sorted(p.name for p in short_tmp.iterdir()) == [LOG_NAME]

    async def test_keeps_no_descriptor_of_its_caller(self, short_tmp: Path, reaper: Reaper) -> None:
        """A descriptor the caller left open (a pipe a `$(...)` reads) is closed in the daemon."""
        read_end, write_end = os.pipe()
        try:
            result = start(*daemon_flags(short_tmp), pass_fds=(write_end,))
            os.close(write_end)
            write_end = -1
            assert result.returncode == 0
            reaper.adopt_pid_file(short_tmp / PID_NAME)
            with trio.fail_after(HANG_GUARD_S):
                await trio.lowlevel.wait_readable(read_end)
            assert os.read(read_end, 1) == b""  # end of file: nobody holds the write end
        finally:
            os.close(read_end)
            if write_end != -1:
                os.close(write_end)

    @pytest.mark.parametrize("runtime_dir", [True, False], ids=["runtime-dir", "no-runtime-dir"])
    async def test_default_files_follow_xdg(
        self, short_tmp: Path, reaper: Reaper, runtime_dir: bool
    ) -> None:
        """Without --pid-file and --log-file, the pid file goes to $XDG_RUNTIME_DIR (else the
        state dir) and the log to $XDG_STATE_HOME/switcher, made with mode 0700."""
        home = short_tmp / "home"
        home.mkdir()
        env = {"HOME": str(home), "PATH": os.environ["PATH"], "XDG_STATE_HOME": str(home / "st")}
        if runtime_dir:
            (short_tmp / "run").mkdir(mode=0o700)
            env["XDG_RUNTIME_DIR"] = str(short_tmp / "run")
        flags = [
            *ALLOW_ROOT,
            *("--socket-path", str(short_tmp / SOCKET_NAME)),
            *("--control-path", str(short_tmp / CONTROL_NAME)),
            *("--agents-dirs", str(short_tmp / "none")),
        ]
        result = start(*flags, env=env)
        assert (result.returncode, result.stderr) == (0, "")
        pid_file = (
            short_tmp / "run" / "switcher.pid" if runtime_dir else home / "st/switcher/switcher.pid"
        )
        pid, pidfd = reaper.adopt_pid_file(pid_file)
        state = home / "st" / "switcher"
        assert "switcher.daemon.started" in events(state / "switcher.log")
        assert [stat.S_IMODE(d.stat().st_mode) for d in (home / "st", state)] == [0o700, 0o700]
        with trio.fail_after(HANG_GUARD_S):
            await stop(pid, pidfd)
        assert not pid_file.exists()

    async def test_home_state_dir_without_xdg_variables(
        self, short_tmp: Path, reaper: Reaper
    ) -> None:
        """With no XDG variables at all, pid file and log go to ~/.local/state/switcher, every
        directory switcher made there being 0700."""
        home = short_tmp / "home"
        home.mkdir()
        env = {"HOME": str(home), "PATH": os.environ["PATH"]}
        result = start(
            *ALLOW_ROOT,
            *("--socket-path", str(short_tmp / SOCKET_NAME)),
            *("--control-path", str(short_tmp / CONTROL_NAME)),
            *("--agents-dirs", str(short_tmp / "none")),
            env=env,
        )
        assert (result.returncode, result.stderr) == (0, "")
        state = home / ".local" / "state" / "switcher"
        reaper.adopt_pid_file(state / "switcher.pid")
        assert "switcher.daemon.started" in events(state / "switcher.log")
        made = [home / ".local", home / ".local" / "state", state]
        assert [stat.S_IMODE(d.stat().st_mode) for d in made] == [0o700] * 3

    async def test_foreground_pid_file(self, short_tmp: Path) -> None:
        """A foreground daemon writes --pid-file too, and removes it when it stops."""
        pid_file = short_tmp / PID_NAME
        with trio.fail_after(HANG_GUARD_S), notify_socket(short_tmp / "n.sock") as notify:
            process = await trio.lowlevel.open_process(
                [*SWITCHER, "daemon", *daemon_flags(short_tmp)],
                env={**os.environ, "NOTIFY_SOCKET": str(short_tmp / "n.sock")},
            )
            try:
                await wait_ready(process, notify)
                assert pid_file.read_text() == f"{process.pid}\n"
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        assert not pid_file.exists()


class TestAlreadyRunning:
    async def test_second_start_exits_0_and_starts_nothing(
        self, short_tmp: Path, reaper: Reaper
    ) -> None:
        """A second --daemon on the same socket exits 0, silently, and starts no daemon."""
        assert start(*daemon_flags(short_tmp)).returncode == 0
        pid, _ = reaper.adopt_pid_file(short_tmp / PID_NAME)
        second = start(*daemon_flags(short_tmp))
        assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
        assert (short_tmp / PID_NAME).read_text() == f"{pid}\n"
        assert events(short_tmp / LOG_NAME).count("switcher.daemon.started") == 1

    async def test_foreground_still_exits_3(self, short_tmp: Path, reaper: Reaper) -> None:
        """Without --daemon, a second start still says a switcher is running and exits 3."""
        assert start(*daemon_flags(short_tmp)).returncode == 0
        reaper.adopt_pid_file(short_tmp / PID_NAME)
        result = subprocess.run(
            [*SWITCHER, "daemon", *daemon_flags(short_tmp)],
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
            check=False,
        )
        assert (result.returncode, result.stderr) == (
            3,
            f"switcher: another switcher is already running for {short_tmp / SOCKET_NAME}\n",
        )


class TestStartFailures:
    def test_unsafe_socket_path(self, short_tmp: Path) -> None:
        """An unsafe socket directory: the starter prints the daemon's reason and exits 1,
        and nothing was created or left running."""
        shared = short_tmp / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        flags = [*daemon_flags(short_tmp), "--socket-path", str(shared / SOCKET_NAME)]
        result = start(*flags)
        assert (result.returncode, result.stdout, result.stderr) == (
            1,
            "",
            (
                f"switcher: {shared} is writable by group or others and not sticky; "
                "another user could replace the socket\n"
            ),
        )
        assert (list(shared.iterdir()), (short_tmp / PID_NAME).exists()) == ([], False)

    @pytest.mark.parametrize("what", ["log", "pid"])
    def test_failure_after_detaching_comes_back_through_the_pipe(
        self, short_tmp: Path, what: str
    ) -> None:
        """A log or pid file the detached daemon cannot write: the starter prints that
        reason and exits 1, and the daemon left no socket behind."""
        (short_tmp / "file").write_text("")
        bad = short_tmp / "file" / "x"  # under a regular file: ENOTDIR
        flag = {"log": "--log-file", "pid": "--pid-file"}[what]
        result = start(*daemon_flags(short_tmp), flag, str(bad))
        message = {
            "log": f"cannot open log file {bad}: Not a directory",
            "pid": f"cannot write pid file {bad}: Not a directory",
        }[what]
        assert (result.returncode, result.stderr) == (1, f"switcher: {message}\n")
        assert not (short_tmp / SOCKET_NAME).exists()
        assert not (short_tmp / CONTROL_NAME).exists()


class TestSocketsComeBack:
    @pytest.mark.parametrize("removed", ["socket", "directory"])
    async def test_removed_socket_comes_back_and_clients_keep_working(
        self, short_tmp: Path, reaper: Reaper, removed: str
    ) -> None:
        """Sockets (or their whole directory) removed under a running daemon are re-created
        within a probe interval, logged once each; a client connected before keeps being
        served, and new clients reach the new socket."""
        agents = short_tmp / "agents"
        session = agents / "ssh-0000000001"
        session.mkdir(parents=True, mode=0o700)
        run = short_tmp / "run"
        run.mkdir(mode=0o700)
        agent = FakeAgent("one")
        expected = agent.answer(MessageType.REQUEST_IDENTITIES)
        with trio.fail_after(HANG_GUARD_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.serve_unix, str(session / "agent.1"))
                flags = [
                    *daemon_flags(run, agents=[agents]),
                    *("--probe-interval", "0.2"),
                ]
                result = await trio.to_thread.run_sync(lambda: start(*flags))
                assert result.returncode == 0, result.stderr
                reaper.adopt_pid_file(run / PID_NAME)
                log = run / LOG_NAME
                log_copy = short_tmp / "log"  # the log is in `run`, which may go
                log_copy.hardlink_to(log)
                old = AgentClient(await trio.open_unix_socket(str(run / SOCKET_NAME)))
                async with old.stream:
                    while await old.request(MessageType.REQUEST_IDENTITIES) != expected:
                        await trio.sleep(0.02)  # until the daemon has probed the agent
                    if removed == "socket":
                        (run / SOCKET_NAME).unlink()
                        (run / CONTROL_NAME).unlink()
                    else:
                        for entry in run.iterdir():
                            entry.unlink()
                        run.rmdir()
                    await wait_logged(log_copy, logged("switcher.daemon.socket_recreated", 2))
                    assert (accepts(run / SOCKET_NAME), accepts(run / CONTROL_NAME)) == (True, True)
                    assert await old.request(MessageType.REQUEST_IDENTITIES) == expected
                    new = AgentClient(await trio.open_unix_socket(str(run / SOCKET_NAME)))
                    async with new.stream:
                        assert await new.request(MessageType.REQUEST_IDENTITIES) == expected
                nursery.cancel_scope.cancel()
        assert stat.S_IMODE(run.stat().st_mode) == 0o700
        assert stat.S_IMODE((run / SOCKET_NAME).stat().st_mode) == 0o600
        recreated = [
            str(e["path"])
            for e in log_events(log_copy)
            if e["event"] == "switcher.daemon.socket_recreated"
        ]
        assert sorted(recreated) == sorted([str(run / SOCKET_NAME), str(run / CONTROL_NAME)])

    async def test_a_switcher_that_took_the_path_wins(
        self, short_tmp: Path, reaper: Reaper
    ) -> None:
        """If another switcher took the path while ours was gone, the old daemon notices,
        says so once, and stops; the new one keeps serving."""
        run = short_tmp / "run"
        run.mkdir(mode=0o700)
        old_flags = [*daemon_flags(run), "--probe-interval", "0.2"]
        old_flags[old_flags.index("--pid-file") + 1] = str(short_tmp / "old.pid")
        old_flags[old_flags.index("--log-file") + 1] = str(short_tmp / "old.log")
        assert start(*old_flags).returncode == 0
        old_pid, old_pidfd = reaper.adopt_pid_file(short_tmp / "old.pid")
        # Frozen, the old daemon cannot notice anything until the new one is up.
        os.kill(old_pid, signal.SIGSTOP)
        try:
            for entry in run.iterdir():
                entry.unlink()
            run.rmdir()
            run.mkdir(mode=0o700)  # a --socket-path directory must exist at start-up
            assert start(*daemon_flags(run)).returncode == 0
            reaper.adopt_pid_file(run / PID_NAME)
        finally:
            os.kill(old_pid, signal.SIGCONT)
        with trio.fail_after(HANG_GUARD_S):
            await wait_exited(old_pidfd)
        old_events = events(short_tmp / "old.log")
        assert old_events[-3:] == [
            "switcher.daemon.socket_lost",
            "switcher.daemon.stopping",
            "switcher.daemon.stopped",
        ]
        assert (accepts(run / SOCKET_NAME), (run / SOCKET_NAME).exists()) == (True, True)


class TestSighup:
    async def test_sighup_reopens_the_log_and_refreshes(
        self, short_tmp: Path, reaper: Reaper
    ) -> None:
        """After logrotate moves the log, SIGHUP makes the daemon write the next lines to a
        new file at the same path, and refresh its agents; it keeps running."""
        assert start(*daemon_flags(short_tmp)).returncode == 0
        pid, pidfd = reaper.adopt_pid_file(short_tmp / PID_NAME)
        log = short_tmp / LOG_NAME
        log.rename(short_tmp / "rotated.log")
        os.kill(pid, signal.SIGHUP)
        with trio.fail_after(HANG_GUARD_S):
            await wait_for_event(log, "switcher.daemon.refreshed")
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(short_tmp / SOCKET_NAME))
            await wait_for_event(log, "switcher.proxy.connection_closed")
        assert not has_exited(pidfd)
        assert events(log) == [
            "switcher.daemon.sighup",
            "switcher.daemon.refreshed",
            "switcher.proxy.connection_closed",
        ]
        assert "switcher.daemon.sighup" not in events(short_tmp / "rotated.log")


class TestPlaces:
    @pytest.mark.parametrize(
        ("env", "pid_file", "log_file"),
        [
            (
                {"HOME": "/h", "XDG_RUNTIME_DIR": "/run/u", "XDG_STATE_HOME": "/st"},
                "/run/u/switcher.pid",
                "/st/switcher/switcher.log",
            ),
            (
                {"HOME": "/h", "XDG_STATE_HOME": "/st"},
                "/st/switcher/switcher.pid",
                "/st/switcher/switcher.log",
            ),
            (
                # Relative values are invalid in the XDG spec, and ignored.
                {"HOME": "/h", "XDG_RUNTIME_DIR": "run", "XDG_STATE_HOME": "st"},
                "/h/.local/state/switcher/switcher.pid",
                "/h/.local/state/switcher/switcher.log",
            ),
        ],
        ids=["runtime-dir", "state-dir", "relative-ignored"],
    )
    def test_default_pid_and_log_files(
        self, env: dict[str, str], pid_file: str, log_file: str
    ) -> None:
        """The pid file prefers $XDG_RUNTIME_DIR; both fall back to the XDG state dir."""
        assert (str(paths.default_pid_file(env)), str(paths.default_log_file(env))) == (
            pid_file,
            log_file,
        )

    def test_private_dirs_are_0700_and_existing_ones_untouched(self, short_tmp: Path) -> None:
        """make_private_dirs creates what is missing with mode 0700, under any umask, and
        leaves an existing directory's mode alone."""
        (short_tmp / "a").mkdir(mode=0o755)
        (short_tmp / "a").chmod(0o755)
        old = os.umask(0o177)
        try:
            pathsafety.make_private_dirs(short_tmp / "a" / "b" / "c")
        finally:
            os.umask(old)
        modes = [stat.S_IMODE((short_tmp / p).stat().st_mode) for p in ("a", "a/b", "a/b/c")]
        assert modes == [0o755, 0o700, 0o700]

    def test_pid_file_is_removed_only_while_it_names_us(self, short_tmp: Path) -> None:
        """A daemon removes the pid file at exit only if a newer daemon has not replaced it."""
        path = short_tmp / PID_NAME
        pidfile.write_pid_file(path, 1234)
        pidfile.remove_pid_file(path, 999)
        kept = path.read_text()
        pidfile.remove_pid_file(path, 1234)
        assert (kept, path.exists()) == ("1234\n", False)


class TestSwappableListener:
    @pytest.mark.parametrize("how", ["accept", "accept_socket"])
    async def test_a_waiting_accept_moves_to_the_new_socket(
        self, short_tmp: Path, how: str
    ) -> None:
        """Swapping wakes a task waiting in accept (a stream, or a plain socket for the
        proxy), which then accepts on the new socket; the old socket is closed; closing
        for good ends accept with ClosedResourceError."""

        def listening(name: str) -> socket.socket:
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(short_tmp / name))
            sock.listen()
            return sock

        old, new = listening("old.sock"), listening("new.sock")
        swappable = SwappableListener(old)
        accepted: list[trio.SocketStream | socket.socket] = []
        one_accepted, ended = trio.Event(), trio.Event()

        async def accept_all() -> None:
            try:
                while True:
                    if how == "accept":
                        accepted.append(await swappable.accept())
                    else:
                        accepted.append(await swappable.accept_socket())
                    one_accepted.set()
            except trio.ClosedResourceError:
                ended.set()

        with trio.fail_after(HANG_GUARD_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_all)
                await trio.testing.wait_all_tasks_blocked()
                await swappable.swap(new)
                client = await trio.open_unix_socket(str(short_tmp / "new.sock"))
                await one_accepted.wait()
                old_refused = not accepts(short_tmp / "old.sock")
                await swappable.aclose()
                await ended.wait()
        await client.aclose()
        for connection in accepted:
            if isinstance(connection, socket.socket):
                connection.close()
            else:
                await connection.aclose()
        assert (len(accepted), old_refused) == (1, True)
