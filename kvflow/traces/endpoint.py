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

An HTTP error, a dropped stream or a timeout fails that request (finish reason
`aborted`, the reason in `finish_detail`), counted in the report by reason; only a run
in which every request fails is an error.
"""

from __future__ import annotations

import dataclasses
import json
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from kvflow.engine_adapters.factory import run_blocking
from kvflow.request import FinishReason, Request, RequestState, RequestStatus
from kvflow.traces.endpoint_prompts import OPTIONAL_FIELDS, Api, PromptFormat, request_body
from kvflow.traces.metrics import RunReport, summarize

_FINISH_REASONS = {"length": FinishReason.LENGTH, "stop": FinishReason.STOP}
_MAX_ERROR_CHARS = 300


class EndpointError(RuntimeError):
    """The server cannot be reached or used, or no request of the run was served."""


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
    states: list[RequestState]
    num_failed: int
    failures: dict[str, int]
    """Failed requests by reason (`HTTP 503`, `ReadTimeout`, ...)."""
    first_failure: str | None
    """The first failure's full message."""
    cached_reported: list[bool]
    """Per state: whether the server reported its `cached_tokens`."""
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Streamed:
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False


class _RequestFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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
    import httpx

    if not requests:
        raise EndpointError("no requests to replay")
    pending = sorted(requests, key=lambda r: r.arrival_time)
    first = pending[0].arrival_time
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    limits = httpx.Limits(
        max_connections=options.max_connections,
        max_keepalive_connections=options.max_connections,
    )
    timeout = httpx.Timeout(options.timeout_s, connect=min(options.timeout_s, 10.0), pool=None)
    path = "/v1/chat/completions" if options.api == "chat" else "/v1/completions"
    prompt_format = options.resolved_prompt_format
    async with httpx.AsyncClient(
        base_url=options.base_url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        model = options.model or await _first_model(client, options.base_url)
        omit = await _probe(client, options, path, pending[0], model)
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
        states = [RequestState(_shifted(r, first)) for r in pending]
        cached_reported = [False] * len(states)
        failures: list[tuple[int, str, str]] = []
        wall_start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - wall_start

        async def send(index: int) -> None:
            state = states[index]
            try:
                streamed = await _stream(client, path, bodies[index], clock)
                cached_reported[index] = _fill_served(state, streamed)
            except _RequestFailed as err:
                failures.append((index, err.kind, str(err)))
                _fill_failed(state, str(err), clock())

        async with anyio.create_task_group() as tg:
            for index, state in enumerate(states):
                delay = state.arrival_time - clock()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(send, index)
        wall_s = clock()
    failures.sort()
    if len(failures) == len(states):
        raise EndpointError(
            f"all {len(states)} requests to {options.base_url}{path} failed; "
            f"the first: {failures[0][2]}"
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
        },
    )


def summarize_endpoint(result: EndpointResult, *, policy: str | None = None) -> RunReport:
    """The run's report (`summarize`), labelled with the model's name by default.

    Figures the client cannot know are None in JSON (`extra` overrides them): the
    server's preemptions, steps and leaked blocks, and the hit rate when the server
    reported no `cached_tokens`. `extra` adds `num_failed`, `failures` (by reason),
    `first_failure`, and where the requests went."""
    reported = [
        s
        for s, is_reported in zip(result.states, result.cached_reported, strict=True)
        if is_reported and s.finish_reason in _FINISH_REASONS.values()
    ]
    hit_tokens = sum(s.num_cached_tokens for s in reported)
    query_tokens = sum(s.num_prompt_tokens for s in reported)
    unknown: dict[str, Any] = dict.fromkeys(("num_preemptions", "num_leaked_blocks", "sim_steps"))
    if not reported:
        unknown["prefix_hit_rate"] = None
    report = summarize(
        result.states,
        policy=result.model if policy is None else policy,
        num_preemptions=0,
        prefix_hit_tokens=hit_tokens,
        prefix_query_tokens=query_tokens,
        sim_steps=0,
        num_leaked_blocks=0,
        wall_s=result.wall_s,
        extra={
            **unknown,
            **result.extra,
            "num_failed": result.num_failed,
            "failures": dict(result.failures),
            "first_failure": result.first_failure,
        },
    )
    if reported:
        return report
    tenants = report.to_json()["per_tenant"]
    for figures in tenants.values():
        figures["prefix_hit_rate"] = None
    return dataclasses.replace(report, extra={**report.extra, "per_tenant": tenants})


# -- one request --------------------------------------------------------------------------


async def _stream(client: Any, path: str, body: dict[str, Any], clock: Any) -> _Streamed:
    """Send one request and read its event stream to the end."""
    import httpx

    streamed = _Streamed()
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                raise _RequestFailed(
                    f"HTTP {response.status_code}",
                    f"HTTP {response.status_code}: {_error_message(text)}",
                )
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    streamed.done = True
                    break
                _on_chunk(streamed, data, clock())
    except httpx.HTTPError as err:
        kind = type(err).__name__
        raise _RequestFailed(kind, f"{kind}: {err or 'no detail'}") from None
    if not streamed.done:
        raise _RequestFailed("stream dropped", "stream dropped: it ended without data: [DONE]")
    if not streamed.token_times:
        raise _RequestFailed(
            "no tokens", f"no tokens streamed (finish_reason {streamed.finish_reason!r})"
        )
    if streamed.finish_reason not in _FINISH_REASONS:
        reason = streamed.finish_reason
        raise _RequestFailed(f"finish_reason {reason}", f"finish_reason {reason!r}")
    return streamed


