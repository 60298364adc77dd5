"""Where switcher's files go and why it is safe: private dirs, parent checks, stale sockets,
the instance lock, binding (switcher.paths, pathsafety, instancelock, served)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from switcher._defaults import path_tag
from switcher.instancelock import AlreadyRunningError, lock_for, unlock
from switcher.paths import (
    MAX_SOCKET_PATH_BYTES,
    default_control_path,
    default_socket_path,
    lock_path,
    runtime_dir,
)
from switcher.pathsafety import (
    UnsafePathError,
    check_parent_dir,
    ensure_private_dir,
    prepare_socket_dir,
)
from switcher.served import bind_private_socket, claim_socket_path, socket_answers

if TYPE_CHECKING:
    from collections.abc import Iterator

# Any uid that is not ours: chown to it needs root, and it need not exist.
OTHER_UID = 54321

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to another uid needs root"
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def make_dir(path: Path, mode: int) -> Path:
    path.mkdir()
    path.chmod(mode)  # chmod, not mkdir's mode: the umask must not trim it
    return path


def stale_socket(path: Path) -> Path:
    """A socket file nobody listens on, as a killed daemon leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(os.fspath(path))
    return path


def open_fds() -> set[str]:
    return {p.name for p in Path("/proc/self/fd").iterdir()}


@pytest.fixture
def live_socket(short_tmp: Path) -> Iterator[Path]:
    """A socket with a listener behind it, as a running daemon has."""
    path = short_tmp / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(os.fspath(path))
        sock.listen(1)
        yield path


