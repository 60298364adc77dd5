"""Session affinity over the control socket: `why`, the sessions in `list`, `status`.

The processes are a fixture /proc tree (see test_affinity), the registry is real.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from fakeproc import FakeProc
from switcher.cli import _render
from switcher.control import ControlService, DaemonInfo, parse_request
from switcher.control._protocol import ControlError, WhyCommand
from switcher.core import (
    Affinity,
    Candidate,
    Health,
    Layout,
    Prober,
    ProbeResult,
    Registry,
    ScanSettings,
    host_hash,
)
from switcher.core._proctree import ProcessTable
from switcher.core._tmux import TmuxQuery
from test_affinity import LEGACY, TMUX, Tmux, tmux_from_a, tmux_says, two_sessions
from test_control_server import LineClient, no_traffic

V1 = {"v": 1}


@attrs.define(eq=False)
class Rig:
    registry: Registry
    control: ControlService
    nursery: trio.Nursery
    ids: dict[str, str]  # "a", "b" -> backend id

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        ours, theirs = trio.testing.memory_stream_pair()

        async def serve() -> None:
            async with theirs:
                await self.control.handle(theirs)

        self.nursery.start_soon(serve)
        with trio.fail_after(10):
            return await LineClient(ours).call({**V1, **request})


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    proc = FakeProc(tmp_path / "proc")
    two_sessions(proc, LEGACY)
    tmux_from_a(proc, LEGACY)
    return proc


async def make_rig(
    proc: FakeProc, tmp_path: Path, nursery: trio.Nursery, *, on: bool, with_affinity: bool = True
) -> Rig:
    registry = Registry()
    registry.reconcile(
        [
            Candidate(LEGACY.a, Layout.TMP, 1, 11, 100.0),
            Candidate(LEGACY.b, Layout.TMP, 1, 22, 200.0),
        ]
    )
    ids = {}
    for name, path in (("a", LEGACY.a), ("b", LEGACY.b)):
        backend = next(b for b in registry.snapshot().backends if b.path == path)
        registry.record_probe(backend.id, ProbeResult(Health.HEALTHY, latency=0.001, key_count=1))
        ids[name] = backend.id
    said = tmux_says(proc, (160, "/dev/pts/1", 100, "$0"), (260, "/dev/pts/3", 200, "$0"))
    affinity = Affinity(
        ProcessTable(uid=proc.uid, root=str(proc.root)), TmuxQuery(run=Tmux(said), timeout=5)
    )
    settings = ScanSettings((str(tmp_path / "none"),), uid=0, host_hash=host_hash())
    control = ControlService(
        registry,
        Prober(registry, settings, interval=5.0, probe_timeout=2.0),
        DaemonInfo(1, tmp_path / "s.sock", tmp_path / "c.sock", ("/x",), time.monotonic()),
        proxy_statistics=no_traffic,
        request_stop=lambda: None,
        affinity=affinity if with_affinity else None,
        affinity_on=on,
    )
    return Rig(registry, control, nursery, ids)


@pytest.fixture
async def rig(proc: FakeProc, tmp_path: Path) -> AsyncIterator[Rig]:
    async with trio.open_nursery() as nursery:
        yield await make_rig(proc, tmp_path, nursery, on=True)
        nursery.cancel_scope.cancel()


class TestWhy:
    async def test_a_plain_shell_of_the_older_session(self, rig: Rig) -> None:
        """why names the session's own agent, how it was found, and each step."""
        reply = await rig.call({"cmd": "why", "pid": 150})
        assert {k: v for k, v in reply.items() if k != "steps"} == {
            "ok": True,
            "pid": 150,
            "affinity": True,
            "chosen_by": "session",
            "agent": rig.ids["a"],
            "path": LEGACY.a,
            "tmux_client": None,
            "session_sshd_pid": 100,
        }
        assert reply["steps"][-1].startswith("process 101 belongs to the SSH session of sshd 100")

    async def test_a_tmux_pane(self, rig: Rig) -> None:
        reply = await rig.call({"cmd": "why", "pid": 550})
        assert (reply["chosen_by"], reply["agent"], reply["tmux_client"]) == (
            "tmux_client",
            rig.ids["b"],
            "/dev/pts/3",
        )
        assert f"inside tmux at {TMUX}" in reply["steps"][1]

    async def test_with_affinity_off_it_says_so_and_ranks(
        self, proc: FakeProc, tmp_path: Path
    ) -> None:
        async with trio.open_nursery() as nursery:
            rig = await make_rig(proc, tmp_path, nursery, on=False)
            reply = await rig.call({"cmd": "why", "pid": 150})
            status = await rig.call({"cmd": "status"})
            nursery.cancel_scope.cancel()
        assert (reply["chosen_by"], reply["agent"], reply["affinity"]) == (
            "rank",
            rig.ids["b"],
            False,
        )
        assert reply["steps"][0].startswith("affinity is off")
        assert status["affinity"] is False

    async def test_without_a_process_view_why_is_refused(
        self, proc: FakeProc, tmp_path: Path
    ) -> None:
        async with trio.open_nursery() as nursery:
            rig = await make_rig(proc, tmp_path, nursery, on=False, with_affinity=False)
            reply = await rig.call({"cmd": "why", "pid": 150})
            listed = await rig.call({"cmd": "list"})
            nursery.cancel_scope.cancel()
        assert reply["error"]["code"] == "unavailable"
        assert "sessions" not in listed["backends"][0]

    @pytest.mark.parametrize(
        "request_",
        [
            {"cmd": "why"},
            {"cmd": "why", "pid": 0},
            {"cmd": "why", "pid": "1"},
            {"cmd": "why", "pid": True},
        ],
    )
    def test_bad_pids_are_refused(self, request_: dict[str, Any]) -> None:
        with pytest.raises(ControlError) as raised:
            parse_request(json.dumps({**V1, **request_}).encode())
        assert raised.value.code == "bad_argument"

    def test_a_good_request(self) -> None:
        assert parse_request(b'{"v": 1, "cmd": "why", "pid": 42}') == WhyCommand(42)


