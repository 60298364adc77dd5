"""switcher as the test user runs it: a world-readable install and a daemon process.

The test venv's interpreter lives under /root (mode 0700), which the test user cannot
execute. So the suite copies switcher and its dependencies into a directory everyone
can read, and runs them with the system's python3 (the same CPython minor version as
the venv's on Debian 12, so orjson's compiled module loads there too).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio
from _system import (
    SYSTEM_PYTHON,
    TEARDOWN_GRACE,
    UserAccount,
    describe,
    remove_tree,
    short_dir,
    tail,
    wait_until_serving,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Sequence

    from _openssh import ClientAgent, Sshd

# The packages the daemon needs at run time. The probe below adds whatever else they
# import today, so a new dependency of trio does not break the suite silently.
RUNTIME_PACKAGES = (
    "switcher",
    "trio",
    "attrs",
    "attr",
    "structlog",
    "inotify_simple",
    "sniffio",
    "sortedcontainers",
    "idna",
    "outcome",
)

# Run in a fresh interpreter so that modules pytest itself loaded do not count: prints
# the top-level, non-standard-library modules that importing the daemon's stack pulls in.
_DEPENDENCY_PROBE = """
import json, sys
before = set(sys.modules)
import switcher.cli, switcher.cli._logging, switcher.daemon, trio, structlog, attrs, attr
names = {name.partition(".")[0] for name in set(sys.modules) - before}
print(json.dumps(sorted(
    name for name in names
    if name not in sys.stdlib_module_names
    and getattr(sys.modules.get(name), "__file__", None)
)))
"""


@attrs.frozen
class SwitcherInstall:
    """A copy of switcher that any user can run, as `<root>/bin/switcher`."""

    root: Path

    @property
    def executable(self) -> Path:
        """The `switcher` command."""
        return self.root / "bin" / "switcher"


def _runtime_modules() -> list[str]:
    probe = subprocess.run(
        [sys.executable, "-c", _DEPENDENCY_PROBE],
        capture_output=True,
        check=True,
        timeout=120,
    )
    found: list[str] = json.loads(probe.stdout)
    return sorted({*RUNTIME_PACKAGES, *found})


def _copy_module(name: str, lib: Path) -> None:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise RuntimeError(f"{name} is not importable in the test environment")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    if spec.submodule_search_locations:
        # A package: copy its directory (one location for a regular package; a
        # namespace package may have several, and they merge into one copy).
        for location in spec.submodule_search_locations:
            shutil.copytree(location, lib / name, ignore=ignore, dirs_exist_ok=True)
    elif spec.origin is not None:
        shutil.copy2(spec.origin, lib / Path(spec.origin).name)


def _copy_metadata(name: str, lib: Path) -> None:
    """Copy the dist-info that describes a module, so importlib.metadata works in the copy."""
    for distribution_name in importlib.metadata.packages_distributions().get(name, []):
        distribution = importlib.metadata.distribution(distribution_name)
        for file in distribution.files or []:
            top = file.parts[0]
            if top.endswith(".dist-info"):
                source = Path(str(distribution.locate_file(top)))
                if source.is_dir():
                    shutil.copytree(source, lib / top, dirs_exist_ok=True)
                break


def _launcher(lib: Path) -> str:
    # -I: ignore PYTHON* variables and the user's site directory, so nothing from the
    # test user's environment decides which code runs.
    return (
        f"#!{SYSTEM_PYTHON} -I\n"
        "import sys\n"
        f"sys.path.insert(0, {str(lib)!r})\n"
        "from switcher.cli import main\n"
        "sys.exit(main())\n"
    )


def _make_world_readable(root: Path) -> None:
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def installed_switcher(account: UserAccount) -> Iterator[SwitcherInstall]:
    """Build the world-readable install, check the test user can run it, remove it after."""
    root = short_dir("swe2e-i-")
    try:
        lib = root / "lib"
        lib.mkdir()
        for name in _runtime_modules():
            _copy_module(name, lib)
            _copy_metadata(name, lib)
        install = SwitcherInstall(root=root)
        install.executable.parent.mkdir()
        install.executable.write_text(_launcher(lib))
        _make_world_readable(root)
        install.executable.chmod(0o755)
        check = subprocess.run(
            [str(install.executable), "--help"],
            capture_output=True,
            check=False,
            timeout=120,
            stdin=subprocess.DEVNULL,
            **account.process_options(),
        )
        if check.returncode != 0:
            raise RuntimeError(f"the test user cannot run switcher:\n{describe(check)}")
        yield install
    finally:
        remove_tree(root)


@attrs.frozen
class World:
    """Everything a switcher test stands on: the user, the laptop, sshd, the install."""

    user: UserAccount
    sshd: Sshd
    # Two laptops' agents, each with its own key: (first, second).
    agents: tuple[ClientAgent, ClientAgent]
    switcher: SwitcherInstall
    # A short directory of this test's own, owned by the test user.
    workdir: Path


@attrs.define(eq=False)
class Daemon:
    """A `switcher daemon` that the test started as the test user."""

    socket: Path
    log: Path
    process: trio.Process

    def alive(self) -> bool:
        """Whether the daemon process is still running."""
        return self.process.returncode is None

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Signal the daemon and wait for it to exit; return its exit status."""
        if self.alive():
            self.process.send_signal(signum)
        return await self.process.wait()


def daemon_argv(
    install: SwitcherInstall,
    *,
    socket: Path | None,
    agents_dirs: Sequence[Path] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `switcher daemon` command line, with debug logs (and ``extra`` flags)."""
    argv = [str(install.executable), "daemon", "--log-level", "debug", *extra]
    if socket is not None:
        argv += ["--socket-path", str(socket)]
    if agents_dirs is not None:
        argv += ["--agents-dirs", ":".join(str(directory) for directory in agents_dirs)]
    return argv


@contextlib.asynccontextmanager
async def running_daemon(
    install: SwitcherInstall,
    account: UserAccount,
    workdir: Path,
    *,
    agents_dirs: Sequence[Path] | None = None,
    extra: Sequence[str] = (),
) -> AsyncIterator[Daemon]:
    """Start `switcher daemon` as the test user, wait until it listens, stop it afterwards."""
    socket = workdir / "agent.sock"
    log = workdir / "daemon.log"
    with log.open("ab") as log_stream:
        process = await trio.lowlevel.open_process(
            daemon_argv(install, socket=socket, agents_dirs=agents_dirs, extra=extra),
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=log_stream,
            **account.process_options(),
        )
    daemon = Daemon(socket=socket, log=log, process=process)
    try:
        try:
            await wait_until_serving(socket, alive=daemon.alive)
        except RuntimeError as error:
            raise RuntimeError(f"{error}; its log:\n{tail(log)}") from None
        yield daemon
    finally:
        with trio.move_on_after(TEARDOWN_GRACE, shield=True):
            await daemon.stop()
        if daemon.alive():
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
