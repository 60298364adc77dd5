"""The pid file: written whole, removed only while it names us. Standard library only."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from switcher.pathsafety import UnsafePathError


def write_pid_file(path: Path, pid: int) -> None:
    """Write ``pid`` to ``path``, mode 0600, replacing it whole: a reader never sees half."""
    temporary = path.with_name(f".{path.name}.{pid}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o600)
        try:
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)
        temporary.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise UnsafePathError(f"cannot write pid file {path}: {exc.strerror}") from None


def remove_pid_file(path: Path, pid: int) -> None:
    """Remove the pid file if it still names ``pid`` (a newer daemon may have replaced it)."""
    try:
        if path.read_text().strip() == str(pid):
            path.unlink()
    except (OSError, UnicodeDecodeError):
        pass
