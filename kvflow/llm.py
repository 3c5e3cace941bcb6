"""The offline API, in the shape users know from vLLM:

    llm = kvflow.LLM(model="path/to/llama", settings={"kv.device.num_blocks": 64})
    outputs = llm.generate([[1, 2, 3], [1, 2, 4]], max_new_tokens=16)

It runs the same `AsyncEngine` as online serving underneath, over a tiered store whose
device tier is the runner's KV cache, so prefix hits persist across `generate` calls.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio

from kvflow.config import KVFlowConfig
from kvflow.engine import AsyncEngine
from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.factory import build_runner, load_model, run_blocking
from kvflow.kv.store import KVStore
from kvflow.request import FinishReason, Request, RequestOutput, SamplingParams


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
    ) -> list[list[int]]:
        """Output token ids per prompt, in prompt order."""
        outs = self.generate_outputs(
            prompt_token_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids
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
    ) -> list[CompletionOutput]:
        """Like `generate`, with finish reasons, cache hits and timings."""
        sampling = SamplingParams(temperature, top_k, top_p, seed, tuple(stop_token_ids))
        requests = [
            Request(f"llm-{next(self._ids)}", tuple(p), max_new_tokens, sampling=sampling)
            for p in prompt_token_ids
        ]
        outputs: list[CompletionOutput] = run_blocking(self._serve, requests)
        return outputs

    async def _serve(self, requests: list[Request]) -> list[CompletionOutput]:
        results: dict[str, CompletionOutput] = {}
        engine = AsyncEngine(
            self.config, self.runner, self.policy, self.store, overlap=self.overlap
        )
        async with engine, anyio.create_task_group() as tg:
            for req in requests:
                tg.start_soon(self._collect, engine, req, results)
        self.num_overlapped_steps += engine.num_overlapped_steps
        self.num_preemptions += engine.scheduler.stats.num_preemptions
        return [results[r.request_id] for r in requests]

    @staticmethod
    async def _collect(
        engine: AsyncEngine, request: Request, results: dict[str, CompletionOutput]
    ) -> None:
        tokens: list[int] = []
        last: RequestOutput | None = None
        async for out in engine.generate(request):
            tokens.extend(out.new_token_ids)
            last = out
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
