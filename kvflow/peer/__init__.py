"""Peer-to-peer KV sharing: the peer service, pulls, and the directory of who holds what.

See docs/peer.md for the protocol. `kvflow.kv` never imports this package: the store
publishes block events (`KVStore.add_listener`), serves runs (`kvflow.kv.export`) and
asks a `RemoteTier` (which `Directory` implements) where peers hold runs; this package
carries all of it over TCP.
"""

from kvflow.peer.client import (
    PeerClient,
    PeerDownError,
    PeerRequestError,
    PullResult,
    connect_peer,
    pull_into_cpu,
)
from kvflow.peer.directory import Directory
from kvflow.peer.frames import FrameError
from kvflow.peer.handshake import PeerRefusedError
from kvflow.peer.identity import PeerConfigError, PeerIdentity, model_fingerprint
from kvflow.peer.service import PeerService, ServiceStats

__all__ = [
    "Directory",
    "FrameError",
    "PeerClient",
    "PeerConfigError",
    "PeerDownError",
    "PeerIdentity",
    "PeerRefusedError",
    "PeerRequestError",
    "PeerService",
    "PullResult",
    "ServiceStats",
    "connect_peer",
    "model_fingerprint",
    "pull_into_cpu",
]
