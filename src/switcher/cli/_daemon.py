"""``switcher daemon``: claim the sockets, detach if asked, set up logging, run trio.

Until the sockets are ours this runs on the standard library alone: a login
script's ``switcher daemon --daemon`` that finds a switcher already running
answers at once, before anything loads trio, structlog or the daemon.
Only a process that is going to serve imports them.
"""

from __future__ import annotations

import functools
import os
import sys

from switcher import _systemd, paths, pidfile
from switcher._signals import HeldSignals
from switcher.cli._configdefault import given
from switcher.cli._detach import StartReport, daemonize
from switcher.cli._exit import EXIT_ALREADY_RUNNING, EXIT_OK, EXIT_REFUSED, fail
from switcher.instancelock import AlreadyRunningError
from switcher.pathsafety import UnsafePathError, make_private_dirs
from switcher.served import AgentSocketTakenError, Sockets, claim_sockets

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any

    from switcher.config import Config


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
    control_path = (args.control_path or paths.control_path_for(socket_path)).absolute()
    try:
        return claim_sockets(socket_path, control_path)
    except AgentSocketTakenError as exc:
        if args.daemon:
            return EXIT_OK  # the login script's question was "is it up?", and it is
        status, message = EXIT_ALREADY_RUNNING, str(exc)
    except AlreadyRunningError as exc:
        status, message = EXIT_ALREADY_RUNNING, str(exc)
    except (UnsafePathError, _systemd.ActivationError) as exc:
        status, message = EXIT_REFUSED, str(exc)
    fail(message)
    return status


def _serve(
    args: argparse.Namespace, sockets: Sockets, report: StartReport, held_signals: HeldSignals
) -> int:
    """Set up logging and the pid file, then run the daemon on ``sockets`` until it stops."""
    # What trio and structlog import but the daemon never uses is loaded on
    # first use only (about 3 MB of idle RSS); then the logging library.
    from switcher.cli._unused import defer

    defer()
    from switcher.cli._logging import configure_logging

    config = _config(args, sockets)
    pid_file = args.pid_file or (paths.default_pid_file() if args.daemon else None)
    try:
        # Our default places get their directories (0700); a path the user gave must exist.
        for given, path in ((args.log_file, config.log_file), (args.pid_file, pid_file)):
            if given is None and path is not None:
                make_private_dirs(path.parent)
    except UnsafePathError as exc:
        return _refuse(report, sockets, str(exc))
    try:
        log_sink = configure_logging(config.log_level, config.log_file, config.log_format)
    except OSError as exc:
        return _refuse(report, sockets, f"cannot open log file {config.log_file}: {exc.strerror}")
    try:
        if pid_file is not None:
            try:
                pidfile.write_pid_file(pid_file, os.getpid())
            except UnsafePathError as exc:
                return _refuse(report, sockets, str(exc))
        try:
            return _run_trio(config, sockets, report, log_sink.reopen, held_signals)
        finally:
            if pid_file is not None:
                pidfile.remove_pid_file(pid_file, os.getpid())
    finally:
        log_sink.close()


def _config(args: argparse.Namespace, sockets: Sockets) -> Config:
    from switcher.config import Config

    agent, control = sockets
    log_file = args.log_file or (paths.default_log_file() if args.daemon else None)
    return Config(
        # An activated socket is where systemd put it, whatever the flags say.
        socket_path=agent.path,
        control_path=control.path,
        log_file=log_file,
        notify_socket=os.environ.pop("NOTIFY_SOCKET", None) or None,
        # The flags given; Config has the defaults of the others.
        **given(args, "agents_dirs", "probe_interval", "probe_timeout", "log_level", "log_format"),  # type: ignore[arg-type]
        **_local_agents(args),
        **_affinity(args),
    )


def _affinity(args: argparse.Namespace) -> dict[str, Any]:
    """--affinity on|off, if given (Config's field is a bool)."""
    return {"affinity": args.affinity == "on"} if args.affinity in ("on", "off") else {}


def _local_agents(args: argparse.Namespace) -> dict[str, Any]:
    """--local-agent, if given (repeatable, so None when left out, not a ConfigDefault)."""
    return {"local_agents": tuple(args.local_agent)} if args.local_agent else {}


def _refuse(report: StartReport, sockets: Sockets, message: str) -> int:
    for served in sockets:
        served.release()
    report.failed(EXIT_REFUSED, message)
    return EXIT_REFUSED


def _started_line(config: Config, agents: int) -> str:
    """What a person starting the daemon in a terminal reads once it serves."""
    found = "1 agent" if agents == 1 else f"{agents} agents"
    return (
        f"switcher: serving {config.socket_path} (control: {config.control_path}); "
        f"{found} found in {', '.join(config.agents_dirs)}; "
        f'use it with: export SSH_AUTH_SOCK="{config.socket_path}"'
    )


def _run_trio(
    config: Config,
    sockets: Sockets,
    report: StartReport,
    reopen_logs: Callable[[], None],
    held_signals: HeldSignals,
) -> int:
    # The event loop and the daemon, loaded only now that we serve.
    import structlog
    import trio

    from switcher.cli._logging import for_people
    from switcher.daemon import run_daemon
    from switcher.hardening import disable_ptrace, raise_open_files_limit

    disable_ptrace()
    raise_open_files_limit()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(
                functools.partial(
                    run_daemon,
                    config,
                    sockets=sockets,
                    reopen_logs=reopen_logs,
                    held_signals=held_signals,
                )
            )
            report.ready()
            if for_people(config.log_format, config.log_file):
                print(
                    _started_line(config, len(daemon.registry.snapshot().backends)), file=sys.stderr
                )

    # SIGINT is held (see HeldSignals), so trio installs no KeyboardInterrupt
    # handler of its own: every Ctrl-C is a graceful stop, however early.
    try:
        trio.run(serve)
    except Exception:
        # Detached, nobody sees a traceback: the log is where it must be.
        structlog.get_logger().exception("switcher.daemon.crashed")
        raise
    return EXIT_OK
