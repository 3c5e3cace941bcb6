"""The request bodies of OpenAI's completions and chat completions APIs, as kvflow takes
them, and the response objects it sends back.

Fields OpenAI defines and kvflow cannot honour are either absent (an unknown field is a
400 that names it) or limited to the value that means "off" (`n` = 1, `echo` false).
kvflow's own fields (`priority`, `tenant`, SLOs, `deadline_s`) ride along as extra
body fields, as vLLM takes `priority`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class StreamOptions(_Body):
    include_usage: bool = False
    """Send a last chunk with the request's usage (and `usage: null` in the others)."""
    continuous_usage_stats: bool = False
    """Accepted for vLLM clients; kvflow reports usage only in the last chunk."""


class KeepKV(_Body):
    """Asked of a prefill instance: keep this prompt's KV for a decode instance."""

    keep: Literal[True]


class HandoffInfo(_Body):
    """A prefill instance's ticket for a prompt's KV (`kvflow.peer.handoff.HandoffTicket`),
    in its response and in the request a decode instance then serves."""

    peer: str = Field(min_length=3)
    """The prefill instance's peer service, `host:port`."""
    peer_id: str = Field(min_length=1)
    fingerprint: str = Field(pattern=r"^[0-9a-f]+$")
    """The model fingerprint, hex."""
    seq: int = Field(ge=0)
    """The prefill instance's block-event number that lists the kept blocks."""
    block_keys: list[int] = Field(max_length=1 << 20)
    """Keys of the prompt's leading full blocks kept there (u64)."""
    block_size: int = Field(ge=1)
    num_tokens: int = Field(ge=0)
    """Prompt tokens the kept blocks hold."""

    @field_validator("block_keys")
    @classmethod
    def _u64(cls, keys: list[int]) -> list[int]:
        bad = next((k for k in keys if not 0 <= k < 1 << 64), None)
        if bad is not None:
            raise ValueError(f"a block key is a u64, got {bad!r}")
        return keys


NULL_IS_DEFAULT = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "n",
        "stream",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "echo",
        "logprobs",
    }
)
"""Fields OpenAI's schema (or vLLM's) makes nullable whose default here is not None: a
null is taken as the default, as they take it."""


class GenerationFields(_Body):
    """What both endpoints take: sampling, stopping, streaming, and kvflow's fields."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: object) -> object:
        if isinstance(data, dict) and any(data.get(k, 0) is None for k in NULL_IS_DEFAULT):
            return {k: v for k, v in data.items() if v is not None or k not in NULL_IS_DEFAULT}
        return data

    model: str
    """The served model name (`GET /v1/models`)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (default: 16 for completions, the rest of the context
    for chat)."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    """0 is greedy."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=-1)
    """0 or -1: no top-k filter (vLLM uses -1)."""
    seed: int | None = None
    """Seeds this request's draws: the same seed gives the same tokens."""
    stop: str | list[str] | None = None
    """The output ends before the first of these strings (which is not returned)."""
    stop_token_ids: list[int] | None = None
    """Token ids that end the output (included in it, as vLLM does)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence token."""
    n: int = 1
    """Completions per prompt; kvflow serves exactly 1."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    """Only with `stream` (a 400 otherwise, as OpenAI and vLLM answer)."""
    # Fields kvflow takes only at the value that turns them off (see NEUTRAL_VALUES), so
    # clients that always send them (vLLM's benchmark client, ...) work as they are.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    """Accepted and ignored (OpenAI's end-user id); `tenant` is kvflow's grouping."""
    # -- kvflow's own fields -----------------------------------------------------------
    priority: int = 0
    """Lower is more important (as in vLLM); the `priority` policy orders by it."""
    tenant: str = Field(default="default", min_length=1)
    """Who sent the request: the `fair` policy shares the instance between tenants."""
    ttft_slo_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Time-to-first-token objective in ms (the `edf` policy's deadline)."""
    tpot_slo_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Time-per-output-token objective in ms."""
    deadline_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds after arrival the first token is due (overrides `ttft_slo_ms` for `edf`)."""
    kvflow_handoff: KeepKV | HandoffInfo | None = None
    """Prefill/decode handoff (docs/fleet.md): `{"keep": true}` asks a prefill instance
    to keep the prompt's KV and answer with a ticket (non-streaming, one prompt); a
    ticket asks a decode instance to pull the KV from there instead of recomputing it."""

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, value: list[int] | None) -> list[int] | None:
        bad = next((i for i, t in enumerate(value or ()) if t < 0), None)
        if value is not None and bad is not None:
            raise ValueError(f"token ids are ints >= 0, got {value[bad]!r} at index {bad}")
        return value

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


NEUTRAL_VALUES: dict[str, tuple[object, ...]] = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "min_tokens": (0,),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
}
"""Fields taken only at these values (anything else is a 400 naming the field)."""


class CompletionRequest(GenerationFields):
    """`POST /v1/completions`."""

    prompt: str | list[int] | list[str] | list[list[int]]
    """Text, or token ids; or a batch: a list of either, one choice per prompt."""
    echo: bool = False
    """Only false is served."""
    logprobs: int | None = Field(default=None, ge=0, le=20)
    """Log-probabilities of this many most likely tokens per position."""


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: the template's business

    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for `max_tokens`; wins when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    """Open an assistant turn after the messages (the chat template's flag)."""


# -- responses -------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvflow"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


__all__ = [
    "NEUTRAL_VALUES",
    "NULL_IS_DEFAULT",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ErrorInfo",
    "ErrorResponse",
    "GenerationFields",
    "HandoffInfo",
    "KeepKV",
    "ModelCard",
    "ModelList",
    "PromptTokensDetails",
    "StreamOptions",
    "Usage",
]
