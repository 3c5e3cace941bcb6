"""Requests as users submit them, and the state the scheduler keeps for each.

`Request` is the immutable description of one generation request (what a trace line
or an API call says). `RequestState` is the scheduler's mutable record of that request:
its tokens so far, its device blocks, its timestamps. Policies see `RequestState`s.
"""

from __future__ import annotations

import enum
import math
import operator
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import SupportsIndex


class RequestStatus(enum.IntEnum):
    """Where a request is in its life. Only the scheduler changes it."""

    WAITING = 0
    """Queued, holding no blocks."""
    WAITING_FOR_KV = 1
    """Admitted but waiting for cached blocks to arrive from a lower tier or a peer."""
    RUNNING = 2
    """Holds device blocks and is scheduled every step until it finishes."""
    PREEMPTED = 3
    """Was running, lost its blocks, queued again at the front."""
    FINISHED = 4
    """Done; `RequestState.finish_reason` says why."""


class FinishReason(enum.StrEnum):
    LENGTH = "length"
    """Generated `max_new_tokens` tokens."""
    STOP = "stop"
    """Sampled a stop token."""
    ABORTED = "aborted"
    """Aborted by the caller (or its consumer went away)."""
    REJECTED = "rejected"
    """Could never be served under the configuration or by the model (a token outside
    its vocabulary, more tokens than its positions); `finish_detail` says why."""
    ERROR = "error"
    """The runner raised while executing a step of the request; `finish_detail` quotes
    the error (`AsyncEngine.generate` raises `RequestFailedError` instead of yielding
    this output)."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def first_bad_token(token_ids: Iterable[object], limit: int) -> tuple[int, object] | None:
    """`(index, value)` of the first entry that is not an int in `[0, limit)`, or None."""
    if isinstance(token_ids, list | tuple):
        try:  # packing checks types and range at C speed; the walk below names a bad one
            if not token_ids or max(array("I", token_ids)) < limit:
                return None
        except (OverflowError, TypeError):
            pass
    for i, token in enumerate(token_ids):
        if isinstance(token, SupportsIndex) and 0 <= operator.index(token) < limit:
            continue
        return i, token
    return None


@dataclass(frozen=True, slots=True)
class SLO:
    """Service-level objectives of one request, in milliseconds (None: no objective)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            _check(
                value is None or (math.isfinite(value) and value > 0),
                f"SLO.{name} must be a positive number of milliseconds, got {value!r}",
            )


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How a runner picks tokens and when generation stops (names as in vLLM).

    Generation stops after `max_new_tokens` (finish reason `length`), or at a token of
    `stop_token_ids` or one of the model's end-of-sequence tokens (reason `stop`; the
    token is the last output token). The length check comes first, as in vLLM.
    Simulated runners have no end-of-sequence token and ignore everything else.

    Args:
        temperature: 0 is greedy.
        top_k: 0 keeps every token (-1, vLLM's other spelling, is taken as 0).
        top_p: nucleus sampling's mass, in (0, 1].
        seed: per-request sampling seed; None uses the runner's.
        stop_token_ids: tokens that end generation besides the model's EOS tokens
            (any sequence; kept as a tuple).
        ignore_eos: keep generating past the model's EOS tokens (benchmarks and trace
            replay use it, so outputs keep their lengths); `stop_token_ids` still stop.
        max_tokens: most output tokens, for `kvflow.LLM` (default 16; an engine
            `Request` carries `max_new_tokens` itself).
        stop: text output ends before the first of these strings (`kvflow.LLM` and
            `kvflow serve` cut the text; the engine works on tokens).
        logprobs: return each output token's log-probability and this many most likely
            tokens' (0: the sampled token's only), from the model's raw distribution
            (before temperature, top-k and top-p, as vLLM's default); None returns none.
            Only runners with `supports_logprobs` compute them.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        temperature, top_k, top_p = self.temperature, self.top_k, self.top_p
        _check(
            _is_number(temperature) and math.isfinite(temperature) and temperature >= 0,
            f"temperature must be a finite number >= 0, got {temperature!r}",
        )
        _check(
            _is_int(top_k) and top_k >= -1,
            f"top_k must be an int >= 0 (or -1, vLLM's no-filter), got {top_k!r}",
        )
        object.__setattr__(self, "top_k", max(top_k, 0))
        _check(_is_number(top_p) and 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p!r}")
        _check(
            self.seed is None or _is_int(self.seed),
            f"seed must be an int or None, got {self.seed!r}",
        )
        stops = tuple(self.stop_token_ids or ())
        bad = [t for t in stops if isinstance(t, bool) or not isinstance(t, int) or t < 0]
        _check(not bad, f"stop_token_ids must be token ids (ints >= 0), got {bad[:1]!r}")
        object.__setattr__(self, "stop_token_ids", stops)
        _check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            f"max_tokens must be an int >= 1, got {self.max_tokens!r}",
        )
        stop_strings = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _check(all(stop_strings), f"stop strings must not be empty, got {stop_strings!r}")
        object.__setattr__(self, "stop", stop_strings)
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
            f"logprobs must be None or an int >= 0, got {self.logprobs!r}",
        )