def _on_chunk(streamed: _Streamed, data: str, now: float) -> None:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise _RequestFailed("bad chunk", f"bad chunk (not JSON): {data[:100]!r}") from None
    if not isinstance(chunk, dict):
        raise _RequestFailed("bad chunk", f"bad chunk (not an object): {data[:100]!r}")
    if "error" in chunk:
        raise _RequestFailed("error in stream", f"error in stream: {_error_message(data)}")
    if chunk.get("usage"):
        streamed.usage = chunk["usage"]
    for choice in chunk.get("choices") or ():
        num_tokens = _num_tokens(choice)
        if num_tokens:
            times = streamed.token_times
            previous = times[-1] if times else now
            step = (now - previous) / num_tokens
            times.extend(now - step * (num_tokens - 1 - i) for i in range(num_tokens))
        if choice.get("finish_reason"):
            streamed.finish_reason = choice["finish_reason"]


def _num_tokens(choice: dict[str, Any]) -> int:
    """Tokens in a streamed choice: its `token_ids` when it has them, else one if it has
    text (completions) or content (chat, reasoning included)."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    if choice.get("text"):
        return 1
    delta = choice.get("delta") or {}
    return 1 if delta.get("content") or delta.get("reasoning_content") else 0


def _error_message(text: str) -> str:
    """The message of an OpenAI-style error body, else the text, shortened."""
    try:
        doc = json.loads(text)
        error = doc.get("error", doc) if isinstance(doc, dict) else doc
        message = error.get("message") if isinstance(error, dict) else None
        if message is None and isinstance(doc, dict):
            message = doc.get("detail") or doc.get("message")
        if message is not None:
            text = str(message)
    except json.JSONDecodeError:
        pass
    text = " ".join(text.split())
    return text[:_MAX_ERROR_CHARS] + ("..." if len(text) > _MAX_ERROR_CHARS else "")


async def _probe(
    client: Any, options: EndpointOptions, path: str, sample: Request, model: str
) -> frozenset[str]:
    """Before the clock starts: one small request (a 1-token prompt, 1 output token, not
    streamed) that fails the run early on a bad model, key or URL, and finds which of
    `OPTIONAL_FIELDS` the server refuses (named in a 400 or 422): those are left out."""
    import httpx

    probe = Request("probe", sample.prompt_token_ids[:1], 1)
    where = f"{options.base_url}{path}"
    omit: set[str] = set()
    for _ in range(len(OPTIONAL_FIELDS) + 1):
        body = request_body(
            probe,
            model=model,
            api=options.api,
            prompt_format=options.resolved_prompt_format,
            vocab_size=options.vocab_size,
            omit=frozenset(omit),
        )
        body["stream"] = False
        del body["stream_options"]
        try:
            response = await client.post(path, json=body)
        except httpx.HTTPError as err:
            raise EndpointError(
                f"cannot reach {where}: {type(err).__name__}: {err or 'no detail'}"
            ) from None
        if response.status_code == 200:
            return frozenset(omit)
        message = _error_message(response.text)
        refused = {name for name in OPTIONAL_FIELDS if name not in omit and name in message}
        if response.status_code not in (400, 422) or not refused:
            raise EndpointError(f"POST {where} answered HTTP {response.status_code}: {message}")
        omit |= refused
    raise EndpointError(f"POST {where} refused every request body tried")  # pragma: no cover


async def _first_model(client: Any, base_url: str) -> str:
    """The first model id of `GET /v1/models`."""
    import httpx

    where = f"{base_url}/v1/models"
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as err:
        raise EndpointError(
            f"cannot reach {where}: {type(err).__name__}: {err or 'no detail'}"
        ) from None
    if response.status_code != 200:
        raise EndpointError(
            f"GET {where} answered HTTP {response.status_code}: {_error_message(response.text)} "
            "(name the model with --model)"
        )
    try:
        data = response.json()["data"]
        return str(data[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise EndpointError(
            f"GET {where} listed no model id: {response.text[:200]!r} (name it with --model)"
        ) from None


# -- states ---------------------------------------------------------------------------------


def _shifted(request: Request, first: float) -> Request:
    """`request` on the replay's clock, where the first arrival is 0."""
    deadline = None if request.deadline is None else request.deadline - first
    arrival = request.arrival_time - first
    return dataclasses.replace(request, arrival_time=arrival, deadline=deadline)


def _fill_served(state: RequestState, streamed: _Streamed) -> bool:
    """Record a served request in `state`; whether the server reported `cached_tokens`."""
    usage = streamed.usage or {}
    num_output = _count(usage.get("completion_tokens"), len(streamed.token_times))
    num_prompt = _count(usage.get("prompt_tokens"), state.num_prompt_tokens)
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    state.num_prompt_tokens = num_prompt
    state.token_ids = array("I", [0]) * (num_prompt + num_output)
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
