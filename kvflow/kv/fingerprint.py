"""The model fingerprint: what must match for two stores' blocks to be interchangeable.

It lives in `kv` because both the persistent disk tier (`kvflow.kv.slab`) and the peer
service (`kvflow.peer.identity`, which re-exports it) key blocks by it, and `kv` is
below `peer`.
"""

from __future__ import annotations

import hashlib
import json

from kvflow.config import KVConfig

FINGERPRINT_SIZE = 16


def model_fingerprint(kv: KVConfig, model_id: str, format_version: int) -> bytes:
    """`FINGERPRINT_SIZE` bytes that differ between stores whose blocks must not mix: the
    weights' identity, the KV dtype, block size and layout (shape and its order), and
    the version of the format carrying the blocks (the peer protocol, the slab format),
    which fixes how keys are hashed and bytes laid out."""
    layout = kv.layout
    identity = {
        "model_id": model_id,
        "block_size": kv.block_size,
        "num_layers": layout.num_layers,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "dtype": layout.dtype,
        "block_layout": "layers,kv,tokens,heads,head_dim",
        "protocol": format_version,
    }
    text = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(text).digest()[:FINGERPRINT_SIZE]
