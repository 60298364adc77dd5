"""The domain: agent framing, discovery, the registry, the prober and the proxy."""

from switcher.core._accept import (
    SocketListener,
    accept_loop,
    accept_socket,
    accept_socket_loop,
)
from switcher.core._affinity import Affinity, ChosenBy, Decision, without_lookup
from switcher.core._discovery import Candidate, Layout, ScanSettings, host_hash, scan
from switcher.core._hangup import HangupWatch
from switcher.core._loops import LoopGuard
from switcher.core._outcome import ConnectionResult, Outcome
from switcher.core._peer import (
    BackendUnavailableError,
    PeerCredentials,
    open_backend,
    peer_credentials,
    uid_allowed,
)
from switcher.core._prober import Prober, RefreshReport, probe, scan_settings
from switcher.core._protocol import (
    MAX_MESSAGE_LEN,
    Frame,
    FrameDecoder,
    FrameError,
    MessageType,
    encode,
)
from switcher.core._proxy import ProxyServer, ProxyStatistics, serve_agent_proxy
from switcher.core._registry import Backend, Health, Kind, ProbeResult, Registry, Snapshot
from switcher.core._relay import relay_connection
from switcher.core._relaysocket import RelaySocket, RelayStream
from switcher.core._survey import Served, SessionSeen, TmuxClientSeen, survey
from switcher.core._upstream import Connector, unix_connector
from switcher.core._watcher import Interest, Watcher

__all__ = [
    "MAX_MESSAGE_LEN",
    "Affinity",
    "Backend",
    "BackendUnavailableError",
    "Candidate",
    "ChosenBy",
    "ConnectionResult",
    "Connector",
    "Decision",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "HangupWatch",
    "Health",
    "Interest",
    "Kind",
    "Layout",
    "LoopGuard",
    "MessageType",
    "Outcome",
    "PeerCredentials",
    "ProbeResult",
    "Prober",
    "ProxyServer",
    "ProxyStatistics",
    "RefreshReport",
    "Registry",
    "RelaySocket",
    "RelayStream",
    "ScanSettings",
    "Served",
    "SessionSeen",
    "Snapshot",
    "SocketListener",
    "TmuxClientSeen",
    "Watcher",
    "accept_loop",
    "accept_socket",
    "accept_socket_loop",
    "encode",
    "host_hash",
    "open_backend",
    "peer_credentials",
    "probe",
    "relay_connection",
    "scan",
    "scan_settings",
    "serve_agent_proxy",
    "survey",
    "uid_allowed",
    "unix_connector",
    "without_lookup",
]
