"""Prometheus metrics of one engine, named after vLLM's (`vllm:x` is `kvflow:x`).

Two halves, usable without the HTTP server too:

- `EngineCollector` reads the engine's state at scrape time (queues, blocks per tier,
  prefix-cache queries and hits, preemptions, bytes moved between tiers, tier errors);
- `RequestMetrics` observes requests as their outputs stream (TTFT, inter-token
  latency, end-to-end and queue time, token counters, finished requests by reason):
  wrap a stream with `track`.

    registry = CollectorRegistry()
    metrics = EngineMetrics(lambda: engine, "my-model", registry)
    async for out in metrics.track(engine.generate(request)):
        ...
    prometheus_client.generate_latest(registry)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvflow.engine_adapters.text import finish_reason_name
from kvflow.request import RequestOutput

if TYPE_CHECKING:
    from kvflow.engine import AsyncEngine

PREFIX = "kvflow:"

# vLLM's buckets for the same histograms (seconds).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class EngineCollector:
    """A prometheus_client collector over `engine()` (nothing while it returns None)."""

    def __init__(self, engine: Callable[[], AsyncEngine | None], model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:
            return
        name = self._model_name
        stats = engine.statistics()
        sched = engine.scheduler.stats
        store = engine.scheduler.store.stats

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            return family

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            return family

        yield gauge("num_requests_running", "Requests holding device blocks.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests queued for admission.", stats.num_waiting)
        yield gauge(
            "num_requests_waiting_for_kv",
            "Admitted requests waiting for their prefix to load from a lower tier.",
            stats.num_waiting_for_kv,
        )
        for metric, doc, by_tier in (
            ("kv_blocks_used", "KV blocks referenced by requests, per tier.", "used"),
            ("kv_blocks_total", "KV blocks of capacity, per tier.", "total"),
        ):
            values = stats.blocks_used_by_tier if by_tier == "used" else stats.blocks_total_by_tier
            tiers = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name", "tier"])
            for tier, num_blocks in values.items():
                tiers.add_metric([name, tier], num_blocks)
            yield tiers
        device_total = stats.blocks_total_by_tier.get("device", 0)
        yield gauge(
            "kv_cache_usage_perc",
            "Fraction of device KV blocks in use (1 = full).",
            stats.blocks_used_by_tier.get("device", 0) / device_total if device_total else 0.0,
        )
        yield counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache at admission.",
            sched.prefix_query_tokens,
        )
        yield counter(
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache at admission (any tier).",
            sched.prefix_hit_tokens,
        )
        # Re-admissions (after preemption) apart, when the scheduler counts them apart.
        for field, metric, doc in (
            ("readmission_query_tokens", "prefix_cache_readmission_queries", "looked up"),
            ("readmission_hit_tokens", "prefix_cache_readmission_hits", "found cached"),
        ):
            num_tokens = getattr(sched, field, None)
            if isinstance(num_tokens, int):
                yield counter(
                    metric, f"Tokens {doc} at re-admissions after preemption.", num_tokens
                )
        hits = CounterMetricFamily(
            PREFIX + "prefix_cache_hits_by_tier",
            "Prompt tokens found cached at admission, by the tier they came from.",
            labels=["model_name", "tier"],
        )
        for tier, num_tokens in sched.hit_tokens_by_tier.items():
            hits.add_metric([name, tier], num_tokens)
        yield hits
        yield counter("num_preemptions", "Requests preempted.", sched.num_preemptions)
        moved = CounterMetricFamily(
            PREFIX + "kv_tier_bytes_moved",
            "Bytes copied between KV tiers, per direction.",
            labels=["model_name", "direction"],
        )
        for direction, num_bytes in store.bytes_moved.items():
            moved.add_metric([name, direction], num_bytes)
        yield moved
        yield counter(
            "kv_tier_errors",
            "Blocks a tier copy failed to move (a bad checksum reads as a miss).",
            store.num_tier_errors,
        )
        for field, doc in (
            ("recovered", "found good in a persistent slab at start (kv.disk.persist)."),
            ("dropped", "dropped at start from a persistent slab (torn, truncated, corrupt)."),
        ):
            num_blocks = getattr(store, f"num_disk_blocks_{field}")
            yield counter(f"kv_disk_blocks_{field}", f"Disk blocks {doc}", num_blocks)
        yield counter("num_steps", "Engine steps planned.", stats.num_steps)


class RequestMetrics:
    """Per-request histograms and counters, observed from output streams."""

    def __init__(self, model_name: str, registry: CollectorRegistry) -> None:
        labels = ["model_name"]
        self._model_name = model_name

        def histogram(metric: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            made = Histogram(PREFIX + metric, doc, labels, registry=registry, buckets=buckets)
            return made.labels(model_name)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Gap between consecutive output tokens.", ITL_BUCKETS
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", labels,
            registry=registry,
        ).labels(model_name)  # fmt: skip
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", labels, registry=registry
        ).labels(model_name)
        self._success = Counter(
            PREFIX + "request_success",
            "Finished requests, by finish reason.",
            [*labels, "finished_reason"],
            registry=registry,
        )
        self._rejected = Counter(
            PREFIX + "request_rejected",
            "Requests answered with an error before generating (bad, refused, too many), "
            "by HTTP status: with request_success, every request sent is counted once.",
            [*labels, "status"],
            registry=registry,
        )

    def observer(self, num_prompt_tokens: int) -> RequestObserver:
        """An observer for one request."""
        return RequestObserver(self, num_prompt_tokens)

    async def track(
        self, outputs: AsyncIterator[RequestOutput], num_prompt_tokens: int
    ) -> AsyncIterator[RequestOutput]:
        """`outputs` passed through, observed on the way. A stream left early counts
        as finished with reason ``abort`` (the engine aborts it)."""
        observer = self.observer(num_prompt_tokens)
        try:
            async for out in outputs:
                observer.observe(out)
                yield out
        finally:
            observer.finish("abort")

    def _count_finished(self, reason: str, num_prompt_tokens: int) -> None:
        self._success.labels(self._model_name, reason).inc()
        self.prompt_tokens.inc(num_prompt_tokens)

    def count_rejected(self, status: int) -> None:
        """Count a request answered with error `status` before anything was generated."""
        self._rejected.labels(self._model_name, str(status)).inc()


class RequestObserver:
    """Observes one request's outputs into `RequestMetrics`."""

    __slots__ = ("_done", "_last_token_time", "_metrics", "_num_prompt_tokens", "_started")

    def __init__(self, metrics: RequestMetrics, num_prompt_tokens: int) -> None:
        self._metrics = metrics
        self._num_prompt_tokens = num_prompt_tokens
        self._last_token_time: float | None = None
        self._started = time.monotonic()
        self._done = False

    def observe(self, out: RequestOutput) -> None:
        metrics = self._metrics
        n = len(out.new_token_ids)
        if n:
            now = time.monotonic()
            metrics.generation_tokens.inc(n)
            if self._last_token_time is None:
                if out.ttft_s is not None:
                    metrics.ttft.observe(out.ttft_s)
            else:
                gap = (now - self._last_token_time) / n
                for _ in range(n):
                    metrics.itl.observe(gap)
            self._last_token_time = now
        if out.finished:
            if out.queue_s is not None:
                metrics.queue.observe(out.queue_s)
            reason = finish_reason_name(out.finish_reason)
            self.finish(reason, out.e2e_s)

    def finish(self, reason: str, e2e_s: float | None = None) -> None:
        """Count the request as finished for `reason` (once; later calls do nothing).
        Without `e2e_s`, the time since the observer was made is taken."""
        if self._done:
            return
        self._done = True
        self._metrics.e2e.observe(time.monotonic() - self._started if e2e_s is None else e2e_s)
        self._metrics._count_finished(reason, self._num_prompt_tokens)


