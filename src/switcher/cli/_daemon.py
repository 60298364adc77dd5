"""``switcher daemon``: claim the sockets, detach if asked, set up logging, run trio.

Until the sockets are ours this runs on the standard library alone: a login
script's ``switcher daemon --daemon`` that finds a switcher already running
answers at once, before anything loads trio, structlog or the daemon.
Only a process that is going to serve imports them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from switcher import _defaults, _systemd, paths
from switcher._signals import HeldSignals
from switcher.cli._detach import StartReport, daemonize
from switcher.cli._exit import EXIT_ALREADY_RUNNING, EXIT_OK, EXIT_REFUSED, fail

# Not `from typing import TYPE_CHECKING`: see switcher.paths.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from switcher.config import Config
    from switcher.daemon import Sockets


class _AgentSocketTakenError(paths.AlreadyRunningError):
    """Another switcher serves our agent socket: what --daemon calls success."""


def run(args: argparse.Namespace) -> int:
    if os.geteuid() == 0 and not args.allow_root:
        fail(
            "refusing to run as root: switcher relays the agents of the user it runs as, "
            "so run it as that user (or pass --allow-root if you mean root's own agents)"
        )
        return EXIT_REFUSED
    # Everything we create (sockets, log file, lock, pid file) is private by
    # default, as jmmv/ssh-agent-switcher does.
    os.umask(0o177)
    # From before the socket exists: whoever sees it may signal us at once.
    held_signals = HeldSignals()
    held_signals.install()
    # Before the daemon moves to "/": relative paths mean where the user was.
    for name in ("log_file", "pid_file"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).absolute())
    sockets = _sockets_or_status(args)
    if isinstance(sockets, int):
        return sockets
    # From here on we are the one daemon for these paths.
    if args.daemon:
        return daemonize(
            lambda report: _serve(args, sockets, report, held_signals),
            in_starter=held_signals.restore_defaults,
        )
    return _serve(args, sockets, StartReport(), held_signals)


def _sockets_or_status(args: argparse.Namespace) -> Sockets | int:
    """Our agent and control sockets, or the status to exit with if they cannot be ours."""
    socket_path = (args.socket_path or paths.default_socket_path()).absolute()
    # Without --control-path, the control socket follows the agent socket:
    # two daemons on different socket paths never share one.
    control_path = (
        args.control_path or Path(_defaults.control_path_for(os.fspath(socket_path)))
    ).absolute()
    try:
        return _take_sockets(socket_path, control_path)
    except _AgentSocketTakenError as exc:
        if args.daemon:
            return EXIT_OK  # the login script's question was "is it up?", and it is
        status, message = EXIT_ALREADY_RUNNING, str(exc)
    except paths.AlreadyRunningError as exc:
        status, message = EXIT_ALREADY_RUNNING, str(exc)
    except (paths.UnsafePathError, _systemd.ActivationError) as exc:
        status, message = EXIT_REFUSED, str(exc)
    fail(message)
    return status


def _take_sockets(socket_path: Path, control_path: Path) -> Sockets:
    """The agent and control sockets: passed by systemd, or bound here under their locks."""
    taken: list[paths.ServedSocket] = []
    try:
        activated = _activated_sockets(socket_path, control_path, taken)
        agent = activated.get(_systemd.AGENT_FD_NAME)
        if agent is None:
            try:
                agent = paths.ServedSocket.claim(socket_path)
            except paths.AlreadyRunningError as exc:
                raise _AgentSocketTakenError(str(exc)) from None
            taken.append(agent)
        control = activated.get(_systemd.CONTROL_FD_NAME)
        if control is None:
            control = paths.ServedSocket.claim(control_path)
            taken.append(control)
    except BaseException:
        for served in taken:
            served.release()
        raise
    return agent, control


def _activated_sockets(
    socket_path: Path, control_path: Path, taken: list[paths.ServedSocket]
) -> dict[str, paths.ServedSocket]:
    """What systemd passed us (also added to ``taken``), by role: named ``agent`` and
    ``control``, or else found at our paths."""
    by_path = {socket_path: _systemd.AGENT_FD_NAME, control_path: _systemd.CONTROL_FD_NAME}
    found: dict[str, paths.ServedSocket] = {}
    for name, fd in _systemd.listen_fds(os.environ, os.getpid()):
        path, sock = _systemd.listening_unix_socket(name, fd)
        taken.append(served := paths.ServedSocket.activated(path, sock))
        role = name if name in by_path.values() else by_path.get(path)
        if role is None or role in found:
            raise _systemd.ActivationError(
                f"systemd passed a socket this daemon has no use for: {name} at {path} "
                f"(name one {_systemd.AGENT_FD_NAME} and one {_systemd.CONTROL_FD_NAME})"
            )
        found[role] = served
    return found


def _serve(
    args: argparse.Namespace, sockets: Sockets, report: StartReport, held_signals: HeldSignals
) -> int:
    """Set up logging and the pid file, then run the daemon on ``sockets`` until it stops."""
    # The logging library, loaded only now that we serve.
    from switcher.cli._logging import configure_logging  # noqa: PLC0415

    config = _config(args, sockets)
    pid_file = args.pid_file or (paths.default_pid_file() if args.daemon else None)
    try:
        # Our default places get their directories (0700); a path the user gave must exist.
        for given, path in ((args.log_file, config.log_file), (args.pid_file, pid_file)):
            if given is None and path is not None:
                paths.make_private_dirs(path.parent)
    except paths.UnsafePathError as exc:
        return _refuse(report, sockets, str(exc))
    try:
        log_sink = configure_logging(config.log_level, config.log_file)
    except OSError as exc:
        return _refuse(report, sockets, f"cannot open log file {config.log_file}: {exc.strerror}")
    try:
        if pid_file is not None:
            try:
                paths.write_pid_file(pid_file, os.getpid())
            except paths.UnsafePathError as exc:
                return _refuse(report, sockets, str(exc))
        try:
            return _run_trio(config, sockets, report, log_sink.reopen, held_signals)
        finally:
            if pid_file is not None:
                paths.remove_pid_file(pid_file, os.getpid())
    finally:
        log_sink.close()


def _config(args: argparse.Namespace, sockets: Sockets) -> Config:
    from switcher.config import Config, default_agents_dirs  # noqa: PLC0415

    agent, control = sockets
    log_file = args.log_file or (paths.default_log_file() if args.daemon else None)
    return Config(
        # An activated socket is where systemd put it, whatever the flags say.
        socket_path=agent.path,
        control_path=control.path,
        agents_dirs=args.agents_dirs or default_agents_dirs(),
        probe_interval=args.probe_interval,
        probe_timeout=args.probe_timeout,
        log_level=args.log_level,
        log_file=log_file,
        notify_socket=os.environ.pop("NOTIFY_SOCKET", None) or None,
    )


def _refuse(report: StartReport, sockets: Sockets, message: str) -> int:
    for served in sockets:
        served.release()
    report.failed(EXIT_REFUSED, message)
    return EXIT_REFUSED


def _run_trio(
    config: Config,
    sockets: Sockets,
    report: StartReport,
    reopen_logs: Callable[[], None],
    held_signals: HeldSignals,
) -> int:
    # The event loop and the daemon, loaded only now that we serve.
    import structlog  # noqa: PLC0415
    import trio  # noqa: PLC0415

    from switcher.daemon import run_daemon  # noqa: PLC0415
    from switcher.hardening import disable_ptrace, raise_open_files_limit  # noqa: PLC0415

    disable_ptrace()
    raise_open_files_limit()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    run_daemon,
                    config,
                    sockets=sockets,
                    reopen_logs=reopen_logs,
                    held_signals=held_signals,
                )
            )
            report.ready()

    # SIGINT is held (see HeldSignals), so trio installs no KeyboardInterrupt
    # handler of its own: every Ctrl-C is a graceful stop, however early.
    try:
        trio.run(serve)
    except Exception:
        # Detached, nobody sees a traceback: the log is where it must be.
        structlog.get_logger().exception("switcher.daemon.crashed")
        raise
    return EXIT_OK
