"""`switcher ctl`, the real command, against a real daemon with fake agents.

The daemon runs in this process (tests/world.py); `switcher ctl` runs as a
subprocess, as users run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import trio
import trio.testing

from fakes import FakeAgent
from switcher.core import Health
from world import World, answer, identities

# `ctl` flushes every line itself; an inherited PYTHONUNBUFFERED would hide it if it did not.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


async def ctl(world: World, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert world.daemon is not None
    return await trio.run_process(
        [
            sys.executable,
            "-m",
            "switcher",
            "ctl",
            "--control-path",
            str(world.daemon.control_path),
            *args,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=ENV,
    )


async def ctl_json(world: World, *args: str) -> dict[str, Any]:
    result = await ctl(world, *args, "--json")
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def both_healthy(world: World) -> Any:
    return world.wait_until(
        lambda s: len(s.backends) == 2 and all(b.health is Health.HEALTHY for b in s.backends)
    )


class TestCtlAgainstTheDaemon:
    async def test_list_marks_the_choice(self, world: World) -> None:
        """`switcher ctl list` shows both sessions and stars the newest healthy one."""
        with trio.fail_after(30):
            old, _ = await world.start_agent(FakeAgent("old"))
            new, _ = await world.start_agent(FakeAgent("new"))
            await world.start_daemon()
            await both_healthy(world)
            result = await ctl(world, "list")
        lines = result.stdout.decode().splitlines()
        starred = [line for line in lines if line.startswith("*")]
        assert result.returncode == 0
        assert len(starred) == 1
        assert str(new) in starred[0]
        assert "healthy, newest" in starred[0]
        assert any(str(old) in line and "healthy, older session" in line for line in lines)

    async def test_prefer_switches_keys_and_the_pin_ends_with_the_session(
        self, world: World
    ) -> None:
        """After `ctl prefer OLD` the next request gets the old keys; when it ends, the new ones."""
        old_agent, new_agent = FakeAgent("old", keys=[b"old"]), FakeAgent("new", keys=[b"new"])
        with trio.fail_after(30):
            old, old_session = await world.start_agent(old_agent)
            await world.start_agent(new_agent)
            await world.start_daemon()
            await both_healthy(world)
            listed = await ctl_json(world, "list")
            old_id = next(b["id"] for b in listed["backends"] if b["path"] == str(old))
            result = await ctl(world, "prefer", old_id[:4])
            assert result.returncode == 0, result.stderr
            assert await identities(world) == answer(old_agent)
            old_session.cancel()
            await world.wait_until(lambda s: s.pinned is None)
            assert await identities(world) == answer(new_agent)
            cleared = await ctl(world, "prefer", "--clear")
        assert old_id in result.stdout.decode()
        assert cleared.returncode == 0

    async def test_prefer_an_unknown_id_fails_with_the_reason(self, world: World) -> None:
        """`ctl prefer` with an id no agent has exits 1 and says so on stderr."""
        with trio.fail_after(30):
            await world.start_daemon()
            result = await ctl(world, "prefer", "/tmp/not-an-agent")
        assert result.returncode == 1
        assert b"no agent '/tmp/not-an-agent'" in result.stderr

    async def test_refresh_reports_a_session_that_closed(self, world: World) -> None:
        """`ctl refresh` reports a session that just closed (before the watcher could)."""
        with trio.fail_after(30):
            gone, session = await world.start_agent(FakeAgent("gone"))
            await world.start_daemon(watch=False)
            await world.wait_until(lambda s: len(s.backends) == 1)
            session.cancel()
            await trio.testing.wait_all_tasks_blocked()
            reply = await ctl_json(world, "refresh")
        assert [b["path"] for b in reply["removed"]] == [str(gone)]

    async def test_status(self, world: World) -> None:
        """`ctl status --json` reports this daemon's pid and socket paths."""
        with trio.fail_after(30):
            await world.start_daemon()
            reply = await ctl_json(world, "status")
        assert world.daemon is not None
        assert (reply["pid"], reply["socket_path"], reply["control_path"]) == (
            os.getpid(),
            str(world.daemon.socket_path),
            str(world.daemon.control_path),
        )

    async def test_watch_sees_the_choice_move(self, world: World) -> None:
        """`ctl watch --json` prints a choice_changed line when a newer session appears."""
        with trio.fail_after(30):
            await world.start_agent(FakeAgent("old"))
            await world.start_daemon()
            await world.wait_until(
                lambda s: s.choice is not None and s.choice.health is Health.HEALTHY
            )
            assert world.daemon is not None
            control_path = str(world.daemon.control_path)
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    lambda task_status: trio.run_process(  # noqa: ASYNC105 (nursery.start awaits it)
                        [
                            sys.executable,
                            "-m",
                            "switcher",
                            "ctl",
                            "--control-path",
                            control_path,
                            "watch",
                            "--json",
                        ],
                        stdout=subprocess.PIPE,
                        env=ENV,
                        check=False,
                        task_status=task_status,
                    )
                )
                assert process.stdout is not None
                buffer = b""
                lines: list[dict[str, Any]] = []
                new_path = None
                while not any(e.get("event") == "choice_changed" for e in lines):
                    chunk = await process.stdout.receive_some(65536)
                    assert chunk, "watch ended early"
                    buffer += chunk
                    *complete, buffer = buffer.split(b"\n")
                    lines += [json.loads(line) for line in complete]
                    if lines and new_path is None:  # acknowledged: now the change
                        new_path, _ = await world.start_agent(FakeAgent("new"))
                process.terminate()
        assert lines[0]["watching"] is True
        added = [e["backend"]["path"] for e in lines if e.get("event") == "backend_added"]
        assert added == [str(new_path)]