@pytest.fixture
def umask_022() -> Iterator[None]:
    """Run the test under the common umask 022, restoring the previous one after."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


class TestDefaults:
    def test_runtime_dir(self) -> None:
        """The runtime dir is /tmp/switcher-$UID, for the given uid or our own."""
        assert (runtime_dir(1234), runtime_dir()) == (
            Path("/tmp/switcher-1234"),
            Path(f"/tmp/switcher-{os.getuid()}"),
        )

    def test_default_sockets(self) -> None:
        """The agent and control sockets live in the runtime dir."""
        assert (default_socket_path(), default_control_path()) == (
            runtime_dir() / "agent.sock",
            runtime_dir() / "control.sock",
        )


class TestEnsurePrivateDir:
    @pytest.mark.usefixtures("umask_022")
    def test_creates_0700(self, short_tmp: Path) -> None:
        """A missing dir is created with mode 0700."""
        path = short_tmp / "run"
        ensure_private_dir(path)
        assert (path.is_dir(), mode_of(path)) == (True, 0o700)

    def test_accepts_existing_private_dir(self, short_tmp: Path) -> None:
        """An existing 0700 dir of ours is accepted as it is."""
        path = make_dir(short_tmp / "run", 0o700)
        ensure_private_dir(path)
        assert mode_of(path) == 0o700

    def test_refuses_symlink(self, short_tmp: Path) -> None:
        """A symlink, even to a private dir of ours, is refused."""
        target = make_dir(short_tmp / "target", 0o700)
        link = short_tmp / "run"
        link.symlink_to(target)
        with pytest.raises(UnsafePathError) as info:
            ensure_private_dir(link)
        assert str(info.value) == f"{link} is a symlink; refusing to use it"

    def test_refuses_dangling_symlink(self, short_tmp: Path) -> None:
        """A dangling symlink is refused, not followed to create its target."""
        link = short_tmp / "run"
        link.symlink_to(short_tmp / "nowhere")
        with pytest.raises(UnsafePathError, match="is a symlink"):
            ensure_private_dir(link)
        assert not (short_tmp / "nowhere").exists()

    def test_refuses_non_directory(self, short_tmp: Path) -> None:
        """A regular file at the path is refused."""
        path = short_tmp / "run"
        path.write_bytes(b"")
        with pytest.raises(UnsafePathError) as info:
            ensure_private_dir(path)
        assert str(info.value) == f"{path} is not a directory"

    @pytest.mark.parametrize("mode", [0o710, 0o701, 0o750, 0o755, 0o777, 0o1777])
    def test_refuses_group_or_other_bits(self, short_tmp: Path, mode: int) -> None:
        """A dir with any group or other permission bit is refused, and left unchanged."""
        path = make_dir(short_tmp / "run", mode)
        with pytest.raises(UnsafePathError) as info:
            ensure_private_dir(path)
        assert str(info.value) == (
            f"{path} has mode {mode:04o}; it must not be accessible to group or others "
            "(chmod 700 it)"
        )
        assert mode_of(path) == mode

    @requires_root
    def test_refuses_other_owner(self, short_tmp: Path) -> None:
        """A private dir owned by another uid is refused, naming both uids."""
        path = make_dir(short_tmp / "run", 0o700)
        os.chown(path, OTHER_UID, -1)
        with pytest.raises(UnsafePathError) as info:
            ensure_private_dir(path)
        assert str(info.value) == (
            f"{path} is owned by uid {OTHER_UID}, not by us (uid {os.getuid()})"
        )

    def test_missing_parent(self, short_tmp: Path) -> None:
        """A dir that cannot be created is refused with the reason."""
        path = short_tmp / "missing" / "run"
        with pytest.raises(UnsafePathError) as info:
            ensure_private_dir(path)
        assert str(info.value) == f"cannot create {path}: No such file or directory"


class TestCheckParentDir:
    def test_refuses_world_writable_not_sticky(self, short_tmp: Path) -> None:
        """A world-writable dir without the sticky bit is refused."""
        parent = make_dir(short_tmp / "d", 0o777)
        with pytest.raises(UnsafePathError) as info:
            check_parent_dir(parent / "agent.sock")
        assert str(info.value) == (
            f"{parent} is writable by group or others and not sticky; "
            "another user could replace the socket"
        )

    def test_refuses_group_writable_not_sticky(self, short_tmp: Path) -> None:
        """A group-writable dir without the sticky bit is refused too."""
        parent = make_dir(short_tmp / "d", 0o770)
        with pytest.raises(UnsafePathError, match="not sticky"):
            check_parent_dir(parent / "agent.sock")

    @pytest.mark.parametrize("mode", [0o1777, 0o1770])
    def test_accepts_sticky(self, short_tmp: Path, mode: int) -> None:
        """A writable dir with the sticky bit (like /tmp) is accepted."""
        parent = make_dir(short_tmp / "d", mode)
        check_parent_dir(parent / "agent.sock")

    def test_accepts_real_tmp(self) -> None:
        """The real /tmp is an acceptable parent."""
        check_parent_dir(Path("/tmp/agent.sock"))

    @pytest.mark.parametrize("mode", [0o700, 0o755])
    def test_accepts_not_writable_by_others(self, short_tmp: Path, mode: int) -> None:
        """A dir of ours that others cannot write to is accepted, sticky or not."""
        parent = make_dir(short_tmp / "d", mode)
        check_parent_dir(parent / "agent.sock")

    @requires_root
    def test_refuses_other_owner(self, short_tmp: Path) -> None:
        """A dir owned by neither us nor root is refused."""
        parent = make_dir(short_tmp / "d", 0o755)
        os.chown(parent, OTHER_UID, -1)
        with pytest.raises(UnsafePathError) as info:
            check_parent_dir(parent / "agent.sock")
        assert str(info.value) == f"{parent} is owned by uid {OTHER_UID}, neither us nor root"

    def test_refuses_missing(self, short_tmp: Path) -> None:
        """A parent that does not exist is refused with the reason."""
        parent = short_tmp / "missing"
        with pytest.raises(UnsafePathError) as info:
            check_parent_dir(parent / "agent.sock")
        assert str(info.value) == f"cannot use directory {parent}: No such file or directory"

    def test_refuses_file(self, short_tmp: Path) -> None:
        """A parent that is a regular file is refused."""
        parent = short_tmp / "f"
        parent.write_bytes(b"")
        with pytest.raises(UnsafePathError) as info:
            check_parent_dir(parent / "agent.sock")
        assert str(info.value) == f"{parent} is not a directory"


class TestPrepareSocketDir:
    @staticmethod
    def path_of_length(parent: Path, length: int) -> Path:
        path = parent / ("x" * (length - len(os.fsencode(parent)) - 1))
        assert len(os.fsencode(path)) == length
        return path

    def test_refuses_108_bytes(self, short_tmp: Path) -> None:
        """A socket path of 108 bytes (no room for the NUL in sun_path) is refused."""
        path = self.path_of_length(short_tmp, MAX_SOCKET_PATH_BYTES + 1)
        with pytest.raises(UnsafePathError) as info:
            prepare_socket_dir(path, default_dir=short_tmp / "default")
        assert str(info.value) == (
            f"socket path {path} is longer than 107 bytes, the limit of a Unix socket address"
        )

    def test_accepts_107_bytes(self, short_tmp: Path) -> None:
        """A socket path of exactly 107 bytes is accepted, and such a socket really binds."""
        path = self.path_of_length(short_tmp, 107)
        prepare_socket_dir(path, default_dir=short_tmp / "default")
        stale_socket(path)
        assert path.is_socket()

    def test_counts_bytes_not_characters(self, short_tmp: Path) -> None:
        """The limit is on encoded bytes: a short path in characters can still be too long."""
        path = short_tmp / ("é" * 50)
        assert len(os.fspath(path)) < 107 < len(os.fsencode(path))
        with pytest.raises(UnsafePathError, match="longer than 107 bytes"):
            prepare_socket_dir(path, default_dir=short_tmp / "default")

    @pytest.mark.usefixtures("umask_022")
    def test_creates_default_dir(self, short_tmp: Path) -> None:
        """A socket in the default dir gets that dir created private."""
        default = short_tmp / "default"
        prepare_socket_dir(default / "agent.sock", default_dir=default)
        assert mode_of(default) == 0o700

    def test_checks_default_dir_privacy(self, short_tmp: Path) -> None:
        """An existing default dir open to others is refused, even though it is sticky."""
        default = make_dir(short_tmp / "default", 0o1777)
        with pytest.raises(UnsafePathError, match="must not be accessible"):
            prepare_socket_dir(default / "agent.sock", default_dir=default)

    def test_checks_other_parent(self, short_tmp: Path) -> None:
        """A socket outside the default dir gets the parent-dir check, not a mkdir."""
        parent = make_dir(short_tmp / "d", 0o777)
        default = short_tmp / "default"
        with pytest.raises(UnsafePathError, match="not sticky"):
            prepare_socket_dir(parent / "agent.sock", default_dir=default)
        assert not default.exists()


class TestClaimSocketPath:
    def test_absent(self, short_tmp: Path) -> None:
        """Nothing at the path: nothing to do, nothing created."""
        path = short_tmp / "agent.sock"
        claim_socket_path(path)
        assert list(short_tmp.iterdir()) == []

    def test_stale_socket_removed(self, short_tmp: Path) -> None:
        """A socket of ours that nobody answers on is removed."""
        path = stale_socket(short_tmp / "agent.sock")
        claim_socket_path(path)
        assert not os.path.lexists(path)

    def test_live_socket(self, live_socket: Path) -> None:
        """A socket that answers means a running daemon: AlreadyRunningError, socket kept."""
        with pytest.raises(AlreadyRunningError) as info:
            claim_socket_path(live_socket)
        assert (str(info.value), live_socket.is_socket()) == (
            f"something is already serving {live_socket}",
            True,
        )

    def test_regular_file_kept(self, short_tmp: Path) -> None:
        """A regular file at the path is refused and not deleted."""
        path = short_tmp / "agent.sock"
        path.write_bytes(b"precious")
        with pytest.raises(UnsafePathError) as info:
            claim_socket_path(path)
        assert (str(info.value), path.read_bytes()) == (
            f"{path} exists and is not a socket; refusing to replace it",
            b"precious",
        )

    def test_symlink_kept(self, short_tmp: Path) -> None:
        """A symlink, even to a stale socket, is refused; neither it nor its target is deleted."""
        target = stale_socket(short_tmp / "target.sock")
        path = short_tmp / "agent.sock"
        path.symlink_to(target)
        with pytest.raises(UnsafePathError, match="is not a socket"):
            claim_socket_path(path)
        assert (path.is_symlink(), target.is_socket()) == (True, True)

    def test_directory_kept(self, short_tmp: Path) -> None:
        """A directory at the path is refused and left alone."""
        path = make_dir(short_tmp / "agent.sock", 0o700)
        with pytest.raises(UnsafePathError, match="is not a socket"):
            claim_socket_path(path)
        assert path.is_dir()

    def test_uninspectable(self, short_tmp: Path) -> None:
        """A path that cannot be looked at (its parent is a file) is refused with the reason."""
        parent = short_tmp / "f"
        parent.write_bytes(b"")
        with pytest.raises(UnsafePathError) as info:
            claim_socket_path(parent / "agent.sock")
        assert str(info.value) == f"cannot inspect {parent / 'agent.sock'}: Not a directory"

    @requires_root
    def test_other_owner_kept(self, short_tmp: Path) -> None:
        """A stale socket owned by another uid is refused and not deleted."""
        path = stale_socket(short_tmp / "agent.sock")
        os.chown(path, OTHER_UID, -1, follow_symlinks=False)
        with pytest.raises(UnsafePathError) as info:
            claim_socket_path(path)
        assert (str(info.value), path.is_socket()) == (
            f"{path} is a socket owned by uid {OTHER_UID}, not by us",
            True,
        )


class TestLockFor:
    def test_creates_private_lock_file(self, short_tmp: Path) -> None:
        """The lock is a 0600 file next to the socket, named PATH.lock."""
        fd = lock_for(short_tmp / "agent.sock")
        try:
            assert mode_of(short_tmp / "agent.sock.lock") == 0o600
        finally:
            os.close(fd)

    def test_second_lock_refused(self, short_tmp: Path) -> None:
        """A second lock on the same path raises AlreadyRunningError and leaks no descriptor."""
        path = short_tmp / "agent.sock"
        fd = lock_for(path)
        try:
            before = open_fds()
            with pytest.raises(AlreadyRunningError) as info:
                lock_for(path)
            assert (str(info.value), open_fds()) == (
                f"another switcher is already running for {path}",
                before,
            )
        finally:
            os.close(fd)

    def test_released_on_close(self, short_tmp: Path) -> None:
        """Closing the descriptor releases the lock, so it can be taken again."""
        path = short_tmp / "agent.sock"
        os.close(lock_for(path))
        os.close(lock_for(path))

    def test_locks_are_per_path(self, short_tmp: Path) -> None:
        """Locks for two different socket paths do not conflict."""
        first = lock_for(short_tmp / "a.sock")
        try:
            os.close(lock_for(short_tmp / "b.sock"))
        finally:
            os.close(first)

    def test_refuses_symlinked_lock_file(self, short_tmp: Path) -> None:
        """A lock file planted as a symlink is refused, not followed."""
        target = short_tmp / "target"
        target.write_bytes(b"")
        lock = short_tmp / "agent.sock.lock"
        lock.symlink_to(target)
        with pytest.raises(UnsafePathError) as info:
            lock_for(short_tmp / "agent.sock")
        assert str(info.value) == f"cannot open lock file {lock}: Too many levels of symbolic links"

    @requires_root
    def test_refuses_lock_file_of_another_uid(self, short_tmp: Path) -> None:
        """A lock file owned by another uid is refused and its descriptor closed."""
        lock = short_tmp / "agent.sock.lock"
        lock.write_bytes(b"")
        os.chown(lock, OTHER_UID, -1)
        before = open_fds()
        with pytest.raises(UnsafePathError) as info:
            lock_for(short_tmp / "agent.sock")
        assert (str(info.value), open_fds()) == (
            f"lock file {lock} is not a regular file of ours",
            before,
        )


class TestLockPlace:
    def test_beside_the_socket_in_a_private_dir(self, short_tmp: Path) -> None:
        """In a directory only we can write, the lock is PATH.lock beside the socket."""
        assert lock_path(short_tmp / "agent.sock") == short_tmp / "agent.sock.lock"

    def test_in_the_runtime_dir_when_others_can_write(self, short_tmp: Path) -> None:
        """In a directory others can write (a sticky /tmp), the lock goes to our private
        runtime directory, named by a hash of the socket path, and nothing lands beside it."""
        shared = make_dir(short_tmp / "shared", 0o1777)
        path = shared / "agent.sock"
        fd = lock_for(path)
        try:
            lock = runtime_dir() / f"lock-{path_tag(str(path))}.lock"
            assert (lock_path(path), mode_of(lock), list(shared.iterdir())) == (lock, 0o600, [])
        finally:
            unlock(path, fd)
        assert not lock.exists()

    def test_a_lock_file_planted_in_a_shared_dir_is_not_ours(self, short_tmp: Path) -> None:
        """A PATH.lock someone left in a shared directory neither blocks us nor is touched."""
        shared = make_dir(short_tmp / "shared", 0o1777)
        planted = shared / "agent.sock.lock"
        planted.write_text("someone's")
        planted.chmod(0o444)
        unlock(shared / "agent.sock", lock_for(shared / "agent.sock"))
        assert (planted.read_text(), mode_of(planted)) == ("someone's", 0o444)


class TestUnlock:
    def test_removes_the_lock_file(self, short_tmp: Path) -> None:
        """A clean stop leaves no lock file, and the path can be locked again."""
        path = short_tmp / "agent.sock"
        unlock(path, lock_for(path))
        assert not lock_path(path).exists()
        unlock(path, lock_for(path))

    def test_leaves_a_newer_lock_file_alone(self, short_tmp: Path) -> None:
        """If our lock file was replaced, the new one is someone else's: it stays."""
        path = short_tmp / "agent.sock"
        fd = lock_for(path)
        lock_path(path).unlink()
        newer = lock_for(path)
        try:
            unlock(path, fd)
            assert lock_path(path).exists()
        finally:
            unlock(path, newer)


