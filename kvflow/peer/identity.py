"""Who a peer is: model fingerprint, incarnation, and proof of the shared secret.

The handshake (docs/peer.md) is a mutual HMAC-SHA256 challenge-response: each side
sends a fresh 32-byte nonce and proves knowledge of the secret by a MAC over both
nonces, both fingerprints and its role, so a proof can neither be replayed on another
connection nor reflected back at its sender. Proofs are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
from dataclasses import dataclass

from kvflow.config import KVConfig, PeerConfig
from kvflow.kv.fingerprint import model_fingerprint as kv_fingerprint
from kvflow.peer.frames import PROTOCOL_VERSION

NONCE_SIZE = 32


class PeerConfigError(ValueError):
    """A peer service that must not start as configured (the message says why)."""


def model_fingerprint(kv: KVConfig, model_id: str) -> bytes:
    """The fingerprint peers compare (`kvflow.kv.fingerprint.model_fingerprint` at this
    protocol version): instances whose fingerprints differ exchange no blocks."""
    return kv_fingerprint(kv, model_id, PROTOCOL_VERSION)


def new_incarnation() -> bytes:
    """A fresh id for one process start: peers discard what they knew of an old one."""
    return os.urandom(16)


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What one instance says about itself in HELLO / CHALLENGE."""

    peer_id: str
    fingerprint: bytes
    incarnation: bytes


def secret_bytes(config: PeerConfig) -> bytes:
    return (config.secret or "").encode()


def proof(secret: bytes, role: str, nonce_client: bytes, nonce_server: bytes, fps: bytes) -> bytes:
    """The MAC one side (`role` "client" or "server") sends over both nonces and both
    fingerprints. Without a secret (loopback only) the key is empty: the handshake then
    still checks that both ends speak the protocol, not who they are."""
    message = b"kvflow-peer/" + role.encode() + b"\0" + nonce_client + nonce_server + fps
    return hmac.new(secret, message, hashlib.sha256).digest()


def proof_matches(expected: bytes, received: bytes) -> bool:
    return hmac.compare_digest(expected, received)


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (an address or a name resolving to one)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_bind(config: PeerConfig) -> None:
    """Refuse to serve off loopback without a shared secret."""
    if not is_loopback(config.host) and not config.secret:
        raise PeerConfigError(
            f"peer.host={config.host!r} is not a loopback address: set peer.secret "
            "(a shared secret every instance of the fleet knows) to serve blocks beyond "
            "this machine"
        )
