from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from procs import Reaper
from world import World


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh private directory with a short path.

    pytest's tmp_path is too long for Unix socket addresses (108 bytes).
    """
    path = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead whenever every task is blocked (memory streams only)."""
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
async def world(short_tmp: Path) -> AsyncIterator[World]:
    """An agents dir and a nursery; the test starts sessions and the daemon."""
    agents = short_tmp / "agents"
    agents.mkdir()
    async with trio.open_nursery() as nursery:
        world = World(short_tmp, agents, nursery)
        try:
            yield world
        finally:
            await world.aclose()
            nursery.cancel_scope.cancel()


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """Kills every daemon a test started, even when the test fails."""
    reaper = Reaper()
    try:
        yield reaper
    finally:
        reaper.kill_all()
