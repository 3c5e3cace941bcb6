"""`TorchRunner`: executes the scheduler's plans with `TorchLlama` over a paged KV cache."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.torch.attention import resolve_kv_cache
from kvflow.engine_adapters.torch.batch import BatchEntry, build_batch
from kvflow.engine_adapters.torch.model import TorchLlama
from kvflow.engine_adapters.torch.sampling import Sampler
from kvflow.engine_adapters.torch.step import live_entries, step_result
from kvflow.scheduler.plan import ModelInfo, StepPlan, StepResult


class TorchRunner(ModelRunner):
    """Runs each plan as one forward pass of a `TorchLlama` over a paged KV cache.

    Every step reads everything it needs from the plan (tokens, start positions, block
    ids), so preemption (blocks dropped, `num_computed_tokens` back to 0), recompute
    into other blocks, and aborts need nothing from the runner. An entry whose request
    finished (was aborted) between plan and execute is skipped and samples None.

    Args:
        model: the model, or a Hugging Face checkpoint directory to load it from.
        block_size: tokens per KV block; must equal the scheduler's `kv.block_size`.
        num_blocks: blocks to allocate when `kv_cache` is not given (the scheduler's
            `kv.device.num_blocks`).
        kv_cache: an existing cache of layout `[num_blocks, num_layers, 2, block_size,
            num_kv_heads, head_dim]` in the model's dtype and device (e.g. the device
            tier's tensor). Its contents must be finite: padded rows are read, masked.
        seed: seeds the generator of requests that sample without their own seed.

    Raises:
        ValueError: neither or both of `num_blocks` and `kv_cache`, or a cache that does
            not fit the model.
    """

    name = "torch"
    supports_overlap = True
    supports_logprobs = True

    def __init__(
        self,
        model: TorchLlama | str | Path,
        block_size: int,
        num_blocks: int | None = None,
        kv_cache: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model if isinstance(model, TorchLlama) else TorchLlama.from_pretrained(model)
        self.block_size = block_size
        self.kv_cache = resolve_kv_cache(
            num_blocks,
            kv_cache,
            lambda n: self.model.kv_cache_shape(n, block_size),
            self.model.spec.torch_dtype,
            self.model.device,
        )
        self.device = self.model.device
        self.sampler = Sampler(self.device, seed)
        spec = self.model.spec
        self.model_info = ModelInfo(
            spec.vocab_size, spec.max_position_embeddings, self.model.eos_token_ids
        )

    @classmethod
    def from_config(
        cls, model: TorchLlama | str | Path, config: KVFlowConfig, seed: int = 0
    ) -> TorchRunner:
        """A runner with a cache sized for `config.kv` (block size and device blocks)."""
        return cls(
            model, config.kv.block_size, num_blocks=config.kv.tier_blocks("device"), seed=seed
        )

    @property
    def num_blocks(self) -> int:
        """Blocks in the KV cache."""
        return int(self.kv_cache.shape[0])

    def execute(self, plan: StepPlan) -> StepResult:
        """One forward pass over every entry of the plan, then sampling; the duration is
        wall time (with the CUDA stream synchronised)."""
        began = time.perf_counter()
        entries: list[BatchEntry] = []
        sampling: list[int] = []
        for i, req, start, end in live_entries(plan):
            samples = end == len(req.token_ids)
            entries.append(
                BatchEntry(req.token_ids[start:end], start, plan.block_table(i), samples)
            )
            if samples:
                sampling.append(i)
        if not entries:
            return StepResult([None] * len(plan.requests), time.perf_counter() - began)
        with torch.inference_mode():
            batch = build_batch(entries, self.block_size, self.device)
            logits = self.model(batch, self.kv_cache)
            requests = [plan.requests[i] for i in sampling]
            tokens = self.sampler.sample(logits, requests)
            logprobs = self.sampler.logprobs(logits, requests, tokens)
        return step_result(plan, sampling, tokens, self.device, began, logprobs)
