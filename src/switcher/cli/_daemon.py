"""``switcher daemon``: build the configuration, set up logging, run trio."""

from __future__ import annotations

import argparse
import os

import trio

from switcher import paths
from switcher.cli._logging import configure_logging
from switcher.cli._main import EXIT_ALREADY_RUNNING, EXIT_OK, EXIT_REFUSED, fail
from switcher.config import Config, default_agents_dirs
from switcher.daemon import run_daemon
from switcher.hardening import disable_ptrace


def run(args: argparse.Namespace) -> int:
    if os.geteuid() == 0 and not args.allow_root:
        fail(
            "refusing to run as root: switcher relays the agents of the user it runs as, "
            "so run it as that user (or pass --allow-root if you mean root's own agents)"
        )
        return EXIT_REFUSED
    # Everything we create (sockets, log file, lock) is private by default,
    # as jmmv/ssh-agent-switcher does.
    os.umask(0o177)
    config = Config(
        socket_path=(args.socket_path or paths.default_socket_path()).absolute(),
        control_path=(args.control_path or paths.default_control_path()).absolute(),
        agents_dirs=args.agents_dirs or default_agents_dirs(),
        probe_interval=args.probe_interval,
        probe_timeout=args.probe_timeout,
        log_level=args.log_level,
        log_file=args.log_file,
    )
    try:
        log_sink = configure_logging(config.log_level, config.log_file)
    except OSError as exc:
        fail(f"cannot open log file {config.log_file}: {exc.strerror}")
        return EXIT_REFUSED
    disable_ptrace()
    try:
        trio.run(run_daemon, config)
    except paths.AlreadyRunningError as exc:
        fail(str(exc))
        return EXIT_ALREADY_RUNNING
    except paths.UnsafePathError as exc:
        fail(str(exc))
        return EXIT_REFUSED
    except KeyboardInterrupt:
        # A second Ctrl-C while shutting down: already handled, just leave.
        pass
    finally:
        log_sink.close()
    return EXIT_OK