class ServerCollector:
    """The serving process itself at scrape time: asyncio tasks alive on its event loop,
    threads, and requests the server holds (submitted and not yet left). At rest, all
    three return to what they were before any request: what does not is a leak."""

    def __init__(self, num_in_flight: Callable[[], int], model_name: str) -> None:
        self._num_in_flight = num_in_flight
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        try:
            num_tasks = len(asyncio.all_tasks())
        except RuntimeError:  # scraped off the event loop's thread: no loop to ask
            num_tasks = 0
        for metric, doc, value in (
            ("server_tasks", "asyncio tasks alive on the server's event loop.", num_tasks),
            ("server_threads", "Threads alive in the server process.", threading.active_count()),
            (
                "server_requests_in_flight",
                "Requests submitted to the engine whose responses have not ended.",
                self._num_in_flight(),
            ),
        ):
            family = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            family.add_metric([self._model_name], value)
            yield family


class EngineMetrics:
    """Both halves on one registry (a fresh one by default)."""

    def __init__(
        self,
        engine: Callable[[], AsyncEngine | None],
        model_name: str,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        self.requests = RequestMetrics(model_name, self.registry)

    def track(
        self, outputs: AsyncIterator[RequestOutput], num_prompt_tokens: int
    ) -> AsyncIterator[RequestOutput]:
        return self.requests.track(outputs, num_prompt_tokens)


__all__ = [
    "EngineCollector",
    "EngineMetrics",
    "RequestMetrics",
    "RequestObserver",
    "ServerCollector",
]
