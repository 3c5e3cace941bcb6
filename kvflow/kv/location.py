"""Where a prefix lives: the store's tiers, and the answer to `locate`."""

from __future__ import annotations

from typing import Literal, NamedTuple

TierName = Literal["device", "cpu", "disk"]
TIERS: tuple[TierName, ...] = ("device", "cpu", "disk")


class PrefixLocation(NamedTuple):
    """The run of leading tokens of a prompt that is cached, split by where it lives.

    The first `device_tokens` tokens are on device, the next `cpu_tokens` in CPU memory,
    then `disk_tokens` on local disk, then `peer_tokens` at the peer named `peer`.
    Counts are whole blocks' worth of tokens.
    """

    device_tokens: int = 0
    cpu_tokens: int = 0
    disk_tokens: int = 0
    peer_tokens: int = 0
    peer: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.device_tokens + self.cpu_tokens + self.disk_tokens + self.peer_tokens

    @property
    def local_tokens(self) -> int:
        """Tokens cached on this instance (device, cpu or disk)."""
        return self.device_tokens + self.cpu_tokens + self.disk_tokens
