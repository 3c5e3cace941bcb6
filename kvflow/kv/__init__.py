"""Block keys, the prefix index, tiers and the store."""

from kvflow.kv.block_pool import BlockPool, IntegrityError, OutOfBlocksError
from kvflow.kv.hashing import extend_block_keys, hash_block, root_key
from kvflow.kv.location import PrefixLocation
from kvflow.kv.store import KVStore

__all__ = [
    "BlockPool",
    "IntegrityError",
    "KVStore",
    "OutOfBlocksError",
    "PrefixLocation",
    "extend_block_keys",
    "hash_block",
    "root_key",
]