class TestListAndStatus:
    async def test_list_names_each_agents_sessions_and_tmux_clients(self, rig: Rig) -> None:
        reply = await rig.call({"cmd": "list"})
        served = {
            b["id"]: (b["sessions"], [c["tty"] for c in b["tmux_clients"]])
            for b in reply["backends"]
        }
        assert served == {
            rig.ids["a"]: ([{"sshd_pid": 100, "shell_pid": 101, "tty": "pts/100"}], ["/dev/pts/1"]),
            rig.ids["b"]: ([{"sshd_pid": 200, "shell_pid": 201, "tty": "pts/200"}], ["/dev/pts/3"]),
        }

    async def test_status_says_affinity_is_on(self, rig: Rig) -> None:
        assert (await rig.call({"cmd": "status"}))["affinity"] is True


class TestRendering:
    def test_why_ends_with_the_agent_and_how(self) -> None:
        reply = {
            "steps": ["first", "second"],
            "agent": "6dd8beb1",
            "path": "/tmp/ssh-x/agent.1",
            "chosen_by": "session",
        }
        assert _render.render_why(reply) == (
            "first\nsecond\n=> agent 6dd8beb1 (/tmp/ssh-x/agent.1), chosen by session"
        )
        assert _render.render_why({"steps": [], "agent": None}) == "=> no usable agent right now"

    def test_list_shows_sessions_and_tmux_clients_under_their_agent(self) -> None:
        backend = {
            "id": "6dd8beb1",
            "kind": "forwarded",
            "health": "healthy",
            "keys": 1,
            "probe_latency_ms": 0.3,
            "appeared": 1000.0,
            "served": 1,
            "failed": 0,
            "path": "/tmp/ssh-x/agent.40211",
            "reason": "healthy, newest",
            "sessions": [{"sshd_pid": 40211, "shell_pid": 40212, "tty": "pts/3"}],
            "tmux_clients": [{"tty": "/dev/pts/3", "pid": 5, "activity": 1056.0}],
        }
        text = _render.render_list({"backends": [backend], "choice": "6dd8beb1"}, 1060.0)
        assert text.splitlines()[2:] == [
            "      ssh session: sshd 40211, pts/3 (login shell 40212)",
            "      tmux client /dev/pts/3, active 4s ago",
        ]

    def test_status_says_on_or_off(self) -> None:
        assert _render.render_status({"ok": True, "affinity": False}) == "affinity: off"
