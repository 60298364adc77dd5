"""Local agents (--local-agent): found, checked, kept and ranked as the last resort."""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing

from fakeproc import FakeProc, backend, snapshot
from switcher.cli._init import _forwarded
from switcher.cli._main import _build_parser
from switcher.cli._render import render_list
from switcher.control._commands import backend_json, list_reply, rank_reason
from switcher.core import Candidate, Health, Kind, Layout, Prober, ProbeResult, Registry
from switcher.core._affinity import Affinity, ChosenBy, match_session
from switcher.core._discovery import ScanResult, ScanSettings, scan
from switcher.core._proctree import ProcessTable
from switcher.core._registry import Backend, local_backend_id
from switcher.core._tmux import TmuxQuery

# Any uid that is not ours: chown to it needs root, and it need not exist.
OTHER_UID = 54321

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to another uid needs root"
)


def make_socket(path: Path) -> Path:
    """Leave a Unix socket file at ``path`` (bound, then closed: nobody listens)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(os.fspath(path))
    return path


def settings(
    *local: Path, agents_dir: Path, exclude: frozenset[tuple[int, int]] = frozenset()
) -> ScanSettings:
    return ScanSettings(
        (str(agents_dir),),
        uid=os.getuid(),
        host_hash="hosthash00",
        exclude=exclude,
        local_agents=tuple(map(str, local)),
    )


def local_of(result: ScanResult) -> list[tuple[str, int, bool, str | None]]:
    """The local candidates a scan reported: (name, order, missing, refused)."""
    return [
        (Path(c.path).name, c.order, c.missing, c.refused)
        for c in result.candidates
        if c.layout is Layout.LOCAL
    ]


@pytest.fixture
def home(short_tmp: Path) -> Path:
    """A private directory for local agents' sockets, as $XDG_RUNTIME_DIR is."""
    path = short_tmp / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def agents(short_tmp: Path) -> Path:
    path = short_tmp / "agents"
    path.mkdir(mode=0o700)
    return path


class TestDiscovery:
    def test_present_missing_and_in_order(self, home: Path, agents: Path) -> None:
        """Every local agent named is a candidate, in the order given, its socket there or not."""
        make_socket(home / "b.sock")
        result = scan(settings(home / "a.sock", home / "b.sock", agents_dir=agents))
        assert local_of(result) == [("a.sock", 0, True, None), ("b.sock", 1, False, None)]

    def test_missing_directory_is_missing_too(self, home: Path, agents: Path) -> None:
        """gpg-agent's socket dir may not exist yet: that is a missing socket, not a refusal."""
        result = scan(settings(home / "gnupg" / "S.gpg-agent.ssh", agents_dir=agents))
        assert local_of(result) == [("S.gpg-agent.ssh", 0, True, None)]

    def test_symlink_refused(self, home: Path, agents: Path) -> None:
        """A symlink is never followed, even to a real socket of ours."""
        make_socket(home / "real.sock")
        (home / "link.sock").symlink_to(home / "real.sock")
        result = scan(settings(home / "link.sock", agents_dir=agents))
        assert local_of(result) == [("link.sock", 0, False, "symlink")]

    def test_not_a_socket_refused(self, home: Path, agents: Path) -> None:
        (home / "file").write_text("")
        result = scan(settings(home / "file", agents_dir=agents))
        assert local_of(result) == [("file", 0, False, "not a socket")]

    def test_our_own_socket_refused(self, home: Path, agents: Path) -> None:
        """switcher's own socket named as a local agent would relay to itself."""
        st = make_socket(home / "agent.sock").lstat()
        result = scan(
            settings(
                home / "agent.sock", agents_dir=agents, exclude=frozenset({(st.st_dev, st.st_ino)})
            )
        )
        assert local_of(result) == [("agent.sock", 0, False, "our own socket")]

    def test_writable_directory_refused(self, home: Path, agents: Path) -> None:
        """Where others may replace the socket, it is refused; a sticky dir like /tmp is fine."""
        shared = home / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        make_socket(shared / "a.sock")
        sticky = home / "sticky"
        sticky.mkdir()
        sticky.chmod(0o1777)
        make_socket(sticky / "b.sock")
        result = scan(settings(shared / "a.sock", sticky / "b.sock", agents_dir=agents))
        assert local_of(result) == [
            ("a.sock", 0, False, "directory writable by group or others"),
            ("b.sock", 1, False, None),
        ]

    @requires_root
    def test_socket_of_another_uid_refused(self, home: Path, agents: Path) -> None:
        sock = make_socket(home / "a.sock")
        os.chown(sock, OTHER_UID, OTHER_UID)
        result = scan(settings(sock, agents_dir=agents))
        assert local_of(result) == [("a.sock", 0, False, f"owned by uid {OTHER_UID}")]

    def test_named_local_is_not_also_forwarded(self, agents: Path) -> None:
        """ssh-agent's own /tmp socket looks forwarded; named as local, it is local only."""
        session = agents / "ssh-AbCdEfGhIj"
        session.mkdir(mode=0o700)
        make_socket(session / "agent.42")
        make_socket(session / "agent.43")
        result = scan(settings(session / "agent.42", agents_dir=agents))
        assert [(Path(c.path).name, c.layout) for c in result.candidates] == [
            ("agent.43", Layout.TMP),
            ("agent.42", Layout.LOCAL),
        ]


