"""The router's prefill step for prefill/decode disaggregation (`kvflow router
--prefill URL`), as vLLM's disaggregated proxy does it: each request's prompt goes first
to a prefill instance, asking for one token and for the prompt's KV to be kept
(`"kvflow_handoff": {"keep": true}`); the ticket in its answer (the prefill instance's
peer service, model fingerprint, block keys) is added to the request, which the router
then sends to a decode instance as usual (`RouterApp.forward`). The decode instance
pulls the blocks over the peer path and generates.

Any failure of the step (no prefill instance in the rotation, every one refused or is
down, an error answer, no ticket, no answer within the timeout) sends the request on
without a ticket: the decode instance computes the prompt itself.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import Counter

from kvflow.request import Request

if TYPE_CHECKING:
    from kvflow.cluster.proxy import RouterApp

logger = logging.getLogger("kvflow.router")

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
    request), chosen by the fleet's prefill router.

    Args:
        timeout_s: a prefill not answered within this time is given up (no retry).
    """

    def __init__(self, app: RouterApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.prefills = Counter(
            "kvflow:router_prefills",
            "Prefill steps per prefill instance and outcome: handoff (a ticket came back), "
            "no_handoff (an answer without one), error (an error answer), timeout, down.",
            ["instance", "outcome"],
            registry=app.metrics.registry,
        )
        self.seconds = Counter(
            "kvflow:router_prefill_seconds",
            "Time spent in prefill steps (not in kvflow:router_added_latency_seconds).",
            registry=app.metrics.registry,
        )

    async def handoff(
        self, path: str, body: dict[str, Any], headers: dict[str, str], routed: Request
    ) -> tuple[bytes | None, float]:
        """The body for the decode instance (None: send the original unchanged, without
        a ticket) and the seconds the step took."""
        started = time.perf_counter()
        ticket = None if HANDOFF_FIELD in body else await self._prefill(path, body, headers, routed)
        took = time.perf_counter() - started
        self.seconds.inc(took)
        if ticket is None:
            return None, took
        return json.dumps({**body, HANDOFF_FIELD: ticket}).encode(), took

    async def _prefill(
        self, path: str, body: dict[str, Any], headers: dict[str, str], routed: Request
    ) -> dict[str, Any] | None:
        app = self.app
        fleet = app.fleet
        ask = prefill_body(body)
        tried: list[int] = []
        while True:
            routing = fleet.route(routed, tried, prefill=True)
            if routing is None:
                return None
            i = routing.instance
            tried.append(i)
            url = fleet.instances[i].url
            app.metrics.in_flight.labels(url).inc()
            try:
                answer = await app._http().post(
                    f"{url}{path}", json=ask, headers=headers, timeout=self.timeout_s
                )
            except httpx.TimeoutException:
                # Busy or stalled: trying another would double the wait.
                self.prefills.labels(url, "timeout").inc()
                return None
            except httpx.TransportError as err:
                self.prefills.labels(url, "down").inc()
                logger.warning("kvflow router: prefill on %s failed (%s)", url, err)
                app._set_health(i, False)
                continue
            finally:
                app._done(routing)
            if answer.status_code == 503:
                self.prefills.labels(url, "down").inc()
                continue
            fleet.accepted(routing)
            if answer.status_code != 200:
                self.prefills.labels(url, "error").inc()
                return None
            try:
                ticket = answer.json().get(HANDOFF_FIELD)
            except (ValueError, AttributeError):
                ticket = None
            if not isinstance(ticket, dict):
                self.prefills.labels(url, "no_handoff").inc()
                return None
            self.prefills.labels(url, "handoff").inc()
            return ticket


__all__ = ["HANDOFF_FIELD", "PrefillStep", "prefill_body"]
