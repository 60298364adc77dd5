"""The control protocol on plain bytes: framing, parsing, replies, watch diffs."""

from __future__ import annotations

import contextlib
import json

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switcher.control import (
    ControlError,
    LineFramer,
    diff_events,
    encode_reply,
    list_reply,
    parse_request,
    rank_reason,
)
from switcher.control._commands import resolve
from switcher.control._protocol import (
    ListCommand,
    PreferCommand,
    RefreshCommand,
    StatusCommand,
    WatchCommand,
)
from switcher.core import Backend, Health, Layout, Snapshot


def backend(
    bid: str, *, health: Health = Health.HEALTHY, appeared: float = 100.0, **kw: object
) -> Backend:
    return Backend(
        id=bid,
        path=f"/tmp/ssh-{bid}/agent.1",
        layout=Layout.TMP,
        dev=1,
        ino=int(bid, 16),
        appeared=appeared,
        health=health,
        **kw,  # type: ignore[arg-type]
    )


class TestLineFramer:
    def test_splits_lines_across_feeds(self) -> None:
        """Lines split over several reads come out whole, in order, without newlines."""
        framer = LineFramer()
        framer.feed(b'{"a"')
        assert framer.next_line() is None
        framer.feed(b':1}\n{"b":2}\n{"c"')
        assert [framer.next_line(), framer.next_line(), framer.next_line()] == [
            b'{"a":1}',
            b'{"b":2}',
            None,
        ]
        assert framer.buffered == 4

    def test_line_over_the_limit_is_refused_before_its_end_arrives(self) -> None:
        """A line longer than the limit fails as soon as the limit is passed, newline or not."""
        framer = LineFramer(max_line=10)
        framer.feed(b"x" * 11)
        with pytest.raises(ControlError) as caught:
            framer.next_line()
        assert caught.value.code == "line_too_long"

    def test_line_at_the_limit_is_accepted(self) -> None:
        """A line of exactly the limit is fine."""
        framer = LineFramer(max_line=10)
        framer.feed(b"x" * 10 + b"\n")
        assert framer.next_line() == b"x" * 10


class TestParseRequest:
    @pytest.mark.parametrize(
        ("line", "command"),
        [
            (b'{"v":1,"cmd":"list"}', ListCommand()),
            (b'{"v":1,"cmd":"refresh"}', RefreshCommand()),
            (b'{"v":1,"cmd":"status"}', StatusCommand()),
            (b'{"v":1,"cmd":"watch"}', WatchCommand()),
            (b'{"v":1,"cmd":"prefer","id":"6aa7"}', PreferCommand("6aa7")),
            (b'{"cmd":"prefer","clear":true,"v":1}', PreferCommand(None)),
        ],
    )
    def test_valid_requests(self, line: bytes, command: object) -> None:
        """Each documented request parses to its command."""
        assert parse_request(line) == command

    @pytest.mark.parametrize(
        ("line", "code"),
        [
            (b"{not json", "bad_json"),
            (b"\xff\xfe", "bad_json"),
            (b"", "bad_json"),
            (b"[1,2]", "not_an_object"),
            (b'"list"', "not_an_object"),
            (b'{"cmd":"list"}', "unsupported_version"),
            (b'{"v":2,"cmd":"list"}', "unsupported_version"),
            (b'{"v":true,"cmd":"list"}', "unsupported_version"),
            (b'{"v":"1","cmd":"list"}', "unsupported_version"),
            (b'{"v":1}', "unknown_command"),
            (b'{"v":1,"cmd":"lsit"}', "unknown_command"),
            (b'{"v":1,"cmd":7}', "unknown_command"),
            (b'{"v":1,"cmd":"list","extra":1}', "bad_argument"),
            (b'{"v":1,"cmd":"prefer"}', "bad_argument"),
            (b'{"v":1,"cmd":"prefer","id":""}', "bad_argument"),
            (b'{"v":1,"cmd":"prefer","id":5}', "bad_argument"),
            (b'{"v":1,"cmd":"prefer","clear":false}', "bad_argument"),
            (b'{"v":1,"cmd":"prefer","clear":true,"id":"ab"}', "bad_argument"),
            (b'{"v":1,"cmd":"prefer","path":"/tmp/x"}', "bad_argument"),
        ],
    )
    def test_bad_requests_get_a_clear_error(self, line: bytes, code: str) -> None:
        """Every kind of bad request raises a ControlError with its documented code."""
        with pytest.raises(ControlError) as caught:
            parse_request(line)
        assert caught.value.code == code
        assert "\n" not in caught.value.message

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes_never_escape_as_other_errors(self, data: bytes) -> None:
        """Any bytes at all either parse or raise ControlError; nothing else escapes."""
        try:
            parse_request(data)
        except ControlError as error:
            assert error.code in {  # noqa: PT017 (hypothesis: most inputs raise, some parse)
                "bad_json",
                "not_an_object",
                "unsupported_version",
                "unknown_command",
                "bad_argument",
            }

    @settings(max_examples=300, deadline=None)
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda children: st.lists(children) | st.dictionaries(st.text(), children),
            max_leaves=10,
        )
    )
    def test_arbitrary_json_never_escapes_as_other_errors(self, value: object) -> None:
        """Any JSON value either parses or raises ControlError; nothing else escapes."""
        with contextlib.suppress(ControlError):
            parse_request(json.dumps(value).encode())


