"""The router's watch over its instances (`kvflow router`'s background work, off the
forwarding path): every `--health-interval` each instance's /health is checked and, when
it answers 200, its load and peer service are read off its /metrics
(`scrape_instance`) into the live fleet, and its block events followed over that peer
service (`kvflow.peer.follow`). An instance that fails leaves the rotation until it
answers 200 again; the forwarding path takes one out at once when a request finds it
down (`set_health`).
"""

from __future__ import annotations

import asyncio
import logging

import anyio
import anyio.abc
import httpx
from prometheus_client import Gauge

from kvflow.cluster.live import LiveFleet, PeerInfo
from kvflow.cluster.proxy_metrics import scrape_instance

logger = logging.getLogger("kvflow.router")


class InstanceWatch:
    """Health checks, load scrapes and block-event follows of a live fleet's instances.

    Args:
        fleet: the instances; what the checks learn goes into it.
        healthy: the router's `kvflow:router_instance_healthy` gauge.
        interval_s: seconds between rounds of checks.
    """

    def __init__(self, fleet: LiveFleet, healthy: Gauge, interval_s: float) -> None:
        self.fleet = fleet
        self.healthy = healthy
        self.interval_s = interval_s
        self._client: httpx.AsyncClient | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._follows: dict[int, tuple[PeerInfo, anyio.CancelScope]] = {}
        self._warned_block_size: set[int] = set()
        self.reasons: dict[int, str] = {}
        """Why each instance out of the rotation is out (the last failed check)."""

    async def start(self, client: httpx.AsyncClient, tg: anyio.abc.TaskGroup) -> None:
        """Check every instance once with `client` (its timeout bounds each check), then
        go on in `tg` until it is cancelled: the follower's expiry, a round of checks
        every `interval_s`, the follows."""
        self._client, self._tg = client, tg
        tg.start_soon(self.fleet.follower.expire_loop)
        await self.check_all()
        tg.start_soon(self._loop)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in range(len(self.fleet.instances))))

    async def check(self, i: int) -> None:
        """One health check of instance i and, when healthy, a scrape of its load and
        peer service (followed from then on)."""
        assert self._client is not None, "the watch has not started"
        url = self.fleet.instances[i].url
        why = None
        try:
            health = await self._client.get(f"{url}/health")
            if health.status_code != 200:
                why = f"/health answered {health.status_code}"
            else:
                # An error's body is no scrape: one with no sample lines (a 401 without
                # the key, say) would read as an idle instance with no KV.
                metrics = await self._client.get(f"{url}/metrics")
                if metrics.status_code != 200:
                    why = f"/metrics answered {metrics.status_code}"
                else:
                    running, capacity, peer = scrape_instance(metrics.text)
                    self.fleet.scraped(i, running, capacity, peer)
                    self._follow(i)
        except httpx.HTTPError as err:
            why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        except (ValueError, KeyError) as err:
            why = f"/metrics unreadable: {err!r}"
        self.set_health(i, why is None, why)

    def set_health(self, i: int, healthy: bool, why: str | None = None) -> None:
        """Instance i is in the rotation (healthy) or out of it (`why`: the failed
        check, logged when it is news)."""
        inst = self.fleet.instances[i]
        if healthy:
            self.reasons.pop(i, None)
            if not inst.healthy:
                logger.info("kvflow router: %s is in the rotation", inst.url)
        else:
            why = why or "a request found it down"
            if inst.healthy:
                logger.warning("kvflow router: %s left the rotation (%s)", inst.url, why)
            elif self.reasons.get(i) != why:
                logger.warning("kvflow router: %s is not in the rotation (%s)", inst.url, why)
            self.reasons[i] = why
        inst.healthy = healthy
        self.healthy.labels(inst.url).set(1 if healthy else 0)

    def _follow(self, i: int) -> None:
        """Follow instance i's block events (again, when its peer service changed)."""
        peer = self.fleet.instances[i].peer
        if peer is None or self._tg is None:
            return
        if peer.block_size != self.fleet.block_size:
            if i not in self._warned_block_size:
                self._warned_block_size.add(i)
                logger.warning(
                    "kvflow router: %s has kv.block_size=%d, the router %d: its blocks "
                    "are not followed (give the router the instances' --config/--set)",
                    self.fleet.instances[i].url, peer.block_size, self.fleet.block_size,
                )  # fmt: skip
            return
        known = self._follows.get(i)
        if known is not None:
            if known[0][1:] == peer[1:]:
                return
            known[1].cancel()
        scope = anyio.CancelScope()
        self._follows[i] = (peer, scope)
        self._tg.start_soon(self._run_follow, scope, peer)

    async def _run_follow(self, scope: anyio.CancelScope, peer: PeerInfo) -> None:
        with scope:
            await self.fleet.follower.maintain(peer.address, self.fleet.identity(peer.fingerprint))


__all__ = ["InstanceWatch"]
