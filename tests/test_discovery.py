"""Discovery: the host hash of OpenSSH 10.1+ socket names, and scanning real directories."""

from __future__ import annotations

import hashlib
import os
import socket
import string
from typing import TYPE_CHECKING

import pytest

from switcher.core._discovery import (
    AGENTS_DIR_PREFIXES,
    SESSION_DIR_PREFIXES,
    Candidate,
    Layout,
    ScanResult,
    ScanSettings,
    Skipped,
    host_hash,
    scan,
)

if TYPE_CHECKING:
    from pathlib import Path

# Any uid that is not ours: chown to it needs root, and it need not exist.
OTHER_UID = 54321

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to another uid needs root"
)


def spec_host_hash(hostname: bytes) -> str:
    """The host hash as OpenSSH misc-agent.c defines it, written out independently."""
    alphabet = string.ascii_lowercase + string.ascii_uppercase + string.digits
    digest = hashlib.sha512(hostname).digest()
    return "".join(alphabet[digest[i] % 62] for i in range(10))


def make_socket(path: Path) -> Path:
    """Leave a Unix socket file at ``path`` (bound, then closed: nobody listens)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(os.fspath(path))
    return path


def make_legacy_dir(parent: Path, name: str = "ssh-AbCdEfGhIj", mode: int = 0o700) -> Path:
    """An sshd-style mkdtemp directory (``ssh-XXXXXXXXXX``) with the given mode."""
    path = parent / name
    path.mkdir()
    path.chmod(mode)
    return path


def candidate(path: Path, layout: Layout) -> Candidate:
    """The candidate a correct scan reports for the socket at ``path``."""
    st = path.lstat()
    return Candidate(os.fspath(path), layout, st.st_dev, st.st_ino, st.st_ctime)


def settings_for(*dirs: Path, exclude: frozenset[tuple[int, int]] = frozenset()) -> ScanSettings:
    return ScanSettings(
        agents_dirs=tuple(os.fspath(d) for d in dirs),
        uid=os.getuid(),
        host_hash=host_hash(),
        exclude=exclude,
    )


def forwarded_name(suffix: str = "Rand0mXyz1", hash_: str | None = None) -> str:
    """An OpenSSH 10.1+ forwarded-agent socket name for this host (or ``hash_``'s)."""
    return f"s.{host_hash() if hash_ is None else hash_}.sshd.{suffix}"


@pytest.fixture
def agents(short_tmp: Path) -> Path:
    """An empty agents directory (like ~/.ssh/agent or /tmp) with a short path."""
    path = short_tmp / "a"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def elsewhere(short_tmp: Path) -> Path:
    """A directory outside the agents directory, for symlink targets."""
    path = short_tmp / "o"
    path.mkdir(mode=0o700)
    return path


class TestHostHash:
    @pytest.mark.parametrize("hostname", [b"localhost", b"example.org", b"a", b"x" * 64, b""])
    def test_matches_spec(self, hostname: bytes) -> None:
        """The hash is SHA-512's first ten bytes mapped onto a-zA-Z0-9 by byte % 62."""
        assert host_hash(hostname) == spec_host_hash(hostname)

    def test_known_value(self) -> None:
        """A hash worked out by hand from sha512sum's output stays what it was."""
        # printf example.org | sha512sum -> 9c f7 77 af e3 23 ea 90 10 c1 ...
        # % 62 -> 32 61 57 51 41 35 48 20 16 7 -> G 9 5 Z P J W u q h
        assert host_hash("example.org") == "G95ZPJWuqh"

    def test_str_and_bytes_agree(self) -> None:
        """A str hostname hashes as its UTF-8 bytes."""
        assert host_hash("héte.example") == host_hash("héte.example".encode())

    def test_defaults_to_this_host(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without an argument the hash is of gethostname()."""
        monkeypatch.setattr(socket, "gethostname", lambda: "example.org")
        assert host_hash() == "G95ZPJWuqh"


class TestScanFinds:
    def test_legacy_socket(self, agents: Path) -> None:
        """A pre-10.1 ``ssh-XXXX/agent.N`` socket in a 0700 dir is a TMP candidate."""
        sock = make_socket(make_legacy_dir(agents) / "agent.4242")
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped, result.errors) == (
            (candidate(sock, Layout.TMP),),
            (),
            (),
        )

    def test_agent_dir_socket(self, agents: Path) -> None:
        """A 10.1+ ``s.<this host>.sshd.<rand>`` socket is an AGENT_DIR candidate."""
        sock = make_socket(agents / forwarded_name())
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped, result.errors) == (
            (candidate(sock, Layout.AGENT_DIR),),
            (),
            (),
        )

    def test_both_layouts_in_name_order(self, agents: Path) -> None:
        """Both layouts are found in one scan, in sorted name order, several per dir."""
        legacy = make_legacy_dir(agents)
        first = make_socket(legacy / "agent.1")
        second = make_socket(legacy / "agent.2")
        modern = make_socket(agents / forwarded_name())
        result = scan(settings_for(agents))
        assert result.candidates == (
            candidate(modern, Layout.AGENT_DIR),
            candidate(first, Layout.TMP),
            candidate(second, Layout.TMP),
        )

    def test_several_agents_dirs(self, agents: Path, elsewhere: Path) -> None:
        """Every configured agents dir is scanned, in the configured order."""
        modern = make_socket(agents / forwarded_name())
        legacy = make_socket(make_legacy_dir(elsewhere) / "agent.7")
        result = scan(settings_for(elsewhere, agents))
        assert result.candidates == (
            candidate(legacy, Layout.TMP),
            candidate(modern, Layout.AGENT_DIR),
        )

    def test_agents_dir_through_symlink(self, agents: Path, short_tmp: Path) -> None:
        """The configured agents dir itself may be a symlink (as /tmp is on some hosts)."""
        sock = make_socket(agents / forwarded_name())
        link = short_tmp / "l"
        link.symlink_to(agents)
        result = scan(settings_for(link))
        st = sock.lstat()
        expected = Candidate(
            os.fspath(link / sock.name), Layout.AGENT_DIR, st.st_dev, st.st_ino, st.st_ctime
        )
        assert result.candidates == (expected,)


class TestScanSkips:
    def test_other_host(self, agents: Path) -> None:
        """A socket forwarded for another host (an NFS home) is skipped as such."""
        other = spec_host_hash(b"some-other-host.example")
        assert other != host_hash()
        sock = make_socket(agents / forwarded_name(hash_=other))
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped) == (
            (),
            (Skipped(os.fspath(sock), "forwarded for a different host"),),
        )

    def test_local_agent_socket(self, agents: Path) -> None:
        """ssh-agent's own ``s.<hash>.agent.<rand>`` socket is not a forwarded agent."""
        sock = make_socket(agents / f"s.{host_hash()}.agent.Rand0mXyz1")
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped) == (
            (),
            (Skipped(os.fspath(sock), "not a forwarded agent"),),
        )

    def test_symlinked_socket(self, agents: Path, elsewhere: Path) -> None:
        """A symlink named like an agent socket is skipped even though it points at a socket."""
        target = make_socket(elsewhere / "real")
        link = make_legacy_dir(agents) / "agent.1"
        link.symlink_to(target)
        modern_link = agents / forwarded_name()
        modern_link.symlink_to(target)
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped) == (
            (),
            (Skipped(os.fspath(modern_link), "symlink"), Skipped(os.fspath(link), "symlink")),
        )

    def test_symlinked_legacy_dir(self, agents: Path, elsewhere: Path) -> None:
        """A symlinked ``ssh-*`` dir is skipped and not looked into."""
        target = make_legacy_dir(elsewhere, "target")
        make_socket(target / "agent.1")
        link = agents / "ssh-LinkLinkLi"
        link.symlink_to(target)
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped, result.watched) == (
            (),
            (Skipped(os.fspath(link), "symlink"),),
            ((os.fspath(agents), AGENTS_DIR_PREFIXES),),
        )

    def test_regular_file(self, agents: Path) -> None:
        """A regular file named ``agent.1`` (or like a 10.1 socket) is not a socket."""
        fake = make_legacy_dir(agents) / "agent.1"
        fake.write_bytes(b"")
        modern = agents / forwarded_name()
        modern.write_bytes(b"")
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped) == (
            (),
            (Skipped(os.fspath(modern), "not a socket"), Skipped(os.fspath(fake), "not a socket")),
        )

    def test_legacy_name_not_a_directory(self, agents: Path) -> None:
        """A file named ``ssh-*`` is skipped as not a directory."""
        path = agents / "ssh-NotADirXy"
        path.write_bytes(b"")
        result = scan(settings_for(agents))
        assert result.skipped == (Skipped(os.fspath(path), "not a directory"),)

    @pytest.mark.parametrize("mode", [0o720, 0o702, 0o777])
    def test_writable_legacy_dir(self, agents: Path, mode: int) -> None:
        """An ``ssh-*`` dir writable by group or others is skipped with its sockets."""
        legacy = make_legacy_dir(agents, mode=mode)
        make_socket(legacy / "agent.1")
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped) == (
            (),
            (Skipped(os.fspath(legacy), "directory writable by group or others"),),
        )

    def test_readable_legacy_dir_is_fine(self, agents: Path) -> None:
        """Read and search bits for others do not disqualify an ``ssh-*`` dir; only write bits."""
        sock = make_socket(make_legacy_dir(agents, mode=0o755) / "agent.1")
        assert scan(settings_for(agents)).candidates == (candidate(sock, Layout.TMP),)

    def test_excluded_socket(self, agents: Path) -> None:
        """A socket whose (dev, ino) is excluded (our own listener) is skipped."""
        ours = make_socket(agents / forwarded_name("Ours000000"))
        theirs = make_socket(agents / forwarded_name("Theirs0000"))
        st = ours.lstat()
        result = scan(settings_for(agents, exclude=frozenset({(st.st_dev, st.st_ino)})))
        assert (result.candidates, result.skipped) == (
            (candidate(theirs, Layout.AGENT_DIR),),
            (Skipped(os.fspath(ours), "our own socket"),),
        )

    @requires_root
    def test_socket_of_another_uid(self, agents: Path) -> None:
        """A socket owned by another uid is skipped, naming that uid."""
        sock = make_socket(make_legacy_dir(agents) / "agent.1")
        os.chown(sock, OTHER_UID, -1, follow_symlinks=False)
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped) == (
            (),
            (Skipped(os.fspath(sock), f"owned by uid {OTHER_UID}"),),
        )

    @requires_root
    def test_legacy_dir_of_another_uid(self, agents: Path) -> None:
        """Another user's ``ssh-*`` dir in a shared /tmp is skipped without looking inside."""
        legacy = make_legacy_dir(agents)
        make_socket(legacy / "agent.1")
        os.chown(legacy, OTHER_UID, -1)
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped) == (
            (),
            (Skipped(os.fspath(legacy), f"directory owned by uid {OTHER_UID}"),),
        )

    def test_unrelated_entries_not_reported(self, agents: Path) -> None:
        """Entries that do not look like agent sockets are neither candidates nor skipped."""
        (agents / "tmux-0").mkdir()
        (agents / "notes.txt").write_bytes(b"")
        make_socket(agents / "agent.1")  # the legacy socket name, but not in an ssh-* dir
        make_socket(agents / ".X11-unix")
        legacy = make_legacy_dir(agents)
        make_socket(legacy / "other.sock")
        (legacy / "readme").write_bytes(b"")
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped, result.errors) == ((), (), ())


