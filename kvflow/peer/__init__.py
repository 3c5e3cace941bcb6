"""Peer-to-peer KV sharing: the peer service, pulls, and the directory of who holds what.

See docs/peer.md for the protocol. `kvflow.kv` never imports this package: the store
publishes block events (`KVStore.add_listener`) and serves runs (`kvflow.kv.export`);
this package carries both over TCP.
"""
