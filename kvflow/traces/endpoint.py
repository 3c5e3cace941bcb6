"""Replay a trace in real time against any OpenAI-compatible server (kvflow's own,
vLLM's, SGLang's), as a benchmark client.

Each request is sent at its arrival offset after the replay starts, streamed
(`stream: true` with usage at the end), with `max_tokens`, `min_tokens` and `ignore_eos`
set so its output has the trace's length (bodies: `endpoint_prompts`). What comes back
fills a `RequestState` per request, the structure every replay's report is made of, so
`summarize` gives the same figures as a simulated or in-process replay:

- arrival is the scheduled send time on the replay's clock, so a late sender counts, as
  it would for a real client; TTFT ends at the first streamed chunk with content;
- a chunk may carry several tokens (when it says how many: `token_ids`); they are
  spread evenly over the gap since the previous chunk, as SGLang's client does; ITL
  pools these gaps; the output count is the server's `usage.completion_tokens`;
- finish (E2E, TPOT) is the last content chunk's time;
- the prompt count and the hit rate are the server's `usage.prompt_tokens` and
  `usage.prompt_tokens_details.cached_tokens`; a server that reports no `cached_tokens`
  gets a hit rate of None (null in JSON), not 0.

Against a `kvflow router`, the report also has the fleet's figures under `fleet`
(requests routed to each instance, each instance's prefix hit rate from its own
/metrics: `kvflow.traces.endpoint_fleet`).

An HTTP error, a dropped stream or a timeout fails that request (finish reason
`aborted`, the reason in `finish_detail`), counted in the report by reason; only a run
in which every request fails is an error.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from kvflow.engine_adapters.factory import run_blocking
from kvflow.request import FinishReason, Request, RequestState, RequestStatus
from kvflow.traces.endpoint_client import (
    FINISH_REASONS,
    Connections,
    EndpointError,
    RequestFailed,
    Streamed,
    client_maker,
    first_model,
    probe,
    stream_request,
)
from kvflow.traces.endpoint_fleet import fleet_figures, scrape_fleet
from kvflow.traces.endpoint_prompts import Api, PromptFormat, request_body
from kvflow.traces.metrics import RunReport, summarize

_FINISH_REASONS = {name: FinishReason(name) for name in FINISH_REASONS}


@dataclass(frozen=True, slots=True)
class EndpointOptions:
    """Where and how to send the requests.

    `url` is the server's base URL (`http://host:port`, with or without `/v1`). `model`
    None asks `GET /v1/models` and takes the first id. `prompt_format` None sends token
    ids to `/v1/completions` and text to chat. Token ids are folded into
    `[0, vocab_size)`. `max_connections` bounds the connection pool: requests beyond it
    wait for a connection, and that wait counts in their latencies. `timeout_s` bounds
    each read, write and connect; waiting for a pooled connection is unbounded.
    """

    url: str
    model: str | None = None
    api: Api = "completions"
    prompt_format: PromptFormat | None = None
    api_key: str | None = None
    vocab_size: int = 32000
    max_connections: int = 512
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint URL must start with http:// or https://, got {self.url!r}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size!r}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")

    @property
    def base_url(self) -> str:
        """The URL without a trailing `/` or `/v1`."""
        url = self.url.rstrip("/")
        return url.removesuffix("/v1")

    @property
    def resolved_prompt_format(self) -> PromptFormat:
        if self.prompt_format is not None:
            return self.prompt_format
        return "text" if self.api == "chat" else "ids"


@dataclass(frozen=True, slots=True)
class EndpointResult:
    """What a replay against an endpoint gathered (see `summarize_endpoint`)."""

    model: str
    states: Sequence[RequestState]
    num_failed: int
    failures: dict[str, int]
    """Failed requests by reason (`HTTP 503`, `ReadTimeout`, ...)."""
    first_failure: str | None
    """The first failure's full message."""
    cached_reported: list[bool]
    """Per state: whether the server reported its `cached_tokens`."""
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def replay_endpoint(requests: Sequence[Request], options: EndpointOptions) -> EndpointResult:
    """Replay `requests` against the server in wall-clock time; blocks until the last
    response ends. From async code use `replay_endpoint_async`.

    Raises:
        EndpointError: the server is unreachable, has no model, or served no request.
    """
    result: EndpointResult = run_blocking(replay_endpoint_async, requests, options)
    return result