def fail_for(monkeypatch: pytest.MonkeyPatch, name: str, target: Path, error: OSError) -> None:
    """Make ``os.<name>`` raise ``error`` for ``target`` only: a race no real setup can stage."""
    real = getattr(os, name)

    def patched(path: str, *args: object, **kwargs: object) -> object:
        if os.fspath(path) == os.fspath(target):
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, name, patched)


class TestScanRaces:
    def test_socket_vanishes_before_lstat(
        self, agents: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A socket removed between listing and lstat (a session ending) is skipped, not raised."""
        legacy = make_legacy_dir(agents)
        gone = make_socket(legacy / "agent.1")
        kept = make_socket(legacy / "agent.2")
        fail_for(monkeypatch, "lstat", gone, FileNotFoundError(2, "No such file or directory"))
        result = scan(settings_for(agents))
        assert (result.candidates, result.skipped) == (
            (candidate(kept, Layout.TMP),),
            (Skipped(os.fspath(gone), "No such file or directory"),),
        )

    def test_legacy_dir_vanishes_before_lstat(
        self, agents: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An ``ssh-*`` dir removed between listing and lstat is skipped, not raised."""
        legacy = make_legacy_dir(agents)
        fail_for(monkeypatch, "lstat", legacy, FileNotFoundError(2, "No such file or directory"))
        result = scan(settings_for(agents))
        assert (result.skipped, result.errors) == (
            (Skipped(os.fspath(legacy), "No such file or directory"),),
            (),
        )

    def test_legacy_dir_unlistable(self, agents: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """An ``ssh-*`` dir that cannot be listed is an error; the scan goes on past it."""
        broken = make_legacy_dir(agents, "ssh-Broken0000")
        fine = make_legacy_dir(agents, "ssh-Fine000000")
        sock = make_socket(fine / "agent.1")
        fail_for(monkeypatch, "scandir", broken, PermissionError(13, "Permission denied"))
        result = scan(settings_for(agents))
        assert (result.candidates, result.errors) == (
            (candidate(sock, Layout.TMP),),
            (Skipped(os.fspath(broken), "Permission denied"),),
        )


class TestScanDirs:
    def test_missing_agents_dir(self, short_tmp: Path) -> None:
        """A missing agents dir (no OpenSSH 10.1 yet) is not an error, but is watched."""
        missing = short_tmp / "missing"
        assert scan(settings_for(missing)) == ScanResult(
            (), (), ((os.fspath(missing), AGENTS_DIR_PREFIXES),), ()
        )

    def test_agents_dir_not_a_directory(self, short_tmp: Path) -> None:
        """An agents dir that cannot be listed is reported in errors, not raised."""
        path = short_tmp / "file"
        path.write_bytes(b"")
        result = scan(settings_for(path))
        assert (result.candidates, result.errors) == (
            (),
            (Skipped(os.fspath(path), "Not a directory"),),
        )

    def test_listed_twice_scanned_once(self, agents: Path) -> None:
        """An agents dir given twice is scanned once: no duplicate candidates or watches."""
        legacy = make_legacy_dir(agents)
        sock = make_socket(legacy / "agent.1")
        result = scan(settings_for(agents, agents))
        assert (result.candidates, result.watched) == (
            (candidate(sock, Layout.TMP),),
            (
                (os.fspath(agents), AGENTS_DIR_PREFIXES),
                (os.fspath(legacy), SESSION_DIR_PREFIXES),
            ),
        )

    def test_watched_lists_dirs_looked_into(self, agents: Path, short_tmp: Path) -> None:
        """``watched`` holds each agents dir (even a missing one) and each ``ssh-*`` dir
        entered, with the entry prefixes that matter in each."""
        first = make_legacy_dir(agents, "ssh-First00000")
        second = make_legacy_dir(agents, "ssh-Second0000")
        make_legacy_dir(agents, "ssh-Writable00", mode=0o777)  # skipped: not watched
        result = scan(settings_for(agents, short_tmp / "missing"))
        assert result.watched == (
            (os.fspath(agents), ("ssh-", "s.")),
            (os.fspath(first), ("agent.",)),
            (os.fspath(second), ("agent.",)),
            (os.fspath(short_tmp / "missing"), ("ssh-", "s.")),
        )
