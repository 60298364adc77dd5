"""Drive a real tmux server owned by the test user.

Commands typed into a pane report back through files, not through the screen: a result
file appears only when the command has finished, which the test can wait for, whereas
scraping `capture-pane` output depends on prompts, wrapping and redraw timing.
"""

from __future__ import annotations

import secrets
import shlex
from typing import TYPE_CHECKING

import attrs
from _system import UserAccount, describe, run_as, wait_until

if TYPE_CHECKING:
    from pathlib import Path


@attrs.frozen
class PaneResult:
    """How a command typed into a pane exited, and what it printed (stdout and stderr)."""

    returncode: int
    output: str


@attrs.frozen
class Tmux:
    """A tmux server on a private socket, addressed as the test user."""

    account: UserAccount
    socket: Path

    def argv(self, *args: str) -> list[str]:
        """The command line for a tmux client of this server."""
        return ["tmux", "-S", str(self.socket), *args]

    async def command(self, *args: str) -> str:
        """Run a tmux client command as the test user; fail loudly if tmux refuses."""
        result = await run_as(self.account, self.argv(*args))
        if result.returncode != 0:
            raise RuntimeError(describe(result))
        return result.stdout.decode(errors="replace")

    async def capture(self, target: str) -> str:
        """The visible text of a pane, for failure reports."""
        return await self.command("capture-pane", "-p", "-t", target)

    async def kill_server(self) -> None:
        """Stop the server and every pane in it; a server that is already gone is fine."""
        await run_as(self.account, self.argv("kill-server"))


@attrs.frozen
class Pane:
    """A shell in a tmux pane that the test types commands into."""

    tmux: Tmux
    target: str
    results: Path

    async def type_line(self, text: str) -> None:
        """Type one line into the pane, as a user at the keyboard would."""
        # -l sends the text literally, so words like "Enter" or "C-c" in it stay text.
        await self.tmux.command("send-keys", "-t", self.target, "-l", "--", text)
        await self.tmux.command("send-keys", "-t", self.target, "Enter")

    async def run(self, command: str) -> PaneResult:
        """Type `command` into the pane's shell and wait for it to finish.

        The braces keep the command in the pane's own shell, so `export` sticks. The
        exit status is written under a temporary name and renamed, so the test never
        reads a half-written file.
        """
        name = secrets.token_hex(6)
        output = self.results / f"{name}.out"
        status = self.results / f"{name}.rc"
        partial = self.results / f"{name}.rc.part"
        line = (
            f"{{ {command}; }} >{shlex.quote(str(output))} 2>&1 </dev/null; "
            f"echo $? >{shlex.quote(str(partial))}; "
            f"mv {shlex.quote(str(partial))} {shlex.quote(str(status))}"
        )
        await self.type_line(line)
        await wait_until(status.exists)
        return PaneResult(
            returncode=int(status.read_text().strip()),
            output=output.read_text(errors="replace").strip("\n"),
        )