class TestReplies:
    def test_reply_is_one_compact_line(self) -> None:
        """A reply encodes to compact JSON and exactly one trailing newline."""
        assert encode_reply({"ok": True, "x": [1, 2]}) == b'{"ok":true,"x":[1,2]}\n'

    def test_list_reply_ranks_and_explains(self) -> None:
        """list names the choice, and each backend's reason says why it ranks there."""
        healthy_new = backend("00000002", appeared=200.0)
        healthy_old = backend("00000001", appeared=100.0)
        dead = backend("00000003", health=Health.DEAD, last_error="connection refused")
        snapshot = Snapshot((healthy_new, healthy_old, dead), pinned=None, version=1)
        reply = list_reply(snapshot)
        assert (reply["choice"], [(b["id"], b["reason"]) for b in reply["backends"]]) == (
            "00000002",
            [
                ("00000002", "healthy, newest"),
                ("00000001", "healthy, older session"),
                ("00000003", "dead: connection refused"),
            ],
        )

    @pytest.mark.parametrize(
        ("health", "reason"),
        [
            (Health.HEALTHY, "pinned"),
            (Health.SLOW, "pinned"),
            (Health.DEAD, "dead: gone (pin ignored while dead)"),
            (Health.UNKNOWN, "unknown: not probed yet (pin waits for a probe)"),
        ],
    )
    def test_reason_of_a_pinned_backend(self, health: Health, reason: str) -> None:
        """A pin shows as the reason while it applies, and says so when it is ignored."""
        pinned = backend("0000000a", health=health, last_error="gone")
        snapshot = Snapshot((pinned,), pinned="0000000a", version=1)
        assert rank_reason(pinned, snapshot) == reason


class TestResolve:
    snapshot = Snapshot(
        (backend("abc12345"), backend("abc99999"), backend("def00000")), pinned=None, version=1
    )

    @pytest.mark.parametrize("target", ["def00000", "def", "/tmp/ssh-def00000/agent.1"])
    def test_id_prefix_or_path(self, target: str) -> None:
        """A backend is found by its id, a unique prefix of it, or its path."""
        assert resolve(self.snapshot, target).id == "def00000"

    @pytest.mark.parametrize(
        ("target", "code"), [("abc", "ambiguous"), ("/tmp/other", "not_found")]
    )
    def test_ambiguous_or_unknown(self, target: str, code: str) -> None:
        """A shared prefix is ambiguous; a path not in the registry is not found."""
        with pytest.raises(ControlError) as caught:
            resolve(self.snapshot, target)
        assert caught.value.code == code


class TestDiffEvents:
    def test_every_kind_of_change(self) -> None:
        """Added, removed, health, pin and choice changes each produce one event."""
        a, b, c = backend("0000000a", appeared=300.0), backend("0000000b"), backend("0000000c")
        old = Snapshot((a, b), pinned=None, version=1)
        a_dead = attrs.evolve(a, health=Health.DEAD)
        new = Snapshot((b, c, a_dead), pinned="0000000b", version=2)
        events = diff_events(old, new)
        assert [e["event"] for e in events] == [
            "backend_added",
            "health_changed",
            "pin_changed",
            "choice_changed",
        ] or [e["event"] for e in events] == [
            "backend_added",
            "health_changed",
            "pin_changed",
            "choice_changed",
        ]
        assert events[1:] == [
            {"event": "health_changed", "id": "0000000a", "from": "healthy", "to": "dead"},
            {"event": "pin_changed", "pinned": "0000000b"},
            {"event": "choice_changed", "choice": "0000000b", "previous": "0000000a"},
        ]
        removed = diff_events(new, Snapshot((b,), pinned="0000000b", version=3))
        assert [(e["event"], e.get("id")) for e in removed] == [
            ("backend_removed", "0000000c"),
            ("backend_removed", "0000000a"),
        ]

    def test_no_change_no_events(self) -> None:
        """A probe that changes nothing a watcher cares about produces no events."""
        a = backend("0000000a")
        old = Snapshot((a,), pinned=None, version=1)
        new = Snapshot((attrs.evolve(a, last_probe=5.0),), pinned=None, version=2)
        assert diff_events(old, new) == []
