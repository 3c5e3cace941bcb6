"""The connection handshake, both sides: HELLO -> CHALLENGE -> AUTH -> AUTH (accepted).

Each side sends a fresh nonce and proves the shared secret by an HMAC over both nonces
and both fingerprints (`identity.proof`); a different fingerprint or a wrong proof is
answered with an ERROR frame naming what differed, and the connection closes before any
block is exchanged.
"""

from __future__ import annotations

import time

from kvflow.config import PeerConfig
from kvflow.peer.frames import (
    MAX_CONTROL_BYTES,
    ErrorCode,
    FrameError,
    FrameKind,
    pack_error,
    pack_header,
    pack_json,
    unpack_error,
    unpack_json,
)
from kvflow.peer.identity import (
    NONCE_SIZE,
    PeerIdentity,
    new_nonce,
    proof,
    proof_matches,
    secret_bytes,
)
from kvflow.peer.wire import Wire


class PeerRefusedError(ConnectionError):
    """The other side refused the connection (auth or fingerprint); the message says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


async def send_frame(wire: Wire, kind: FrameKind, request_id: int, payload: bytes) -> None:
    deadline = time.monotonic() + 5.0
    await wire.send([pack_header(kind, request_id, len(payload)), payload], deadline)


async def send_error(wire: Wire, request_id: int, code: ErrorCode, message: str) -> None:
    await send_frame(wire, FrameKind.ERROR, request_id, pack_error(code, message))


async def _expect(wire: Wire, kind: FrameKind) -> bytearray:
    # Before authentication nothing but a small control frame is read, whatever its kind.
    header = await wire.read_header(MAX_CONTROL_BYTES)
    payload = await wire.read_exact(header.payload_length)
    if header.kind == FrameKind.ERROR:
        code, message = unpack_error(payload)
        raise PeerRefusedError(code, message)
    if header.kind != kind:
        raise FrameError(f"expected {kind.name} during the handshake, got {header.kind.name}")
    return payload


def _hex_field(fields: dict[str, object], name: str, size: int, kind: FrameKind) -> bytes:
    try:
        value = bytes.fromhex(str(fields[name]))
    except ValueError:
        raise FrameError(f"{kind.name} field {name!r} is not hex") from None
    if len(value) != size:
        raise FrameError(f"{kind.name} field {name!r} is {len(value)} bytes, expected {size}")
    return value


def _identity(fields: dict[str, object], kind: FrameKind) -> PeerIdentity:
    return PeerIdentity(
        peer_id=str(fields["peer_id"])[:200],
        fingerprint=_hex_field(fields, "fingerprint", 16, kind),
        incarnation=_hex_field(fields, "incarnation", 16, kind),
    )


_ID_FIELDS = {"peer_id": str, "fingerprint": str, "incarnation": str, "nonce": str}


def _fields(me: PeerIdentity, nonce: bytes) -> dict[str, object]:
    return {
        "peer_id": me.peer_id,
        "fingerprint": me.fingerprint.hex(),
        "incarnation": me.incarnation.hex(),
        "nonce": nonce.hex(),
    }


def _mismatch(theirs: bytes, ours: bytes) -> str:
    return (
        f"model fingerprint {theirs.hex()} differs from this instance's {ours.hex()}: "
        "instances of different models (weights, dtype, block size or KV layout) "
        "exchange no blocks"
    )


async def client_handshake(wire: Wire, me: PeerIdentity, config: PeerConfig) -> PeerIdentity:
    """Authenticate to a server; returns its identity. Raises `PeerRefusedError`."""
    nonce_c = new_nonce()
    await send_frame(wire, FrameKind.HELLO, 0, pack_json(_fields(me, nonce_c)))
    kind = FrameKind.CHALLENGE
    fields = unpack_json(await _expect(wire, kind), kind, {**_ID_FIELDS, "proof": str})
    server = _identity(fields, kind)
    nonce_s = _hex_field(fields, "nonce", NONCE_SIZE, kind)
    if server.fingerprint != me.fingerprint:
        raise PeerRefusedError(
            ErrorCode.FINGERPRINT_MISMATCH, _mismatch(server.fingerprint, me.fingerprint)
        )
    secret = secret_bytes(config)
    fps = me.fingerprint + server.fingerprint
    expected = proof(secret, "server", nonce_c, nonce_s, fps)
    if not proof_matches(expected, _hex_field(fields, "proof", 32, kind)):
        raise PeerRefusedError(
            ErrorCode.AUTH_FAILED,
            f"peer {server.peer_id!r} did not prove the shared secret (peer.secret differs)",
        )
    mine = proof(secret, "client", nonce_c, nonce_s, fps)
    await send_frame(wire, FrameKind.AUTH, 0, pack_json({"proof": mine.hex()}))
    await _expect(wire, FrameKind.AUTH)
    return server


async def server_handshake(wire: Wire, me: PeerIdentity, config: PeerConfig) -> PeerIdentity:
    """Authenticate a connecting client; returns its identity. On a refusal, sends the
    ERROR frame and raises `PeerRefusedError`."""
    kind = FrameKind.HELLO
    fields = unpack_json(await _expect(wire, kind), kind, _ID_FIELDS)
    client = _identity(fields, kind)
    nonce_c = _hex_field(fields, "nonce", NONCE_SIZE, kind)
    if client.fingerprint != me.fingerprint:
        message = _mismatch(client.fingerprint, me.fingerprint)
        await send_error(wire, 0, ErrorCode.FINGERPRINT_MISMATCH, message)
        raise PeerRefusedError(ErrorCode.FINGERPRINT_MISMATCH, message)
    nonce_s = new_nonce()
    secret = secret_bytes(config)
    fps = client.fingerprint + me.fingerprint
    challenge = _fields(me, nonce_s)
    challenge["proof"] = proof(secret, "server", nonce_c, nonce_s, fps).hex()
    await send_frame(wire, FrameKind.CHALLENGE, 0, pack_json(challenge))
    kind = FrameKind.AUTH
    auth = unpack_json(await _expect(wire, kind), kind, {"proof": str})
    expected = proof(secret, "client", nonce_c, nonce_s, fps)
    if not proof_matches(expected, _hex_field(auth, "proof", 32, kind)):
        message = f"peer {client.peer_id!r} did not prove the shared secret"
        await send_error(wire, 0, ErrorCode.AUTH_FAILED, message)
        raise PeerRefusedError(ErrorCode.AUTH_FAILED, message)
    await send_frame(wire, FrameKind.AUTH, 0, b"")
    return client
