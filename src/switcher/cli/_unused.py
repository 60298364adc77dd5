"""Modules the daemon's libraries import but the daemon never uses: loaded on first use.

structlog imports asyncio (for its async log methods, which we never call),
and asyncio imports ssl; trio imports ssl (for ``SSLStream``) and idna (to
encode host names for TCP). The daemon serves Unix sockets only, so none of
them runs, but importing them costs about 3 MB of resident memory: asyncio's
modules, libssl and libcrypto mapped and relocated, idna's tables
(docs/BENCHMARKS.md, idle RSS). ``defer`` puts a stand-in for each in
``sys.modules`` before trio and structlog are imported; the first attribute
anybody reads from a stand-in imports the real module, so a use we did not
foresee still works, it only costs the memory then.

A stand-in stays what the modules that imported it hold; once the real
module is loaded, the stand-in carries a copy of its attributes.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types

# Imported by trio or structlog, never used by the daemon (see above). Each
# name's import chain was checked not to read an attribute at import time
# (asyncio.sslproto does read ssl's, but asyncio is deferred too).
DAEMON_UNUSED = ("asyncio", "ssl", "idna")

# Guards the swap in sys.modules (not the import): two threads that use a
# stand-in at once must not remove each other's real module.
_swap = threading.Lock()


class _OnFirstUse(types.ModuleType):
    """A module not imported yet: reading any attribute imports it."""

    def __getattr__(self, attribute: str) -> object:
        return getattr(_load(self), attribute)


def _load(stand_in: _OnFirstUse) -> types.ModuleType:
    name = stand_in.__name__
    with _swap:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
    real = importlib.import_module(name)
    stand_in.__dict__.update(real.__dict__)
    return real


def defer(names: tuple[str, ...] = DAEMON_UNUSED) -> None:
    """Put a stand-in in ``sys.modules`` for each of ``names`` not imported yet."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = _OnFirstUse(name)