@dataclass(frozen=True, slots=True)
class Request:
    """One generation request.

    Args:
        request_id: unique within a scheduler.
        prompt_token_ids: the prompt, as token ids (non-negative ints below 2**32).
        max_new_tokens: generation stops after this many output tokens.
        arrival_time: seconds, on the clock the scheduler is driven with.
        priority: lower is more important (as in vLLM); used by the `priority` policy.
        tenant: who sent it; used by the `fair` policy and per-tenant metrics.
        slo: TTFT/TPOT objectives, used by `edf` and goodput metrics.
        deadline: absolute time the first token is due; defaults to arrival + TTFT SLO.
        extra_keys: folded into every block key (model, adapter, ...), so requests with
            different extra keys never share cached blocks.
        sampling: sampling parameters for real runners.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    max_new_tokens: int
    arrival_time: float = 0.0
    priority: int = 0
    tenant: str = "default"
    slo: SLO = field(default_factory=SLO)
    deadline: float | None = None
    extra_keys: tuple[str, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt_array: array[int] = field(init=False, repr=False, compare=False)
    """The prompt packed as native uint32 (`array("I")`): what block hashing reads and
    what `RequestState.token_ids` starts as (copying it is a memcpy)."""

    def __post_init__(self) -> None:
        prompt = tuple(self.prompt_token_ids)
        object.__setattr__(self, "prompt_token_ids", prompt)
        object.__setattr__(self, "extra_keys", tuple(self.extra_keys))
        rid = self.request_id
        _check(len(prompt) > 0, f"request {rid!r}: prompt_token_ids is empty")
        _check(
            self.max_new_tokens >= 1,
            f"request {rid!r}: max_new_tokens must be >= 1, got {self.max_new_tokens!r}",
        )
        _check(
            math.isfinite(self.arrival_time) and self.arrival_time >= 0,
            f"request {rid!r}: arrival_time must be a finite number >= 0, "
            f"got {self.arrival_time!r}",
        )
        try:
            # Packing is also a C-speed range check (~10x faster than min() and max()).
            object.__setattr__(self, "prompt_array", array("I", prompt))
        except (OverflowError, TypeError):
            j, bad = first_bad_token(prompt, 2**32) or (-1, None)
            raise ValueError(
                f"request {rid!r}: prompt_token_ids[{j}] = {bad!r} is not a token id "
                "(an int in [0, 2**32))"
            ) from None

    @property
    def ttft_deadline(self) -> float | None:
        """When the first token is due: `deadline`, else arrival + TTFT SLO, else None."""
        if self.deadline is not None:
            return self.deadline
        if self.slo.ttft_ms is not None:
            return self.arrival_time + self.slo.ttft_ms / 1000.0
        return None


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities at one output position, of the model's raw distribution
    (log-softmax of its logits, before temperature, top-k and top-p)."""

    logprob: float
    """The sampled token's."""
    top: tuple[tuple[int, float], ...] = ()
    """`(token id, logprob)` of the most likely tokens, most likely first
    (`SamplingParams.logprobs` of them)."""


_NO_STOPS: frozenset[int] = frozenset()
_WAITING = RequestStatus.WAITING  # bound once: a member read goes through EnumType.__getattr__


def _with_headroom(prompt: array[int]) -> array[int]:
    """A copy of `prompt` with room to append ~1/16 of its length (as `array` grows):
    an exact copy (a slice) is reallocated, and moved whole, at the first output
    token; this one only when the outputs outgrow that room."""
    tokens = prompt[:1]
    tokens.frombytes(memoryview(prompt).cast("B")[tokens.itemsize :])
    return tokens


