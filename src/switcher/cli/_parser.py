"""The argument parser every command shares: its help formatter and its error messages.

Light on purpose (see CONTRIBUTING.md, "The start-up budget"): every
command builds this parser, ``switcher ctl`` in a status line included.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from switcher.cli._configdefault import ConfigDefault

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, NoReturn


def _columns() -> int:
    """The terminal's width for help text, as shutil.get_terminal_size would say."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):
        return 80


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, given its width so it need not import shutil.

    argparse builds a formatter for every add_argument, and without a width
    it imports shutil (and with it bz2 and lzma): a few milliseconds of every
    `switcher` command's start-up, for a number only --help uses.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)

    # {config.NAME} in help text stands for Config's default for NAME, read
    # only when help is printed (see switcher.cli._configdefault).

    def _format_text(self, text: str) -> str:
        return super()._format_text(_config_defaults(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return _config_defaults(super()._expand_help(action))


def _config_defaults(text: str) -> str:
    return re.sub(r"\{config\.(\w+)\}", lambda m: str(ConfigDefault(m[1])), text)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser (and, through add_subparsers, its subparsers) using HelpFormatter,
    whose errors name an unknown flag and show the usage of the command it was given to.

    argparse leaves a subcommand's unknown flags to the top-level parser (top-level
    usage), and reports a missing command before an unknown flag that came first.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)
        self._given: list[str] = []
        self._commands: argparse.Action | None = None

    def add_subparsers(self, **kwargs: Any) -> Any:
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_command_line(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """Parse ``argv``; an unknown flag is reported by the command it was given to."""
        args, unknown = self.parse_known_args(argv)
        if unknown:
            self._chosen(args).error(f"unrecognized arguments: {' '.join(unknown)}")
        return args

    def _chosen(self, args: argparse.Namespace) -> Parser:
        """The parser of the (sub)command ``args`` were parsed for, the deepest one."""
        if self._commands is not None:
            chosen = getattr(args, self._commands.dest, None)
            parsers: dict[str, Parser] = getattr(self._commands, "choices", {})
            if chosen in parsers:
                return parsers[chosen]._chosen(args)  # noqa: SLF001 (a Parser, like self)
        return self

    def error(self, message: str) -> NoReturn:
        unknown = [
            word
            for word in self._given
            if word.startswith("-") and word.split("=", 1)[0] not in self._option_string_actions
        ]
        if unknown and message.startswith("the following arguments are required"):
            message = f"unrecognized arguments: {' '.join(unknown)}"
        super().error(message)


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds, more than 0 and less than a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds: {text!r}")
    return value
