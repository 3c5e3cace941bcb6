"""The peer protocol's frames: a fixed, versioned header and the payloads of each kind.

Every frame is a 20-byte header in network byte order, then `payload_length` bytes:

    offset size field
    0      4    magic           b"KVFP"
    4      1    version         PROTOCOL_VERSION
    5      1    kind            FrameKind
    6      2    flags           0 (reserved; a set bit is an error)
    8      4    request_id      chosen by the requester, echoed by the reply
    12     8    payload_length  checked against the receiver's limit before any
                                buffer is made for the payload

Bulk data (a BLOCKS reply's block bytes) is never encoded: the sender hands the block
buffers to `sendmsg` and the receiver `recv_into`s its destination slots; only the
fixed fields and the packed uint64 arrays (keys, checksums) are packed here. HELLO,
CHALLENGE and AUTH carry a small JSON object; no pickle anywhere. See docs/peer.md.
"""

from __future__ import annotations

import enum
import functools
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from kvflow.kv.fingerprint import FINGERPRINT_SIZE as KV_FINGERPRINT_SIZE

MAGIC = b"KVFP"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("!4sBBHIQ")
HEADER_SIZE = HEADER.size
FINGERPRINT_SIZE = KV_FINGERPRINT_SIZE
KEY_DTYPE = np.dtype(">u8")
"""Keys and checksums on the wire: big-endian uint64."""

MAX_CONTROL_BYTES = 64 * 1024
"""Largest control frame (HELLO, CHALLENGE, AUTH, ERROR, HEARTBEAT) either side reads."""


class FrameKind(enum.IntEnum):
    HELLO = 1
    """client -> server: identity, fingerprint, nonce (JSON)."""
    CHALLENGE = 2
    """server -> client: identity, fingerprint, nonce, the server's proof (JSON)."""
    AUTH = 3
    """client -> server: the client's proof (JSON); server -> client: accepted (empty)."""
    PULL = 4
    """request: fingerprint, lease id, keys (packed uint64)."""
    BLOCKS = 5
    """reply to PULL: lease id, count, tiers, the raw block bytes, then their checksums."""
    EVENTS = 6
    """server -> subscriber: one sequence-numbered batch of block events."""
    RESYNC = 7
    """request (empty): subscribe; reply: the full key set per tier at a sequence number."""
    HEARTBEAT = 8
    """either way: incarnation and the last event sequence number sent."""
    ERROR = 9
    """a code and a message; the reply to a request that failed, or before a close."""


PULL_KIND, BLOCKS_KIND = FrameKind.PULL, FrameKind.BLOCKS
"""For the per-pull paths: an enum member's attribute lookup (`FrameKind.PULL`) costs
~0.2 us, a module global's ~0.01."""


class ErrorCode(enum.IntEnum):
    BAD_FRAME = 1
    AUTH_FAILED = 2
    FINGERPRINT_MISMATCH = 3
    BUSY = 4
    UNAVAILABLE = 5


class FrameError(ValueError):
    """A malformed frame: the connection that sent it is closed, nothing else."""


class Header(NamedTuple):
    kind: FrameKind
    request_id: int
    payload_length: int


def pack_header(kind: FrameKind, request_id: int, payload_length: int) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, 0, request_id, payload_length)


def unpack_header(data: bytes | bytearray | memoryview, max_payload_bytes: int) -> Header:
    """Decode and check a header; raises `FrameError` naming the bad field."""
    if len(data) != HEADER_SIZE:
        raise FrameError(f"frame header is {len(data)} bytes, expected {HEADER_SIZE}")
    magic, version, kind, flags, request_id, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise FrameError(f"protocol version {version} not supported (this is {PROTOCOL_VERSION})")
    frame_kind = _KINDS.get(kind)
    if frame_kind is None:
        raise FrameError(f"unknown frame kind {kind}")
    if flags:
        raise FrameError(f"reserved flags set: {flags:#06x}")
    limit = max_payload_bytes if frame_kind in _BULK_KINDS else MAX_CONTROL_BYTES
    limit = min(limit, max_payload_bytes)
    if length > limit:
        raise FrameError(f"{frame_kind.name} frame of {length} bytes exceeds the limit of {limit}")
    return Header(frame_kind, request_id, length)


_KINDS = {kind.value: kind for kind in FrameKind}
_BULK_KINDS = frozenset({FrameKind.PULL, FrameKind.BLOCKS, FrameKind.EVENTS, FrameKind.RESYNC})