class RequestState:
    """The scheduler's record of one request. Read it; only the scheduler writes it.

    `token_ids` holds the prompt followed by the outputs so far, as a compact
    `array("I")` (a sequence of ints; `list(...)` it to compare with a list; the cyclic
    garbage collector never scans it). `num_computed_tokens`
    of them have KV in `block_ids` (device blocks, in order). `block_keys[i]` is the
    chained hash of full block i, filled as blocks fill.
    """

    __slots__ = (
        "arrival_time",
        "block_ids",
        "block_keys",
        "finish_detail",
        "finish_reason",
        "finish_time",
        "first_scheduled_time",
        "first_token_time",
        "kv_wait_s",
        "logprobs",
        "max_new_tokens",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_inflight_samples",
        "num_preemptions",
        "num_prompt_tokens",
        "num_sealed_blocks",
        "priority",
        "request",
        "request_id",
        "status",
        "stop_token_ids",
        "tenant",
        "token_ids",
        "token_times",
    )

    def __init__(self, request: Request, eos_token_ids: Iterable[int] = ()) -> None:
        """`eos_token_ids`: the model's end-of-sequence tokens; they stop the request
        too unless its sampling parameters say `ignore_eos`."""
        self.request = request
        self.request_id = request.request_id
        self.arrival_time = request.arrival_time
        self.priority = request.priority
        self.tenant = request.tenant
        self.max_new_tokens = request.max_new_tokens
        self.num_prompt_tokens = len(request.prompt_token_ids)
        sampling = request.sampling
        stops = sampling.stop_token_ids
        if eos_token_ids and not sampling.ignore_eos:
            stops = (*(stops or ()), *eos_token_ids)
        self.stop_token_ids = frozenset(stops) if stops else _NO_STOPS
        """Tokens that finish the request with reason `stop`: its `stop_token_ids` and,
        unless `ignore_eos`, the model's EOS tokens."""
        self.token_ids: array[int] = _with_headroom(request.prompt_array)
        self.num_computed_tokens = 0
        self.num_inflight_samples = 0
        """Tokens that planned but not yet committed steps will sample (0 or 1 unless
        steps are pipelined); `num_computed_tokens` already counts their positions."""
        self.num_cached_tokens = 0
        """Prompt tokens served from cache at the first admission."""
        self.block_ids: list[int] = []
        self.block_keys: list[int] = []
        self.num_sealed_blocks = 0
        """Leading blocks of `block_ids` registered in the prefix cache."""
        self.status = _WAITING
        self.finish_reason: FinishReason | None = None
        self.finish_detail = ""
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self.finish_time: float | None = None
        self.num_preemptions = 0
        self.kv_wait_s = 0.0
        """Seconds spent in WAITING_FOR_KV (loads from lower tiers or peers)."""
        self.logprobs: list[TokenLogprobs] | None = None if sampling.logprobs is None else []
        """One entry per output token when the request asked for log-probabilities."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :].tolist()

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """True while more than one token is left to compute (prompt or recompute)."""
        return len(self.token_ids) - self.num_computed_tokens > 1

    def __repr__(self) -> str:
        return (
            f"RequestState({self.request_id!r}, {self.status.name}, "
            f"computed={self.num_computed_tokens}/{len(self.token_ids)}, "
            f"blocks={len(self.block_ids)})"
        )


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What a caller receives as a request progresses (streamed by the async engine)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    num_output_tokens: int
    finished: bool
    finish_reason: FinishReason | None = None
    finish_detail: str = ""
    num_cached_tokens: int = 0
    ttft_s: float | None = None
    """Arrival to first token, once there is one."""
    e2e_s: float | None = None
    """Arrival to finish, once finished."""
    queue_s: float | None = None
    """Arrival to first scheduled, once scheduled."""
    logprobs: tuple[TokenLogprobs, ...] | None = None
    """One per new token, when the request asked for log-probabilities."""

    @classmethod
    def of(cls, state: RequestState, new_token_ids: Iterable[int]) -> RequestOutput:
        new = tuple(new_token_ids)
        lps = state.logprobs
        first = state.first_token_time
        done = state.finish_time
        scheduled = state.first_scheduled_time
        return cls(
            request_id=state.request_id,
            new_token_ids=new,
            num_output_tokens=state.num_output_tokens,
            finished=state.is_finished,
            finish_reason=state.finish_reason,
            finish_detail=state.finish_detail,
            num_cached_tokens=state.num_cached_tokens,
            ttft_s=None if first is None else first - state.arrival_time,
            e2e_s=None if done is None else done - state.arrival_time,
            queue_s=None if scheduled is None else scheduled - state.arrival_time,
            logprobs=None if lps is None else tuple(lps[len(lps) - len(new) :]),
        )
