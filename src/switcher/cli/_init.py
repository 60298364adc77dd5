"""``switcher init SHELL``: the code a login script evaluates to start switcher and use it.

Standard library only, like ``switcher path``: it runs at every login. The
code it prints names this very switcher by absolute path (a login script's
PATH may not reach a venv or ``~/.local/bin``), starts it with ``--daemon``
(which answers at once when it is already running), and exports
``SSH_AUTH_SOCK`` only if the socket is there and is ours: never a path
someone else could have put a socket at.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from switcher import paths
from switcher.cli._exit import EXIT_OK, EXIT_REFUSED, fail

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

_POSIX = """\
# switcher ({shell}): start the agent relay unless it is running, then use its socket.
if {start} && [ -S {sock} ] && [ -O {sock} ]; then
    export SSH_AUTH_SOCK={sock}
else
    echo {warning} >&2
fi
"""

_FISH = """\
# switcher (fish): start the agent relay unless it is running, then use its socket.
if {start}; and test -S {sock}; and test -O {sock}
    set -gx SSH_AUTH_SOCK {sock}
else
    echo {warning} >&2
end
"""


def run(args: argparse.Namespace) -> int:
    if os.geteuid() == 0 and not getattr(args, "allow_root", False):
        # The daemon would refuse with a hint about its own flags; the person
        # at this login script needs the init command that works instead.
        fail(
            "refusing to start a daemon as root: switcher relays the agents of the user "
            f"it runs as; for root's own agents: {login_line(args.shell, '--allow-root')}"
        )
        return EXIT_REFUSED
    socket_path = getattr(args, "socket_path", None) or paths.default_socket_path()
    print(
        snippet(
            args.shell,
            [*switcher_command(), "daemon", "--daemon", *_forwarded(args)],
            socket_path.absolute(),
        ),
        end="",
    )
    return EXIT_OK


def login_line(shell: str, *flags: str) -> str:
    """The line for ``shell``'s login script that evaluates ``switcher init FLAGS SHELL``."""
    init = " ".join(["switcher", "init", *flags, shell])
    return f"{init} | source" if shell == "fish" else f'eval "$({init})"'


def snippet(shell: str, start: list[str], socket_path: Path) -> str:
    """The code for ``shell``: run ``start``, then export ``socket_path`` if it is ours."""
    quote = _fish_quote if shell == "fish" else shlex.quote
    warning = f"switcher: no socket of yours at {socket_path}; SSH_AUTH_SOCK left as it was"
    return (_FISH if shell == "fish" else _POSIX).format(
        shell=shell,
        start=" ".join(quote(word) for word in start),
        sock=quote(str(socket_path)),
        warning=quote(warning),
    )


def switcher_command() -> list[str]:
    """How a login script runs this very switcher: by absolute path."""
    script = sys.argv[0]
    if Path(script).name != "__main__.py":
        if os.sep not in script:
            import shutil

            script = shutil.which(script) or ""
        if script and Path(script).is_file():
            return [str(Path(script).absolute())]
    # `python -m switcher`: the interpreter is what has switcher installed. Not
    # resolved: a venv's interpreter is a symlink that must stay one.
    return [str(Path(sys.executable).absolute()), "-m", "switcher"]


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The daemon flags given to ``init``, to pass on as they were meant (paths made absolute)."""
    words: list[str] = []
    for dest, flag in args.forward:
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is True:
            words.append(flag)
        elif isinstance(value, tuple):
            words += [flag, ":".join(value)]
        elif isinstance(value, list):  # a repeatable flag: once per value
            for item in value:
                words += [flag, str(item)]
        elif isinstance(value, Path):
            words += [flag, str(value.absolute())]
        else:
            words += [flag, str(value)]
    return words


def _fish_quote(word: str) -> str:
    # In fish's single quotes only \\ and \' are special.
    return "'" + word.replace("\\", "\\\\").replace("'", "\\'") + "'"
