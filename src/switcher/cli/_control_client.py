"""The control socket's client side: find the daemon, send requests, read JSON lines back.

Standard library only: `switcher ctl` may run every few seconds from a tmux
status line or a shell prompt, so it must not pay for importing trio,
structlog or attrs. The wire format is docs/control-protocol.md: one JSON
object per line each way.
"""

from __future__ import annotations

import errno
import json
import os
import socket

from switcher import CONTROL_PROTOCOL_VERSION, _defaults
from switcher.cli._exit import EXIT_NO_DAEMON, EXIT_REFUSED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any, Self

    # A JSON object as the daemon sent it (docs/control-protocol.md).
    Reply = dict[str, Any]

# A reply describes every agent, so it may be far longer than the daemon's
# 64 KiB limit on requests; this bound only keeps a confused peer from
# filling our memory.
MAX_REPLY_BYTES = 16 * 1024 * 1024
# A local daemon accepts at once or not at all; only a wedged one makes us wait.
CONNECT_TIMEOUT_S = 5.0
# `refresh` probes every agent and waits for the answers, and probes give up
# after a few seconds; a minute without a reply means the daemon is wedged.
# Never applied to watch events, which may be hours apart.
REPLY_TIMEOUT_S = 60.0
# How much of an unreadable reply to quote in the error message.
EXCERPT_CHARS = 60


class ClientError(Exception):
    """A failure reported as one ``switcher: ...`` line on stderr, with its exit status."""

    def __init__(self, message: str, status: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.status = status


class Daemon:
    """Which daemon to talk to: its control socket, and how to start it if none is there."""

    def __init__(self, control_path: str | None, socket_path: str | None) -> None:
        """``--control-path`` wins; else the control socket of ``--socket-path``'s daemon."""
        self.socket_path = socket_path
        self.derived = control_path is None
        if control_path is not None:
            self.control_path = control_path
        elif socket_path is not None:
            self.control_path = _defaults.control_path_for(socket_path)
        else:
            self.control_path = _defaults.control_path()

    def start_command(self) -> str:
        """The command that starts a daemon here, as the user running us would type it."""
        import shlex  # only an error message needs it

        words = ["switcher", "daemon"]
        if os.geteuid() == 0:
            words.append("--allow-root")  # the daemon refuses root without it
        if self.socket_path is not None:
            words += ["--socket-path", self.socket_path]
        if not self.derived:
            own = _defaults.control_path_for(self.socket_path or _defaults.agent_path())
            if os.path.abspath(self.control_path) != own:
                words += ["--control-path", self.control_path]
        return shlex.join(words)


class Connection:
    """One control connection: requests out, JSON lines back."""

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self._sock = sock
        self._reader = sock.makefile("rb")

    @classmethod
    def open(cls, daemon: Daemon) -> Self:
        path = daemon.control_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise connect_error(daemon, exc) from None
        sock.settimeout(REPLY_TIMEOUT_S)
        return cls(path, sock)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._reader.close()
        self._sock.close()

    def request(self, cmd: str, **arguments: object) -> tuple[str, Reply]:
        """Send one request and return its reply, as text and as an object."""
        line = json.dumps({"v": CONTROL_PROTOCOL_VERSION, "cmd": cmd, **arguments}) + "\n"
        try:
            self._sock.sendall(line.encode())
        except (BrokenPipeError, ConnectionResetError):
            # It may have said why before closing (`busy`): read that below.
            pass
        except OSError as exc:
            raise ClientError(f"cannot talk to the daemon at {self.path}: {exc.strerror}") from None
        reply = self.receive()
        if reply is None:
            raise ClientError(f"the daemon at {self.path} closed the connection without replying")
        return reply

    def stop_timing_out(self) -> None:
        """From now on wait for lines however long they take (watch events)."""
        self._sock.settimeout(None)

    def receive(self) -> tuple[str, Reply] | None:
        """The next line, as text and as an object; None if the daemon closed cleanly."""
        try:
            data = self._reader.readline(MAX_REPLY_BYTES + 1)
        except TimeoutError:
            raise ClientError(
                f"the daemon at {self.path} did not reply within {REPLY_TIMEOUT_S:g} s"
            ) from None
        except ConnectionResetError:
            data = b""
        except OSError as exc:
            raise ClientError(f"lost the daemon at {self.path}: {exc.strerror}") from None
        if not data:
            return None
        if not data.endswith(b"\n"):
            if len(data) > MAX_REPLY_BYTES:
                raise ClientError(
                    f"the daemon at {self.path} sent a line longer than {MAX_REPLY_BYTES} bytes"
                )
            raise ClientError(f"the daemon at {self.path} closed the connection in mid-reply")
        try:
            text = data.decode()
            value = json.loads(text)
        except ValueError:
            excerpt = data.decode(errors="replace").strip()[:EXCERPT_CHARS]
            raise ClientError(
                f"the daemon at {self.path} sent a reply that is not JSON: {excerpt!r}"
            ) from None
        if not isinstance(value, dict):
            raise ClientError(f"the daemon at {self.path} sent a reply that is not a JSON object")
        return text.rstrip("\n"), value


def connect_error(daemon: Daemon, exc: OSError) -> ClientError:
    """What a failed connect means for the user: no daemon (exit 3), or a daemon in trouble."""
    path = daemon.control_path
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        # ENOENT: never started; ECONNREFUSED: a socket file left by one that died.
        return ClientError(
            f"no daemon at {path} (start one with: {daemon.start_command()})", EXIT_NO_DAEMON
        )
    if isinstance(exc, TimeoutError) or exc.errno == errno.EAGAIN:
        # Linux refuses a Unix-socket connect with EAGAIN when the backlog is full.
        return ClientError(f"the daemon at {path} is not accepting connections")
    return ClientError(f"cannot connect to {path}: {exc.strerror or exc}")


def check(reply: Reply) -> None:
    """Raise the daemon's own message if it refused the request."""
    ok = reply.get("ok")
    if ok is True:
        return
    if ok is False:
        error = reply.get("error")
        if isinstance(error, dict):
            for field in ("message", "code"):
                if isinstance(error.get(field), str) and error[field]:
                    raise ClientError(error[field])
        raise ClientError("the daemon refused the request without saying why")
    raise ClientError("the daemon sent a reply without an ok field")
