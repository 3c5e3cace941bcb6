"""Frame encoding: round trips, and each malformed field rejected with `FrameError`
naming it, before any payload is read."""

from __future__ import annotations

import numpy as np
import pytest

from kvflow.config import KVConfig
from kvflow.peer.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    PULL_HEAD,
    FrameError,
    FrameKind,
    KeyRecord,
    SeqFrame,
    blocks_meta_size,
    pack_blocks_head,
    pack_checksums,
    pack_header,
    pack_pull_frame,
    pack_seq,
    unpack_blocks_head,
    unpack_checksums,
    unpack_header,
    unpack_pull,
    unpack_seq,
    unpack_tier_codes,
)
from kvflow.peer.identity import model_fingerprint

LIMIT = 1 << 20


def test_header_round_trip_in_network_byte_order() -> None:
    data = pack_header(FrameKind.PULL, 7, 300)
    assert data[:4] == MAGIC and data[4] == PROTOCOL_VERSION and data[5] == FrameKind.PULL
    assert data[8:12] == (7).to_bytes(4, "big") and data[12:] == (300).to_bytes(8, "big")
    header = unpack_header(data, LIMIT)
    assert (header.kind, header.request_id, header.payload_length) == (FrameKind.PULL, 7, 300)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ((b"HTTP", PROTOCOL_VERSION, 4, 0, 1, 0), "bad magic"),
        ((MAGIC, 2, 4, 0, 1, 0), "protocol version 2 not supported"),
        ((MAGIC, PROTOCOL_VERSION, 99, 0, 1, 0), "unknown frame kind 99"),
        ((MAGIC, PROTOCOL_VERSION, 4, 1, 1, 0), "reserved flags"),
        ((MAGIC, PROTOCOL_VERSION, 4, 0, 1, LIMIT + 1), "PULL frame of 1048577 bytes exceeds"),
        ((MAGIC, PROTOCOL_VERSION, 1, 0, 1, MAX_CONTROL_BYTES + 1), "HELLO frame of"),
        ((MAGIC, PROTOCOL_VERSION, 5, 0, 1, 2**64 - 1), "exceeds the limit"),
    ],
)
def test_malformed_headers_are_rejected(fields: tuple[object, ...], message: str) -> None:
    with pytest.raises(FrameError, match=message):
        unpack_header(HEADER.pack(*fields), LIMIT)


def test_a_pull_frame_round_trips_and_a_wrong_key_count_is_refused() -> None:
    keys = [0, 1, 2**64 - 1]
    frame = pack_pull_frame(b"f" * 16, 42, keys)
    header = unpack_header(frame[:HEADER_SIZE], LIMIT)
    assert header == (FrameKind.PULL, 42, len(frame) - HEADER_SIZE)
    payload = frame[HEADER_SIZE:]
    body = payload[PULL_HEAD.size :]
    assert body == np.array(keys, dtype=np.uint64).astype(">u8").tobytes()  # big-endian
    fingerprint, lease_id, out = unpack_pull(payload)
    assert fingerprint == b"f" * 16 and lease_id == 42 and list(out) == keys
    with pytest.raises(FrameError, match="announces 3 keys"):
        unpack_pull(payload[:-1])
    with pytest.raises(FrameError, match="too short"):
        unpack_pull(payload[:5])


def test_blocks_head_and_checksums_round_trip_and_a_length_that_disagrees() -> None:
    head_bytes = pack_blocks_head(9, 64, ["cpu", "disk"])
    sums = pack_checksums([1, 2**64 - 1])
    assert len(head_bytes) + len(sums) == blocks_meta_size(2)
    head = unpack_blocks_head(head_bytes[:16], blocks_meta_size(2) + 2 * 64)
    assert (head.lease_id, head.num_blocks, head.bytes_per_block) == (9, 2, 64)
    assert unpack_tier_codes(head_bytes[16:]) == ("cpu", "disk")
    one_tier = pack_blocks_head(9, 64, ["disk", "disk", "disk"])
    assert unpack_tier_codes(one_tier[16:]) == ("disk", "disk", "disk")
    assert unpack_checksums(sums, 2) == (1, 2**64 - 1)
    with pytest.raises(FrameError, match="announces 2 blocks of 64 bytes"):
        unpack_blocks_head(head_bytes[:16], blocks_meta_size(2) + 2 * 64 + 1)
    with pytest.raises(FrameError, match="tier codes"):
        unpack_tier_codes(b"\x01\x07")


def test_seq_frames_round_trip_and_cut_records_are_rejected() -> None:
    frame = SeqFrame(
        b"i" * 16,
        5,
        (
            KeyRecord("stored", "cpu", np.array([3, 1], dtype=np.uint64)),
            KeyRecord("dropped", "disk", np.array([2**63], dtype=np.uint64)),
        ),
    )
    payload = pack_seq(frame)
    out = unpack_seq(payload, FrameKind.EVENTS)
    assert (out.incarnation, out.seq) == (b"i" * 16, 5)
    assert [(r.kind, r.tier, r.keys.tolist()) for r in out.records] == [
        ("stored", "cpu", [3, 1]),
        ("dropped", "disk", [2**63]),
    ]
    with pytest.raises(FrameError, match="past the end"):
        unpack_seq(payload[:-1], FrameKind.EVENTS)
    with pytest.raises(FrameError, match="trailing"):
        unpack_seq(payload + b"x", FrameKind.EVENTS)


def test_fingerprints_differ_with_model_dtype_block_size_and_layout() -> None:
    base = KVConfig()
    fingerprint = model_fingerprint(base, "llama-3-8b")
    assert fingerprint == model_fingerprint(KVConfig(), "llama-3-8b")
    others = [
        model_fingerprint(base, "llama-3-70b"),
        model_fingerprint(KVConfig(block_size=32), "llama-3-8b"),
        model_fingerprint(KVConfig.model_validate({"layout": {"dtype": "float16"}}), "llama-3-8b"),
        model_fingerprint(KVConfig.model_validate({"layout": {"head_dim": 64}}), "llama-3-8b"),
    ]
    assert len({fingerprint, *others}) == 5