async def replay_endpoint_async(
    requests: Sequence[Request], options: EndpointOptions
) -> EndpointResult:
    """`replay_endpoint` on the running event loop."""
    if not requests:
        raise EndpointError("no requests to replay")
    pending = sorted(requests, key=lambda r: r.arrival_time)
    path = "/v1/chat/completions" if options.api == "chat" else "/v1/completions"
    where = f"{options.base_url}{path}"
    prompt_format = options.resolved_prompt_format

    make_client = client_maker(options.base_url, options.timeout_s, options.api_key)
    connections = Connections(make_client, options.max_connections)
    try:
        async with connections.client() as client:
            model = options.model or await first_model(client, options.base_url)
            omit = await probe(
                client,
                where,
                path,
                sample=pending[0],
                model=model,
                api=options.api,
                prompt_format=prompt_format,
                vocab_size=options.vocab_size,
            )
            before = await scrape_fleet(client, options.base_url)
        bodies = [
            request_body(
                r,
                model=model,
                api=options.api,
                prompt_format=prompt_format,
                vocab_size=options.vocab_size,
                omit=omit,
            )
            for r in pending
        ]
        run = await _run(connections, path, bodies, pending)
        fleet = None
        if before is not None:
            async with connections.client() as client:
                after = await scrape_fleet(client, options.base_url)
            fleet = None if after is None else fleet_figures(before, after)
    finally:
        await connections.aclose()
    states, cached_reported, failures, wall_s = run
    if len(failures) == len(states):
        raise EndpointError(
            f"all {len(states)} requests to {where} failed; the first: {failures[0][2]}"
        )
    by_kind: dict[str, int] = {}
    for _, kind, _ in failures:
        by_kind[kind] = by_kind.get(kind, 0) + 1
    return EndpointResult(
        model=model,
        states=states,
        num_failed=len(failures),
        failures=by_kind,
        first_failure=failures[0][2] if failures else None,
        cached_reported=cached_reported,
        wall_s=wall_s,
        extra={
            "endpoint": options.base_url,
            "api": options.api,
            "prompt_format": prompt_format,
            "omitted_fields": sorted(omit),
            **({} if fleet is None else {"fleet": fleet}),
        },
    )


async def _run(
    connections: Connections,
    path: str,
    bodies: list[dict[str, Any]],
    pending: list[Request],
) -> tuple[list[_ClientState], list[bool], list[tuple[int, str, str]], float]:
    """Send each body at its request's arrival offset; the states, whether each reported
    `cached_tokens`, the failures (index, kind, message) in request order, and the
    seconds the run took."""
    first = pending[0].arrival_time
    states = [_ClientState(_shifted(r, first)) for r in pending]
    cached_reported = [False] * len(states)
    failures: list[tuple[int, str, str]] = []
    wall_start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - wall_start

    async def send(index: int) -> None:
        state = states[index]
        try:
            async with connections.client() as client:
                streamed = await stream_request(client, path, bodies[index], clock)
            cached_reported[index] = _fill_served(state, streamed)
        except RequestFailed as err:
            failures.append((index, err.kind, str(err)))
            _fill_failed(state, str(err), clock())

    async with anyio.create_task_group() as tg:
        for index, state in enumerate(states):
            delay = state.arrival_time - clock()
            if delay > 0:
                await anyio.sleep(delay)
            tg.start_soon(send, index)
    failures.sort()
    return states, cached_reported, failures, clock()