# -- control payloads (small JSON objects) ---------------------------------------------
def pack_json(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def unpack_json(
    payload: bytes | bytearray, kind: FrameKind, required: Mapping[str, type]
) -> dict[str, Any]:
    """A control frame's JSON object, with `required` fields of the given types."""
    try:
        fields = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FrameError(f"{kind.name} payload is not JSON") from None
    if not isinstance(fields, dict):
        raise FrameError(f"{kind.name} payload is not a JSON object")
    for name, typ in required.items():
        if not isinstance(fields.get(name), typ):
            raise FrameError(f"{kind.name} field {name!r} missing or not {typ.__name__}")
    return fields


ERROR_HEAD = struct.Struct("!H")


def pack_error(code: ErrorCode, message: str) -> bytes:
    return ERROR_HEAD.pack(code) + message.encode()[: MAX_CONTROL_BYTES - ERROR_HEAD.size]


def unpack_error(payload: bytes | bytearray) -> tuple[int, str]:
    if len(payload) < ERROR_HEAD.size:
        raise FrameError(f"ERROR payload of {len(payload)} bytes is too short")
    (code,) = ERROR_HEAD.unpack_from(payload)
    return code, payload[ERROR_HEAD.size :].decode(errors="replace")


# -- PULL -------------------------------------------------------------------------------
PULL_HEAD = struct.Struct(f"!{FINGERPRINT_SIZE}sQI")


def pack_pull_frame(fingerprint: bytes, request_id: int, keys: Sequence[int]) -> bytes:
    """A whole PULL frame: its header, then the payload in one `struct.pack`
    (`PULL_HEAD`: the fingerprint, the request id as lease id, the number of keys; then
    the keys, big-endian uint64s)."""
    n = len(keys)
    payload = _pull_payload(n).pack(fingerprint, request_id, n, *keys)
    return pack_header(PULL_KIND, request_id, len(payload)) + payload


def unpack_pull(payload: bytes | bytearray) -> tuple[bytes, int, tuple[int, ...]]:
    """(fingerprint, lease id, keys)."""
    if len(payload) < PULL_HEAD.size:
        raise FrameError(f"PULL payload of {len(payload)} bytes is too short")
    fingerprint, lease_id, num_keys = PULL_HEAD.unpack_from(payload)
    expected = PULL_HEAD.size + 8 * num_keys
    if len(payload) != expected:
        raise FrameError(
            f"PULL announces {num_keys} keys ({expected} bytes) in {len(payload)} bytes"
        )
    return fingerprint, lease_id, _u64s(num_keys).unpack_from(payload, PULL_HEAD.size)


def _pack_u64s(values: Sequence[int]) -> bytes:
    """Big-endian uint64s (struct, not numpy: a few dozen values take ~1 us this way)."""
    return _u64s(len(values)).pack(*values)


@functools.lru_cache(maxsize=64)
def _u64s(n: int) -> struct.Struct:
    """The format of `n` big-endian uint64s (made once per count, not an f-string and a
    lookup in struct's own cache per call)."""
    return struct.Struct(f"!{n}Q")


@functools.lru_cache(maxsize=64)
def _pull_payload(n: int) -> struct.Struct:
    """A PULL payload of `n` keys: `PULL_HEAD`, then the keys (one format)."""
    return struct.Struct(f"{PULL_HEAD.format}{n}Q")


# -- BLOCKS -----------------------------------------------------------------------------
BLOCKS_HEAD = struct.Struct("!QII")
"""lease id, number of blocks served, bytes per block. A BLOCKS payload is this head,
one tier code per block, the blocks' bytes, and last one xxh3 per block: checksums come
after the bytes so the owner hashes each block just before sending it, while the
puller is still receiving the ones before."""
TIER_CODES = {"device": 0, "cpu": 1, "disk": 2}
TIER_NAMES = ("device", "cpu", "disk")


def blocks_meta_size(num_blocks: int) -> int:
    """Bytes of a BLOCKS payload besides the blocks: head, tier codes, checksums."""
    return BLOCKS_HEAD.size + 9 * num_blocks


def pack_blocks_head(lease_id: int, bytes_per_block: int, tiers: Sequence[str]) -> bytes:
    if tiers and tiers.count(tiers[0]) == len(tiers):  # the common case: all from one tier
        codes = bytes((TIER_CODES[tiers[0]],)) * len(tiers)
    else:
        codes = bytes(map(TIER_CODES.__getitem__, tiers))
    return BLOCKS_HEAD.pack(lease_id, len(tiers), bytes_per_block) + codes


def pack_checksums(checksums: Sequence[int]) -> bytes:
    return _pack_u64s(checksums)


def unpack_checksums(data: bytes | bytearray | memoryview, num_blocks: int) -> tuple[int, ...]:
    return _u64s(num_blocks).unpack_from(data)


class BlocksHead(NamedTuple):
    lease_id: int
    num_blocks: int
    bytes_per_block: int


def unpack_blocks_head(data: bytes | bytearray | memoryview, payload_length: int) -> BlocksHead:
    """The fixed part of a BLOCKS payload, checked against the payload's length."""
    lease_id, num_blocks, bytes_per_block = BLOCKS_HEAD.unpack(data)
    expected = blocks_meta_size(num_blocks) + num_blocks * bytes_per_block
    if expected != payload_length:
        raise FrameError(
            f"BLOCKS announces {num_blocks} blocks of {bytes_per_block} bytes "
            f"({expected} bytes) in a payload of {payload_length}"
        )
    return BlocksHead(lease_id, num_blocks, bytes_per_block)


def unpack_tier_codes(data: bytes | bytearray | memoryview) -> tuple[str, ...]:
    codes = bytes(data)
    if codes and codes.count(codes[0]) == len(codes) and codes[0] < len(TIER_NAMES):
        return (TIER_NAMES[codes[0]],) * len(codes)  # the common case: all from one tier
    if codes and max(codes) >= len(TIER_NAMES):
        raise FrameError(f"BLOCKS tier codes {list(codes)[:8]} out of range")
    return tuple(map(TIER_NAMES.__getitem__, codes))


# -- EVENTS / RESYNC / HEARTBEAT ---------------------------------------------------------
SEQ_HEAD = struct.Struct("!16sQI")
"""incarnation, sequence number, number of records."""
RECORD_HEAD = struct.Struct("!BBI")
"""record kind (1 stored, 2 dropped; RESYNC: 1), tier code, number of keys."""
RECORD_KINDS = {"stored": 1, "dropped": 2}


@dataclass(frozen=True, slots=True, eq=False)
class KeyRecord:
    """Keys stored in or dropped from one tier of the sender."""

    kind: str
    tier: str
    keys: npt.NDArray[np.uint64]


@dataclass(frozen=True, slots=True, eq=False)
class SeqFrame:
    """An EVENTS batch, a RESYNC snapshot (records of kind `stored`) or a HEARTBEAT (no
    records): the sender's incarnation and the sequence number it is at."""

    incarnation: bytes
    seq: int
    records: tuple[KeyRecord, ...]


def pack_seq(frame: SeqFrame) -> bytes:
    parts = [SEQ_HEAD.pack(frame.incarnation, frame.seq, len(frame.records))]
    for r in frame.records:
        parts.append(RECORD_HEAD.pack(RECORD_KINDS[r.kind], TIER_CODES[r.tier], len(r.keys)))
        parts.append(r.keys.astype(KEY_DTYPE, copy=False).tobytes())
    return b"".join(parts)


def unpack_seq(payload: bytes | bytearray, kind: FrameKind) -> SeqFrame:
    if len(payload) < SEQ_HEAD.size:
        raise FrameError(f"{kind.name} payload of {len(payload)} bytes is too short")
    incarnation, seq, num_records = SEQ_HEAD.unpack_from(payload)
    offset = SEQ_HEAD.size
    records: list[KeyRecord] = []
    kinds = {v: k for k, v in RECORD_KINDS.items()}
    for i in range(num_records):
        if offset + RECORD_HEAD.size > len(payload):
            raise FrameError(f"{kind.name} record {i} of {num_records} is cut off")
        rkind, tier, num_keys = RECORD_HEAD.unpack_from(payload, offset)
        offset += RECORD_HEAD.size
        if rkind not in kinds or tier >= len(TIER_NAMES):
            raise FrameError(f"{kind.name} record {i}: kind {rkind} / tier {tier} unknown")
        if offset + 8 * num_keys > len(payload):
            raise FrameError(f"{kind.name} record {i} announces {num_keys} keys past the end")
        keys = np.frombuffer(payload, dtype=KEY_DTYPE, offset=offset, count=num_keys)
        offset += 8 * num_keys
        records.append(KeyRecord(kinds[rkind], TIER_NAMES[tier], keys.astype(np.uint64)))
    if offset != len(payload):
        raise FrameError(f"{kind.name} has {len(payload) - offset} trailing bytes")
    return SeqFrame(incarnation, seq, tuple(records))
