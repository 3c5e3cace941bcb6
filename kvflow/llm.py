"""The offline API, in the shape users know from vLLM:

    llm = kvflow.LLM(model="path/to/llama", settings={"kv.device.num_blocks": 64})
    outputs = llm.generate([[1, 2, 3], [1, 2, 4]], max_new_tokens=16)

It runs the same `AsyncEngine` as online serving underneath, over a tiered store whose
device tier is the runner's KV cache, so prefix hits persist across `generate` calls.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio

from kvflow.config import KVFlowConfig
from kvflow.engine import AsyncEngine, RequestFailedError
from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.factory import build_runner, load_model, run_blocking
from kvflow.kv.store import KVStore
from kvflow.request import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    first_bad_token,
)


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    """One prompt's result, with timings in seconds."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    num_cached_tokens: int
    ttft_s: float | None
    e2e_s: float | None


class LLM:
    """A model behind kvflow's scheduler, for batch generation.

    Args:
        model: a checkpoint directory (`config.json` + `*.safetensors`), or a loaded
            `TorchLlama` (engine "torch") or transformers model (engine "hf").
        engine: "torch" (kvflow's paged-attention runner) or "hf" (transformers).
        settings: dotted config keys, as `kvflow replay --set` takes them.
        policy: scheduling policy name.
        dtype: compute dtype for a model loaded from a directory (e.g. "float64").
        seed: default sampling seed.
        overlap: plan each step while the previous one runs (see `AsyncEngine`).
    """

    def __init__(
        self,
        model: str | Path | Any,
        *,
        engine: Literal["torch", "hf"] = "torch",
        settings: Mapping[str, Any] | None = None,
        policy: str = "fcfs",
        dtype: str | None = None,
        seed: int = 0,
        overlap: bool = True,
    ) -> None:
        self.policy = policy
        self.overlap = overlap
        self.num_overlapped_steps = 0
        """Steps planned while the previous one ran, over all `generate` calls."""
        self.num_preemptions = 0
        """Requests preempted, over all `generate` calls."""
        self._ids = itertools.count()
        built = build_runner(load_model(model, engine, dtype), settings, seed=seed)
        self.config: KVFlowConfig = built.config
        self.store: KVStore = built.store
        self.runner: ModelRunner = built.runner

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
    ) -> list[list[int]]:
        """Output token ids per prompt, in prompt order. Generation stops after
        `max_new_tokens`, or at a stop token or one of the model's end-of-sequence tokens
        (kept as the last output token), unless `ignore_eos` (see `SamplingParams`).

        Raises:
            ValueError: a bad argument or a prompt the model or the configuration cannot
                serve (an empty one, a token id outside the vocabulary, more tokens than
                the model's positions or `scheduler.max_model_len`, more blocks than the
                device tier); the message names the argument (`prompt_token_ids[i]`)
                and quotes the value. Nothing is generated then.
            RequestFailedError: the runner raised while executing a step (the error is
                its `__cause__`).
        """
        outs = self.generate_outputs(
            prompt_token_ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop_token_ids,
            ignore_eos,
        )
        return [o.token_ids for o in outs]

    def generate_outputs(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
    ) -> list[CompletionOutput]:
        """Like `generate`, with finish reasons, cache hits and timings."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        sampling = SamplingParams(
            temperature, top_k, top_p, seed, stop_token_ids, ignore_eos=ignore_eos
        )
        requests = [
            Request(
                f"llm-{next(self._ids)}", self._checked(i, p), max_new_tokens, sampling=sampling
            )
            for i, p in enumerate(prompt_token_ids)
        ]
        outputs: list[CompletionOutput] = run_blocking(self._serve, requests)
        return outputs

    def _checked(self, index: int, prompt: Sequence[int]) -> tuple[int, ...]:
        """`prompt` as a tuple, or a ValueError naming `prompt_token_ids[index]`."""
        tokens = tuple(prompt)
        if not tokens:
            raise ValueError(f"prompt_token_ids[{index}] is empty")
        vocab_size = self.runner.model_info.vocab_size or 2**32
        try:  # packing checks types and range at C speed; the slow walk only names a bad one
            fits = max(array("I", tokens)) < vocab_size
        except (OverflowError, TypeError):
            fits = False
        bad = None if fits else first_bad_token(tokens, vocab_size)
        if bad is not None:
            raise ValueError(
                f"prompt_token_ids[{index}][{bad[0]}] = {bad[1]!r} is not a token id of the "
                f"model's vocabulary (an int in [0, {vocab_size}))"
            )
        return tokens

    async def _serve(self, requests: list[Request]) -> list[CompletionOutput]:
        results: dict[str, CompletionOutput | RequestFailedError] = {}
        engine = AsyncEngine(
            self.config, self.runner, self.policy, self.store, overlap=self.overlap
        )
        # Refuse the whole call before anything runs: a rejected prompt has no output.
        for i, req in enumerate(requests):
            reason = engine.scheduler.rejection(req)
            if reason is not None:
                raise ValueError(f"prompt_token_ids[{i}]: {reason}")
        async with engine, anyio.create_task_group() as tg:
            for req in requests:
                tg.start_soon(self._collect, engine, req, results)
        self.num_overlapped_steps += engine.num_overlapped_steps
        self.num_preemptions += engine.scheduler.stats.num_preemptions
        outputs = []
        for req in requests:
            result = results[req.request_id]
            if isinstance(result, RequestFailedError):
                raise result
            outputs.append(result)
        return outputs

    @staticmethod
    async def _collect(
        engine: AsyncEngine,
        request: Request,
        results: dict[str, CompletionOutput | RequestFailedError],
    ) -> None:
        tokens: list[int] = []
        last: RequestOutput | None = None
        try:
            async for out in engine.generate(request):
                tokens.extend(out.new_token_ids)
                last = out
        except RequestFailedError as err:  # raised once every prompt has ended
            results[request.request_id] = err
            return
        assert last is not None  # a stream always ends with a final output
        results[request.request_id] = CompletionOutput(
            request_id=request.request_id,
            token_ids=tokens,
            finish_reason=last.finish_reason,
            num_cached_tokens=last.num_cached_tokens,
            ttft_s=last.ttft_s,
            e2e_s=last.e2e_s,
        )

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LLM", "CompletionOutput"]
