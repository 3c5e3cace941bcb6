"""The data contract between the scheduler and a runner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvflow.request import Request, RequestState, TokenLogprobs


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the scheduler must know of the model a runner runs (`ModelRunner.model_info`):
    which requests it can serve and which tokens end generation. None and () mean not
    known or none (the simulated runner: any token id, any length, no EOS).

    Args:
        vocab_size: prompt token ids must be below it.
        max_position_embeddings: a request's prompt plus `max_new_tokens` must fit in it.
        eos_token_ids: end-of-sequence tokens: they finish a request with reason `stop`
            unless its sampling parameters say `ignore_eos`.
    """

    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def rejection(self, request: Request) -> str | None:
        """Why the model cannot serve `request` (naming the field and the value), or
        None."""
        prompt = request.prompt_array
        if self.vocab_size is not None and max(prompt) >= self.vocab_size:
            i, bad = next((i, t) for i, t in enumerate(prompt) if t >= self.vocab_size)
            return (
                f"prompt_token_ids[{i}] = {bad} is outside the model's vocabulary "
                f"(vocab_size {self.vocab_size})"
            )
        max_len = self.max_position_embeddings
        total = len(prompt) + request.max_new_tokens
        if max_len is not None and total > max_len:
            return (
                f"prompt_token_ids ({len(prompt)} tokens) + max_new_tokens "
                f"({request.max_new_tokens}) = {total} exceeds the model's "
                f"max_position_embeddings ({max_len})"
            )
        return None


# Plans and results are made every step: plain slotted classes (a frozen dataclass
# pays for each field through object.__setattr__). Treat them as read-only.
@dataclass(slots=True)
class StepPlan:
    """One step's work, in running order.

    Request `i` computes `num_tokens[i]` tokens starting at position `start_positions[i]`
    (its tokens are `requests[i].token_ids[start : start + n]`, its KV goes to
    `requests[i].block_ids`). It samples a token when `start + n` reaches the end of its
    known tokens (see `samples`).
    """

    step_id: int
    now: float
    requests: list[RequestState]
    num_tokens: list[int]
    start_positions: list[int]
    num_prefill_tokens: int
    """Tokens of entries computing more than one token (prefill chunks, recompute)."""
    num_decode_tokens: int
    """Entries computing exactly one token."""
    num_kv_tokens: int
    """Context attended, summed over entries: start + n per entry."""
    preempted_ids: list[str] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    """Each entry's device block ids as the plan made them (the request's own list:
    later plans only append to it). Runners read these, not `request.block_ids`, which
    an abort or preemption may rebind while the step runs."""

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.requests

    def block_table(self, index: int) -> list[int]:
        """Entry `index`'s device block ids (from `block_tables`; a hand-built plan
        without them falls back to the request's current ones)."""
        if self.block_tables:
            return self.block_tables[index]
        return self.requests[index].block_ids

    def samples(self, index: int) -> bool:
        """Whether entry `index` produces a token this step (valid until commit)."""
        req = self.requests[index]
        return self.start_positions[index] + self.num_tokens[index] == len(req.token_ids)


@dataclass(slots=True)
class StepResult:
    """What a runner returns for a plan.

    `sampled_token_ids[i]` is the token sampled for plan entry `i`, or None for an entry
    that does not sample (a prefill chunk short of the prompt's end).
    """

    sampled_token_ids: Sequence[int | None]
    duration_s: float = 0.0
    logprobs: Sequence[TokenLogprobs | None] | None = None
    """Per entry, the log-probabilities of a sampled token whose request asked for
    them; None (the whole list) when no entry asked."""
