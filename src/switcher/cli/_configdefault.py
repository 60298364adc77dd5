"""Daemon flags that were not given: Config's defaults, read only when needed.

Each default is written once, in ``switcher.config.Config``. A flag left
out holds a ``ConfigDefault`` for its field: the daemon then builds Config
without it (``given``), and help text shows the real default by reading
Config only when help is printed. Loading attrs to build the parser would
cost every command, ``switcher ctl`` and ``init`` included, a large part of
its start-up budget.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


class ConfigDefault:
    """Stands in for a flag left out; shows (``str``) as Config's default for ``field``."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __str__(self) -> str:
        from switcher.config import default_of

        value = default_of(self.field)
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, tuple):
            return ":".join(str(item) for item in value)
        return str(value)

    def __repr__(self) -> str:
        return f"ConfigDefault({self.field!r})"


def given(args: argparse.Namespace, *fields: str) -> dict[str, object]:
    """The values of ``fields`` in ``args`` that the user gave (the rest keep Config's)."""
    return {
        field: value
        for field in fields
        if not isinstance(value := getattr(args, field), ConfigDefault)
    }
