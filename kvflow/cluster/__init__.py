"""Fleets: routers (pure, synchronous), the block index they learn from instances'
block events, and the fleet replay in virtual time."""