def forwarded(name: str, ctime: float = 100.0) -> Candidate:
    return Candidate(f"/tmp/ssh-{name}/agent.1", Layout.TMP, 1, sum(map(ord, name)), ctime)


def local(name: str, order: int = 0, *, ino: int = 7, refused: str | None = None) -> Candidate:
    """A local agent's candidate; ``ino=0`` means its socket is missing."""
    dev, ctime = (0, 0.0) if ino == 0 else (1, 50.0)
    return Candidate(f"/run/user/1000/{name}", Layout.LOCAL, dev, ino, ctime, order, refused)


def lid(c: Candidate) -> str:
    return local_backend_id(c.path)


def fid(c: Candidate) -> str:
    return Backend.from_candidate(c).id


def ranked(registry: Registry) -> list[tuple[str, str]]:
    """The ranking as (file name or session, health)."""
    return [
        (b.path.split("/")[-1] if b.kind is Kind.LOCAL else b.path.split("/")[2], b.health.value)
        for b in registry.snapshot().backends
    ]


def probe(registry: Registry, backend_id: str, health: Health) -> None:
    registry.record_probe(backend_id, ProbeResult(health))


class TestRegistry:
    def test_local_below_every_usable_forwarded_session(self) -> None:
        """Healthy and slow forwarded sessions beat a healthy local agent."""
        registry = Registry()
        registry.reconcile([local("l.sock"), forwarded("ok", 10.0), forwarded("slow", 20.0)])
        probe(registry, lid(local("l.sock")), Health.HEALTHY)
        probe(registry, fid(forwarded("ok", 10.0)), Health.HEALTHY)
        probe(registry, fid(forwarded("slow", 20.0)), Health.SLOW)
        assert ranked(registry) == [
            ("ssh-ok", "healthy"),
            ("ssh-slow", "slow"),
            ("l.sock", "healthy"),
        ]

    def test_local_above_unprobed_and_dead_forwarded(self) -> None:
        """With no forwarded session healthy or slow, a working local agent is the choice."""
        registry = Registry()
        registry.reconcile([local("l.sock"), forwarded("new", 30.0), forwarded("gone", 20.0)])
        probe(registry, lid(local("l.sock")), Health.HEALTHY)
        probe(registry, fid(forwarded("gone", 20.0)), Health.DEAD)
        assert ranked(registry) == [
            ("l.sock", "healthy"),
            ("ssh-new", "unknown"),
            ("ssh-gone", "dead"),
        ]

    def test_locals_in_the_order_given_healthy_before_slow(self) -> None:
        registry = Registry()
        first, second, third = (
            local("1.sock", 0),
            local("2.sock", 1, ino=8),
            local("3.sock", 2, ino=9),
        )
        registry.reconcile([third, second, first])
        probe(registry, lid(first), Health.SLOW)
        probe(registry, lid(second), Health.HEALTHY)
        probe(registry, lid(third), Health.HEALTHY)
        assert ranked(registry) == [
            ("2.sock", "healthy"),
            ("3.sock", "healthy"),
            ("1.sock", "slow"),
        ]

    def test_missing_socket_stays_dead_and_is_a_last_resort(self) -> None:
        """A local agent whose socket is missing is held as dead, and the relay may still try it."""
        registry = Registry()
        registry.reconcile([local("l.sock", ino=0)])
        held = registry.get(lid(local("l.sock")))
        assert held is not None
        assert (held.health, held.last_error) == (Health.DEAD, "no socket at this path")
        assert registry.snapshot().choice is None
        assert registry.snapshot().dead == (held,)

    def test_never_removed_keeps_its_id(self) -> None:
        """Its socket goes and comes back (a new inode): the same entry, unknown until probed."""
        registry = Registry()
        registry.reconcile([local("l.sock")])
        probe(registry, lid(local("l.sock")), Health.HEALTHY)
        gone = registry.reconcile([local("l.sock", ino=0)])
        assert gone.removed == ()
        assert ranked(registry) == [("l.sock", "dead")]
        back = registry.reconcile([local("l.sock", ino=99)])
        assert back.added == ()
        assert ranked(registry) == [("l.sock", "unknown")]
        assert [b.id for b in registry.snapshot().backends] == [lid(local("l.sock"))]

    def test_a_client_revived_it_before_the_scan_saw_it_back(self) -> None:
        """A client reached the agent at its path before a scan saw the new socket: still
        healthy afterwards (the answer came from the socket the scan now finds)."""
        registry = Registry()
        registry.reconcile([local("l.sock", ino=0)])
        registry.record_traffic(lid(local("l.sock")), served=1, failed=0)
        assert ranked(registry) == [("l.sock", "healthy")]
        registry.reconcile([local("l.sock", ino=99)])
        assert ranked(registry) == [("l.sock", "healthy")]

    def test_a_refused_path_that_is_fixed_is_tried_again(self) -> None:
        registry = Registry()
        registry.reconcile([local("l.sock", refused="symlink")])
        registry.reconcile([local("l.sock")])
        held = registry.get(lid(local("l.sock")))
        assert held is not None
        assert (held.health, held.refused) == (Health.UNKNOWN, None)
        assert registry.snapshot().choice == held

    def test_unchanged_socket_keeps_its_health(self) -> None:
        registry = Registry()
        registry.reconcile([local("l.sock")])
        probe(registry, lid(local("l.sock")), Health.HEALTHY)
        version = registry.version
        registry.reconcile([local("l.sock")])
        assert ranked(registry) == [("l.sock", "healthy")]
        assert registry.version == version

    def test_refused_is_dead_and_never_tried(self) -> None:
        """A local agent that failed a safety check is shown dead, and not even a last resort."""
        registry = Registry()
        registry.reconcile([local("l.sock", refused="symlink")])
        held = registry.get(lid(local("l.sock")))
        assert held is not None
        assert (held.health, held.last_error, held.refused) == (Health.DEAD, "symlink", "symlink")
        assert registry.snapshot().dead == ()

    def test_a_pin_may_choose_a_local_agent(self) -> None:
        registry = Registry()
        registry.reconcile([local("l.sock"), forwarded("ok")])
        probe(registry, lid(local("l.sock")), Health.HEALTHY)
        probe(registry, fid(forwarded("ok")), Health.HEALTHY)
        registry.pin(lid(local("l.sock")))
        choice = registry.snapshot().choice
        assert choice is not None
        assert choice.id == lid(local("l.sock"))

    def test_forwarded_id_unchanged(self) -> None:
        """Forwarded ids still depend on the socket's inode; local ones only on the path."""
        assert fid(forwarded("x")) != fid(Candidate("/tmp/ssh-x/agent.1", Layout.TMP, 1, 5, 1.0))
        assert lid(local("l.sock", ino=1)) == Backend.from_candidate(local("l.sock", ino=2)).id