_UNKNOWN_TO_CLIENT = ("queue_ms", "kv_wait_ms", "num_preemptions", "num_leaked_blocks", "sim_steps")
"""Figures only the server knows: its queueing, KV waits, preemptions, steps, blocks."""


def summarize_endpoint(result: EndpointResult, *, policy: str | None = None) -> RunReport:
    """The run's report (`summarize`), labelled with the model's name by default.

    Figures the client cannot know are None in JSON (`extra` overrides them, per tenant
    too; tables show "-"): `_UNKNOWN_TO_CLIENT`, and the hit rate when the server
    reported no `cached_tokens`. `extra` adds `num_failed`, `failures` (by reason),
    `first_failure`, and where the requests went."""
    reported = [
        s
        for s, is_reported in zip(result.states, result.cached_reported, strict=True)
        if is_reported and s.finish_reason in _FINISH_REASONS.values()
    ]
    unknown = list(_UNKNOWN_TO_CLIENT)
    if not reported:
        unknown.append("prefix_hit_rate")
    report = summarize(
        result.states,
        policy=result.model if policy is None else policy,
        num_preemptions=0,
        prefix_hit_tokens=sum(s.num_cached_tokens for s in reported),
        prefix_query_tokens=sum(s.num_prompt_tokens for s in reported),
        sim_steps=0,
        num_leaked_blocks=0,
        wall_s=result.wall_s,
        extra={
            **dict.fromkeys(unknown),
            **result.extra,
            "num_failed": result.num_failed,
            "failures": dict(result.failures),
            "first_failure": result.first_failure,
        },
    )
    tenants = report.to_json()["per_tenant"]
    for figures in tenants.values():
        figures.update((name, None) for name in unknown if name in figures)
    return dataclasses.replace(report, extra={**report.extra, "per_tenant": tenants})


# -- states ---------------------------------------------------------------------------------


class _ClientState(RequestState):
    """A request as the client saw it: the server's token counts stand in for the token
    ids it never sends (nothing is allocated by a count a server reports)."""

    __slots__ = ("num_streamed_tokens",)

    def __init__(self, request: Request) -> None:
        super().__init__(request)
        self.num_streamed_tokens = 0

    @property
    def num_output_tokens(self) -> int:
        return self.num_streamed_tokens


def _shifted(request: Request, first: float) -> Request:
    """`request` on the replay's clock, where the first arrival is 0."""
    deadline = None if request.deadline is None else request.deadline - first
    arrival = request.arrival_time - first
    return dataclasses.replace(request, arrival_time=arrival, deadline=deadline)


def _fill_served(state: _ClientState, streamed: Streamed) -> bool:
    """Record a served request in `state`; whether the server reported `cached_tokens`."""
    usage = streamed.usage or {}
    num_output = _count(usage.get("completion_tokens"), len(streamed.token_times))
    num_prompt = _count(usage.get("prompt_tokens"), state.num_prompt_tokens)
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    state.num_prompt_tokens = num_prompt
    state.num_streamed_tokens = num_output
    state.token_times = streamed.token_times
    state.first_token_time = streamed.token_times[0]
    state.finish_time = streamed.token_times[-1]
    state.finish_reason = _FINISH_REASONS[streamed.finish_reason or "length"]
    state.status = RequestStatus.FINISHED
    if isinstance(cached, int) and cached >= 0:
        state.num_cached_tokens = cached
        return True
    return False


def _count(value: Any, default: int) -> int:
    return value if isinstance(value, int) and value >= 0 else default


def _fill_failed(state: RequestState, reason: str, now: float) -> None:
    state.finish_reason = FinishReason.ABORTED
    state.finish_detail = reason
    state.finish_time = now
    state.status = RequestStatus.FINISHED


__all__ = [
    "EndpointError",
    "EndpointOptions",
    "EndpointResult",
    "replay_endpoint",
    "replay_endpoint_async",
    "summarize_endpoint",
]