class TestBindPrivateSocket:
    @pytest.mark.usefixtures("umask_022")
    def test_mode_0600_under_umask_022(self, short_tmp: Path) -> None:
        """The socket is 0600 under umask 022, the umask is restored, and it is listening."""
        path = short_tmp / "agent.sock"
        with bind_private_socket(path, backlog=4):
            current = os.umask(0o022)
            assert (mode_of(path), current, socket_answers(path)) == (0o600, 0o022, True)

    def test_leaves_only_the_socket(self, short_tmp: Path) -> None:
        """The temporary name the socket is bound at before it listens is gone after."""
        with bind_private_socket(short_tmp / "agent.sock", backlog=4):
            assert [p.name for p in short_tmp.iterdir()] == ["agent.sock"]

    def test_refuses_occupied_path(self, short_tmp: Path) -> None:
        """Binding over an existing file fails with UnsafePathError, not OSError."""
        path = stale_socket(short_tmp / "agent.sock")
        with pytest.raises(UnsafePathError, match=r"^cannot listen on .*: Address already in use$"):
            bind_private_socket(path, backlog=4)


class TestSocketAnswers:
    def test_live(self, live_socket: Path) -> None:
        """A listening socket answers."""
        assert socket_answers(live_socket) is True

    def test_stale(self, short_tmp: Path) -> None:
        """A socket file with no listener does not answer."""
        assert socket_answers(stale_socket(short_tmp / "s")) is False

    def test_absent(self, short_tmp: Path) -> None:
        """A path with nothing at it does not answer."""
        assert socket_answers(short_tmp / "s") is False