def events(logs: list[MutableMapping[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in e.items() if k != "log_level"}
        for e in logs
        if e["event"].startswith(prefix)
    ]


class TestFallbackLog:
    def test_falls_back_and_leaves_once_each(self) -> None:
        """One event when the choice falls back to a local agent, one when it leaves."""
        registry = Registry()
        ok, mine = forwarded("ok"), local("l.sock")
        with structlog.testing.capture_logs() as logs:
            registry.reconcile([ok, mine])
            probe(registry, fid(ok), Health.HEALTHY)
            probe(registry, lid(mine), Health.HEALTHY)
            probe(registry, fid(ok), Health.DEAD)
            probe(registry, fid(ok), Health.DEAD)
            probe(registry, lid(mine), Health.SLOW)
            probe(registry, fid(ok), Health.HEALTHY)
        assert events(logs, "switcher.registry.fallback") == [
            {
                "event": "switcher.registry.fallback_to_local",
                "backend": lid(mine),
                "path": mine.path,
                "cause": "no_forwarded_agent",
            },
            {
                "event": "switcher.registry.fallback_ended",
                "backend": fid(ok),
                "path": ok.path,
                "cause": "forwarded_agent",
            },
        ]

    def test_ends_when_no_agent_is_left(self) -> None:
        registry = Registry()
        mine = local("l.sock")
        with structlog.testing.capture_logs() as logs:
            registry.reconcile([mine])
            registry.reconcile([local("l.sock", ino=0)])
        assert [(e["event"], e["cause"]) for e in events(logs, "switcher.registry.fallback")] == [
            ("switcher.registry.fallback_to_local", "no_forwarded_agent"),
            ("switcher.registry.fallback_ended", "no_agent"),
        ]

    def test_a_pin_says_so(self) -> None:
        registry = Registry()
        ok, mine = forwarded("ok"), local("l.sock")
        registry.reconcile([ok, mine])
        probe(registry, fid(ok), Health.HEALTHY)
        probe(registry, lid(mine), Health.HEALTHY)
        with structlog.testing.capture_logs() as logs:
            registry.pin(lid(mine))
            registry.pin(None)
        assert [(e["event"], e["cause"]) for e in events(logs, "switcher.registry.fallback")] == [
            ("switcher.registry.fallback_to_local", "pin"),
            ("switcher.registry.fallback_ended", "forwarded_agent"),
        ]

    def test_from_one_local_agent_to_the_next_is_no_event(self) -> None:
        registry = Registry()
        first, second = local("1.sock", 0), local("2.sock", 1, ino=8)
        registry.reconcile([first, second])
        probe(registry, lid(first), Health.HEALTHY)
        probe(registry, lid(second), Health.HEALTHY)
        with structlog.testing.capture_logs() as logs:
            probe(registry, lid(first), Health.DEAD)
        assert events(logs, "switcher.registry.fallback") == []

    def test_scan_changes_are_health_changes(self) -> None:
        """A local socket that vanishes is a health change caused by the scan."""
        registry = Registry()
        registry.reconcile([local("l.sock")])
        probe(registry, lid(local("l.sock")), Health.HEALTHY)
        with structlog.testing.capture_logs() as logs:
            registry.reconcile([local("l.sock", ino=0)])
        changes = events(logs, "switcher.registry.health_changed")
        assert [(e["previous"], e["health"], e["cause"], e["reason"]) for e in changes] == [
            ("healthy", "dead", "scan", "no socket at this path")
        ]


class TestProber:
    async def test_refused_local_agent_is_never_probed(self) -> None:
        """Probing connects: a refused path (a symlink, say) must not be connected to."""
        asked: list[str] = []

        async def probe_path(path: str, *, refuse_pid: int | None) -> ProbeResult:
            del refuse_pid
            asked.append(path)
            return ProbeResult(Health.HEALTHY, latency=0.001, key_count=1)

        async def scan_dirs(settings: ScanSettings) -> ScanResult:
            del settings
            candidates = (local("bad.sock", refused="symlink"), local("good.sock", 1, ino=8))
            return ScanResult(candidates=candidates, skipped=(), watched=(), errors=())

        registry = Registry()
        prober = Prober(
            registry,
            ScanSettings((), uid=0, host_hash="h"),
            scan_dirs=scan_dirs,
            probe_path=probe_path,
            interval=5.0,
            probe_timeout=2.0,
        )
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(prober.serve)
                await prober.refresh()
                nursery.cancel_scope.cancel()
        assert set(asked) == {local("good.sock", 1, ino=8).path}
        assert ranked(registry) == [("good.sock", "healthy"), ("bad.sock", "dead")]


class TestAffinity:
    async def test_a_local_agent_is_nobodys_session(self, tmp_path: Path) -> None:
        """A shell whose SSH_AUTH_SOCK is a local agent's gets the ranking, not that agent."""
        proc = FakeProc(tmp_path / "proc")
        mine = "/run/user/1000/ssh-agent.socket"
        proc.add(101, 1, start=1000, env={"SSH_AUTH_SOCK": mine})
        proc.add(150, 101, start=3000)
        a = backend("/tmp/ssh-AAAAAAAAAA/agent.100", appeared=2.0)
        b = backend("/tmp/ssh-BBBBBBBBBB/agent.200", appeared=1.0)
        here = backend(mine, layout=Layout.LOCAL)
        assert (
            match_session(ProcessTable(uid=proc.uid, root=str(proc.root)).chain(150), [a, b, here])
            is None
        )
        affinity = Affinity(
            ProcessTable(uid=proc.uid, root=str(proc.root)), TmuxQuery(timeout=0.05)
        )
        with trio.fail_after(10):
            decision = await affinity.decide(150, snapshot(a, b, here))
        assert decision.chosen_by is ChosenBy.RANK

    async def test_one_forwarded_and_a_local_agent_need_no_lookup(self, tmp_path: Path) -> None:
        """Only forwarded agents count towards the two that make a lookup worth it."""
        proc = FakeProc(tmp_path / "proc")
        a = backend("/tmp/ssh-AAAAAAAAAA/agent.100")
        here = backend("/run/user/1000/ssh-agent.socket", layout=Layout.LOCAL)
        affinity = Affinity(
            ProcessTable(uid=proc.uid, root=str(proc.root)), TmuxQuery(timeout=0.05)
        )
        with trio.fail_after(10):
            decision = await affinity.decide(150, snapshot(a, here))
        assert decision.steps == ("fewer than two usable agents: the ranking decides",)


class TestControl:
    def test_kind_in_json_and_reason(self) -> None:
        registry = Registry()
        ok, mine = forwarded("ok"), local("l.sock")
        registry.reconcile([ok, mine])
        probe(registry, fid(ok), Health.HEALTHY)
        probe(registry, lid(mine), Health.HEALTHY)
        snap = registry.snapshot()
        first, second = snap.backends
        assert (backend_json(first, snap)["kind"], backend_json(second, snap)["kind"]) == (
            "forwarded",
            "local",
        )
        assert rank_reason(first, snap) == "healthy, newest"
        assert rank_reason(second, snap) == "healthy, local: last resort"


class TestCommandLine:
    def parse(self, *argv: str) -> Any:
        return _build_parser().parse_args(["daemon", *argv])

    def test_repeatable_in_order(self) -> None:
        args = self.parse("--local-agent", "/a/one", "--local-agent", "/b/two")
        assert args.local_agent == ["/a/one", "/b/two"]

    def test_not_given(self) -> None:
        assert self.parse().local_agent is None

    def test_expands_home_and_runtime_dir(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HOME", "/home/u")
        monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
        args = self.parse(
            "--local-agent",
            "~/.1password/agent.sock",
            "--local-agent",
            "$XDG_RUNTIME_DIR/ssh-agent.socket",
            "--local-agent",
            "${XDG_RUNTIME_DIR}/gnupg/S.gpg-agent.ssh",
        )
        assert args.local_agent == [
            "/home/u/.1password/agent.sock",
            "/run/user/1000/ssh-agent.socket",
            "/run/user/1000/gnupg/S.gpg-agent.ssh",
        ]

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("agent.sock", "must be absolute (only ~ and $XDG_RUNTIME_DIR are expanded)"),
            ("$HOME/agent.sock", "must be absolute (only ~ and $XDG_RUNTIME_DIR are expanded)"),
            ("$XDG_RUNTIME_DIR/ssh-agent.socket", "XDG_RUNTIME_DIR is not set"),
        ],
    )
    def test_refused(
        self,
        value: str,
        message: str,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        with pytest.raises(SystemExit) as exit_info:
            self.parse("--local-agent", value)
        assert exit_info.value.code == 2
        assert f"argument --local-agent: {message}: {value!r}" in capsys.readouterr().err

    def test_init_passes_each_on(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """`switcher init` passes every --local-agent on, expanded, in the order given."""
        monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
        args = _build_parser().parse_args(
            ["init", "bash", "--local-agent", "$XDG_RUNTIME_DIR/a", "--local-agent", "/b"]
        )
        assert _forwarded(args) == [
            *("--local-agent", "/run/user/1000/a"),
            *("--local-agent", "/b"),
        ]


class TestCtlList:
    def test_kind_column_and_a_missing_socket_has_no_age(self) -> None:
        """`ctl list` shows each agent's kind; a local agent whose socket is missing has no age."""
        registry = Registry()
        ok, mine = forwarded("ok", 900.0), local("l.sock", ino=0)
        registry.reconcile([ok, mine])
        probe(registry, fid(ok), Health.HEALTHY)
        reply = list_reply(registry.snapshot())
        header, first, second = render_list(reply, now=1000.0).splitlines()
        assert header.split() == [
            *("ID", "KIND", "HEALTH", "KEYS", "LATENCY", "AGE", "SERVED/FAILED", "PATH", "REASON")
        ]
        assert first.split() == [
            *("*", fid(ok), "forwarded", "healthy", "-", "-", "1m", "0/0", ok.path),
            *("healthy,", "newest"),
        ]
        assert second.split() == [
            *(lid(mine), "local", "dead", "-", "-", "-", "0/0", mine.path),
            *("dead:", "no", "socket", "at", "this", "path"),
        ]


class TestReturningAgent:
    async def test_a_local_socket_that_comes_back_is_probed_at_once(self) -> None:
        """The scan that finds a local agent's socket back has it probed, not left unknown."""
        asked: list[str] = []
        present = [False]

        async def probe_path(path: str, *, refuse_pid: int | None) -> ProbeResult:
            del refuse_pid
            asked.append(path)
            if not present[0]:
                return ProbeResult(Health.DEAD, error="socket vanished")
            return ProbeResult(Health.HEALTHY, latency=0.001, key_count=1)

        async def scan_dirs(settings: ScanSettings) -> ScanResult:
            del settings
            found = local("l.sock", ino=7 if present[0] else 0)
            return ScanResult(candidates=(found,), skipped=(), watched=(), errors=())

        registry = Registry()
        prober = Prober(
            registry,
            ScanSettings((), uid=0, host_hash="h"),
            scan_dirs=scan_dirs,
            probe_path=probe_path,
            interval=1000.0,  # no periodic probe during the test: only the scan's
            probe_timeout=2.0,
        )
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(prober.serve)
                await trio.testing.wait_all_tasks_blocked()
                assert ranked(registry) == [("l.sock", "dead")]
                present[0] = True
                prober.scanner.request()
                while ranked(registry) != [("l.sock", "healthy")]:
                    await registry.wait_changed(registry.version)
                nursery.cancel_scope.cancel()
