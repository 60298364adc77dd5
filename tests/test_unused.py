"""What the daemon's libraries import but it never uses is loaded on first use only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import trio

from fakes import AgentClient, FakeAgent
from procs import logged, needs_root_to_look_inside, start_daemon, terminate, wait_logged
from switcher.cli._unused import DAEMON_UNUSED, defer
from switcher.core import MessageType

if TYPE_CHECKING:
    from world import World

# Not imported by the interpreter or pytest: a module to stand in for.
SOME_MODULE = "colorsys"

# The shared libraries and extension modules the deferred modules bring along.
NOT_MAPPED = ("libssl", "/_ssl.", "/_asyncio.")


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter; what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


def test_a_stand_in_loads_the_real_module_on_first_use() -> None:
    """Importing costs nothing; the first attribute read imports the module, and the
    stand-in that earlier importers hold then behaves as the module."""
    printed = run_python(
        f"""
        import sys
        from switcher.cli._unused import defer
        defer(({SOME_MODULE!r},))
        import {SOME_MODULE} as early
        loaded_at_import = "__file__" in vars(early)
        first = early.rgb_to_hsv(1.0, 0.0, 0.0)
        import {SOME_MODULE} as late
        real = late is sys.modules[{SOME_MODULE!r}] and late is not early
        print(loaded_at_import, first, early.hsv_to_rgb(0.0, 1.0, 1.0), real)
        """
    )
    assert printed == "False (0.0, 1.0, 1.0) (1.0, 0.0, 0.0) True"


def test_a_module_already_imported_is_left_alone() -> None:
    """Under a test runner or coverage a module may be loaded already: it stays itself."""
    before = sys.modules["os"]
    defer(("os",))
    assert sys.modules["os"] is before is os


def test_a_missing_attribute_is_still_an_attribute_error() -> None:
    printed = run_python(
        f"""
        from switcher.cli._unused import defer
        defer(({SOME_MODULE!r},))
        import {SOME_MODULE}
        try:
            {SOME_MODULE}.no_such_thing
        except AttributeError:
            print("AttributeError")
        """
    )
    assert printed == "AttributeError"


@needs_root_to_look_inside
async def test_the_serving_daemon_never_loads_them(world: World) -> None:
    """With two agents and affinity on, served connections map neither ssl nor asyncio."""
    assert DAEMON_UNUSED == ("asyncio", "ssl", "idna")
    with trio.fail_after(30):
        for name in ("a", "b"):
            await world.start_agent(FakeAgent(name, keys=[name.encode()]))
        directory = world.root / "d"
        directory.mkdir()
        daemon = await start_daemon(directory, agents=[world.agents_dir])
        try:
            await wait_logged(daemon.log_path, logged("switcher.registry.health_changed", 2))
            for _ in range(3):
                client = AgentClient(await trio.open_unix_socket(str(daemon.socket_path)))
                async with client.stream:
                    await client.request(MessageType.REQUEST_IDENTITIES)
            await wait_logged(daemon.log_path, logged("switcher.proxy.connection_closed", 3))
            maps = (await trio.Path(f"/proc/{daemon.process.pid}/maps").read_text()).splitlines()
        finally:
            await terminate(daemon)
    assert [line for line in maps if any(name in line for name in NOT_MAPPED)] == []
