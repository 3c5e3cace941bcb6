"""The Prometheus metrics of an engine used as a library, without the HTTP server; and
the real-time simulated runner under them (its steps take the modelled time)."""

from __future__ import annotations

import time

import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvflow.engine import AsyncEngine
from kvflow.engine_adapters.realtime_sim import RealTimeSimRunner, sim_token_id
from kvflow.engine_adapters.simulated import LatencyModel
from kvflow.request import RequestOutput
from kvflow.serve.metrics import EngineMetrics
from tests.builders import make_config, make_request

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_a_library_engine_exports_vllm_named_metrics() -> None:
    config = make_config(**{"kv.block_size": 4, "kv.device.num_blocks": 64})
    # 5 ms per step: 1 + 3 + 3 steps take at least 35 ms of real time.
    runner = RealTimeSimRunner(LatencyModel(5.0, 0.0, 0.0, 0.0))
    outputs: list[RequestOutput] = []
    began = time.perf_counter()
    with anyio.fail_after(30):
        async with AsyncEngine(config, runner, "fcfs") as engine:
            metrics = EngineMetrics(lambda: engine, "m")
            first = make_request(12, 1, request_id="a")
            outputs = [o async for o in metrics.track(engine.generate(first), 12)]
            for rid in ("b", "c"):
                request = make_request(12, 3, request_id=rid)  # the same 12-token prompt
                outputs += [o async for o in metrics.track(engine.generate(request), 12)]
            text = generate_latest(metrics.registry).decode()
    assert time.perf_counter() - began >= 0.035
    assert [t for o in outputs for t in o.new_token_ids][-3:] == [
        sim_token_id("c", i) for i in range(3)
    ]
    got = samples(text)
    model = ("model_name", "m")
    assert got["kvflow:generation_tokens_total", frozenset({model})] == 7
    assert got["kvflow:prompt_tokens_total", frozenset({model})] == 36
    success = frozenset({model, ("finished_reason", "length")})
    assert got["kvflow:request_success_total", success] == 3
    assert got["kvflow:time_to_first_token_seconds_count", frozenset({model})] == 3
    assert got["kvflow:inter_token_latency_seconds_count", frozenset({model})] == 4
    assert got["kvflow:request_queue_time_seconds_count", frozenset({model})] == 3
    assert got["kvflow:num_requests_running", frozenset({model})] == 0
    assert got["kvflow:kv_blocks_used", frozenset({model, ("tier", "device")})] == 0
    assert got["kvflow:kv_blocks_total", frozenset({model, ("tier", "device")})] == 64
    # b and c find the first 2 blocks (8 of 12 tokens; the last block stays uncached).
    assert got["kvflow:prefix_cache_queries_total", frozenset({model})] == 36
    assert got["kvflow:prefix_cache_hits_total", frozenset({model})] == 16
    # Re-admissions after preemption are counted apart (none here).
    assert got["kvflow:prefix_cache_readmission_queries_total", frozenset({model})] == 0
    assert got["kvflow:prefix_cache_readmission_hits_total", frozenset({model})] == 0
