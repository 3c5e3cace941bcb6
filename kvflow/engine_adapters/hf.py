"""`HFRunner`: any installed transformers causal LM, scheduled by kvflow.

The compatibility path: slow but simple and exact. Each step runs the model once per
plan entry. Before the call, the entry's earlier KV is gathered from its paged blocks
in kvflow's cache tensor into a transformers `DynamicCache`; after it, the new tokens'
KV is copied from that cache back into the entry's blocks. The cache tensor has the
torch runner's layout, `[num_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim]`, with keys stored after rotary embedding as transformers stores them, so the
tiered store moves blocks of either runner alike.

Models whose caches are not one key and one value tensor per layer (sliding-window
caches that drop old tokens, state-space layers, ...) are out of scope.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.eos import hf_eos_token_ids
from kvflow.engine_adapters.torch.attention import kv_cache_shape, resolve_kv_cache
from kvflow.engine_adapters.torch.sampling import Sampler
from kvflow.engine_adapters.torch.spec import DTYPES, LlamaSpec, default_device, default_dtype
from kvflow.engine_adapters.torch.step import live_entries, step_result
from kvflow.request import TokenLogprobs
from kvflow.scheduler.plan import ModelInfo, StepPlan, StepResult


def load_hf_model(
    model_dir: str | Path, dtype: str | None = None, device: torch.device | None = None
) -> Any:
    """`AutoModelForCausalLM.from_pretrained(model_dir)` in `dtype` (default bfloat16 on
    CUDA, float32 on CPU) on `device` (default CUDA when available), in eval mode."""
    from transformers import AutoModelForCausalLM

    dev = device if device is not None else default_device()
    name = dtype or default_dtype(dev)
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {', '.join(DTYPES)}")
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[name])
    return model.to(dev).eval()


def save_random_hf_llama(
    spec: LlamaSpec, model_dir: str | Path, seed: int = 0, init_std: float = 0.02
) -> Any:
    """Build a randomly initialised transformers `LlamaForCausalLM` of shape `spec`
    (weights N(0, init_std²), drawn from `seed` without touching torch's global RNG),
    in `spec.dtype` on the CPU, and `save_pretrained` it to `model_dir`.

    For tests and benchmarks: no weights are downloaded. It has no BOS/EOS tokens, so
    `generate` (and kvflow) stop only at `max_new_tokens`. Returns the model, in eval
    mode.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        # transformers 5 turns the legacy key into rope_parameters; 4.x reads it as is.
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": init_std,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": 0,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(LlamaConfig(**settings))
    model = model.to(spec.torch_dtype).eval()
    model.save_pretrained(str(model_dir))
    return model


def hf_kv_dims(model: Any) -> tuple[int, int, int]:
    """`(num_layers, num_kv_heads, head_dim)` of a transformers model's KV, from its text
    config."""
    config = model.config.get_text_config()
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    return int(config.num_hidden_layers), num_kv_heads, head_dim


def _layer_kv(cache: Any, layer: int) -> tuple[Tensor, Tensor]:
    """Keys and values [batch, kv_heads, seq, head_dim] of one layer of a DynamicCache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56
        return layers[layer].keys, layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


class HFRunner(ModelRunner):
    """Runs plans with a transformers causal LM, one model call per plan entry.

    Args:
        model: a loaded `PreTrainedModel` (e.g. `AutoModelForCausalLM.from_pretrained(...)`)
            or a checkpoint directory to load with `load_hf_model`.
        block_size: tokens per KV block; must equal the scheduler's `kv.block_size`.
        num_blocks: blocks to allocate when `kv_cache` is not given.
        kv_cache: an existing cache of the layout above in the model's dtype and device.
        seed: seeds the generator of requests that sample without their own seed.

    Raises:
        ValueError: neither or both of `num_blocks` and `kv_cache`, or a cache that does
            not fit the model.
    """

    name = "hf"
    supports_overlap = True
    supports_logprobs = True

    def __init__(
        self,
        model: Any,
        block_size: int,
        num_blocks: int | None = None,
        kv_cache: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(model, str | Path):
            model = load_hf_model(model)
        self.model = model
        self.num_layers, num_kv_heads, head_dim = hf_kv_dims(model)
        self.block_size = block_size
        param = next(model.parameters())
        self.device: torch.device = param.device
        self.dtype: torch.dtype = param.dtype
        self.kv_cache = resolve_kv_cache(
            num_blocks,
            kv_cache,
            lambda n: kv_cache_shape(n, self.num_layers, block_size, num_kv_heads, head_dim),
            self.dtype,
            self.device,
        )
        self.sampler = Sampler(self.device, seed)
        config = model.config.get_text_config()
        positions = getattr(config, "max_position_embeddings", None)
        self.model_info = ModelInfo(
            int(config.vocab_size),
            int(positions) if positions is not None else None,
            hf_eos_token_ids(model),
        )

    def execute(self, plan: StepPlan) -> StepResult:
        """Run each entry through the model in turn, then sample; the duration is wall
        time (with the CUDA stream synchronised)."""
        began = time.perf_counter()
        rows: list[Tensor] = []
        sampling: list[int] = []
        with torch.inference_mode():
            for i, req, start, end in live_entries(plan):
                logits = self._run_entry(
                    req.token_ids[start:end].tolist(), start, plan.block_table(i)
                )
                if end == len(req.token_ids):
                    rows.append(logits)
                    sampling.append(i)
            tokens: list[int] = []
            logprobs: list[TokenLogprobs | None] | None = None
            if rows:
                stacked = torch.stack(rows)
                requests = [plan.requests[i] for i in sampling]
                tokens = self.sampler.sample(stacked, requests)
                logprobs = self.sampler.logprobs(stacked, requests, tokens)
        return step_result(plan, sampling, tokens, self.device, began, logprobs)

    def _run_entry(self, token_ids: list[int], start: int, block_ids: list[int]) -> Tensor:
        """Compute one entry's tokens; returns the last token's logits [vocab_size]."""
        from transformers import DynamicCache

        bs = self.block_size
        n = len(token_ids)
        end = start + n
        num_blocks = -(-end // bs)
        if len(block_ids) < num_blocks:
            raise ValueError(f"{len(block_ids)} blocks cannot hold positions 0..{end - 1}")
        blocks = torch.tensor(block_ids[:num_blocks], dtype=torch.long, device=self.device)
        cache = DynamicCache()
        if start > 0:
            # [blocks, layers, 2, bs, kv_heads, d] -> [layers, 2, 1, kv_heads, start, d]
            past = self.kv_cache[blocks[: -(-start // bs)]]
            past = past.permute(1, 2, 4, 0, 3, 5).flatten(3, 4)[..., :start, :].unsqueeze(2)
            for layer in range(self.num_layers):
                cache.update(past[layer, 0], past[layer, 1], layer)
        positions = torch.arange(start, end, device=self.device)
        out = self.model(
            input_ids=torch.tensor([token_ids], dtype=torch.long, device=self.device),
            position_ids=positions[None, :],
            cache_position=positions,
            past_key_values=cache,
            use_cache=True,
        )
        slot_blocks = blocks[positions // bs]
        slot_offsets = positions % bs
        for layer in range(self.num_layers):
            keys, values = _layer_kv(cache, layer)
            # [1, kv_heads, end, d] -> the new rows [n, kv_heads, d]
            self.kv_cache[slot_blocks, layer, 0, slot_offsets] = keys[0, :, start:].transpose(0, 1)
            self.kv_cache[slot_blocks, layer, 1, slot_offsets] = values[0, :, start:].transpose(
                0, 1
            )
        logits: Tensor = out.logits[0, -1]
        return logits
