"""The router's prefill step for prefill/decode disaggregation (`kvflow router
--prefill URL`), as vLLM's disaggregated proxy does it: each request's prompt goes first
to a prefill instance, asking for one token and for the prompt's KV to be kept
(`"kvflow_handoff": {"keep": true}`); the ticket in its answer (the prefill instance's
peer service, model fingerprint, block keys) is added to the request, which the router
then sends to a decode instance as any request (`RouterApp.send_routed`). The decode
instance pulls the blocks over the peer path and generates.

Both legs go through `RouterApp.send_routed`: the prefill leg over the fleet's prefill
instances (`LiveFleet.route(..., prefill=True)`, their own router), retried on another
prefill instance while one refuses (503) or is down, the decode leg over the others.

Any failure of the step (no prefill instance in the rotation, every one refused or is
down, an error answer, no ticket, no answer within the timeout) sends the request on
without a ticket: the decode instance computes the prompt itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from kvflow.cluster.upstream import UpstreamDownError
from kvflow.request import Request

if TYPE_CHECKING:
    from kvflow.cluster.live import Ticket
    from kvflow.cluster.proxy import RouterApp, _Instance
    from kvflow.cluster.upstream import UpstreamResponse

HANDOFF_FIELD = "kvflow_handoff"


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request a prefill instance serves: the prompt, one token, not streamed, its
    KV kept."""
    ask = {k: v for k, v in body.items() if k not in ("max_completion_tokens", "stream_options")}
    ask.update(max_tokens=1, stream=False)
    ask[HANDOFF_FIELD] = {"keep": True}
    return ask


class PrefillStep:
    """Prefills requests on the app's prefill instances (`LiveFleet.prefill_ids`: they
    take part in the app's health checks and block events but never get a whole
    request), then sends them on to a decode instance.

    Args:
        timeout_s: a prefill not answered within this time is given up (no retry).
    """

    def __init__(self, app: RouterApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.prefills = Counter(
            "kvflow:router_prefills",
            "Prefill steps per prefill instance and outcome: handoff (a ticket came back), "
            "no_handoff (an answer without one), error (an error answer), timeout, down "
            "(refused, unreachable or cut off).",
            ["instance", "outcome"],
            registry=app.metrics.registry,
        )
        self.seconds = Counter(
            "kvflow:router_prefill_seconds",
            "Time spent in prefill steps (not in kvflow:router_added_latency_seconds).",
            registry=app.metrics.registry,
        )

    async def send(
        self, body: dict[str, Any], routed: Request, head: bytes, raw: bytes, arrived: float
    ) -> tuple[Ticket, _Instance, UpstreamResponse] | str:
        """Prefill the request (`body`, as `routed`; `head` and `raw` as
        `RouterApp.send_routed` takes them), then send it with the ticket, or as it came
        when the step failed, to a decode instance: `send_routed`'s answer."""
        started = time.perf_counter()
        ticket = None if HANDOFF_FIELD in body else await self._prefill(body, routed, head)
        took = time.perf_counter() - started
        self.seconds.inc(took)
        if ticket is not None:
            raw = json.dumps({**body, HANDOFF_FIELD: ticket}).encode()
        return await self.app.send_routed(routed, head, raw, arrived + took)

    async def _prefill(
        self, body: dict[str, Any], routed: Request, head: bytes
    ) -> dict[str, Any] | None:
        """The ticket of the request's prefill; None when the step failed."""
        app = self.app
        ask = json.dumps(prefill_body(body)).encode()
        tried: list[int] = []  # the prefill instances tried, the last one answering
        sent: tuple[Ticket, _Instance, UpstreamResponse] | str | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                sent = await app.send_routed(routed, head, ask, 0.0, prefill=True, tried=tried)
                if isinstance(sent, str):  # every one refused or was down
                    self._count(tried, "down")
                    return None
                _, target, response = sent
                answer = bytearray()
                while chunk := await response.read():
                    answer += chunk
        except TimeoutError:  # busy or stalled: trying another would double the wait
            self._count(tried[:-1], "down")
            self._count(tried[-1:], "timeout")
            return None
        except UpstreamDownError:  # the answer was cut off
            self._count(tried, "down")
            return None
        finally:
            if isinstance(sent, tuple):
                sent[2].release()
                app._done(sent[0])
        self._count(tried[:-1], "down")
        if response.status != 200:
            self.prefills.labels(target.url, "error").inc()
            return None
        try:
            ticket = json.loads(answer).get(HANDOFF_FIELD)
        except (ValueError, AttributeError):
            ticket = None
        if not isinstance(ticket, dict):
            self.prefills.labels(target.url, "no_handoff").inc()
            return None
        self.prefills.labels(target.url, "handoff").inc()
        return ticket

    def _count(self, instances: list[int], outcome: str) -> None:
        for i in instances:
            self.prefills.labels(self.app.targets[i].url, outcome).inc()


__all__ = ["HANDOFF_FIELD", "PrefillStep", "prefill_body"]
