"""The README says what the code does: its daemon flags, their defaults, and the test command."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from procs import run_cli
from switcher.cli._main import _build_parser
from switcher.config import default_of

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_flag_rows() -> dict[str, str]:
    """The `switcher daemon` flag table: each flag as written (with its metavariable) and its
    default column."""
    rows = re.findall(r"^\| `(--[^`]+)` \| ([^|]+) \|", README, flags=re.MULTILINE)
    return {flag: default.strip() for flag, default in rows}


def help_flags() -> set[str]:
    """`switcher daemon`'s flags as --help shows them: each with its metavariable."""
    commands = next(
        a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    daemon = commands.choices["daemon"]
    shown = set()
    for action in daemon._actions:
        if "-h" in action.option_strings:
            continue
        flag = action.option_strings[0]
        shown.add(f"{flag} {action.metavar}" if action.nargs != 0 else flag)
    return shown


class TestReadme:
    def test_the_flag_table_names_every_flag_as_help_does(self) -> None:
        """The README's flag table and --help list the same flags with the same metavariables."""
        assert set(readme_flag_rows()) == help_flags()

    def test_the_flag_table_shows_configs_defaults(self) -> None:
        """The defaults the README gives are Config's (where Config holds one)."""
        rows = readme_flag_rows()
        shown = {
            field: rows[f"--{field.replace('_', '-')} {metavar}"].strip("`")
            for field, metavar in [
                ("probe_interval", "SECONDS"),
                ("probe_timeout", "SECONDS"),
                ("log_level", "LEVEL"),
                ("log_format", "FORMAT"),
            ]
        }
        assert shown == {
            field: f"{value:g}" if isinstance(value, float) else str(value)
            for field in shown
            for value in [default_of(field)]
        }

    def test_ci_runs_the_readme_test_command(self) -> None:
        """.ci/run ends with the README's test command, verbatim."""
        blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL)
        command = next(b.strip() for b in blocks if "nox" in b)
        ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
        assert ci[-1] == command


class TestHelp:
    def test_daemon_help_shows_configs_defaults(self) -> None:
        """`switcher daemon --help` reads its defaults from Config: flags and signals alike."""
        result = run_cli("daemon", "--help")
        text = " ".join(result.stdout.split())
        shown = [
            f"how often every agent is probed (default: {default_of('probe_interval'):g})",
            f"marks its agent slow (default: {default_of('probe_timeout'):g})",
            f"or error (default: {default_of('log_level')})",
            f"--log-file (default: {default_of('log_format')})",
            f"(default: {':'.join(str(d) for d in default_of('agents_dirs'))})",  # type: ignore[attr-defined]
            f"give open connections {default_of('grace'):g} s, exit 0",
        ]
        assert (result.returncode, [s for s in shown if s not in text]) == (0, [])
