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
from typing import TYPE_CHECKING, Any, Literal

import anyio

from kvflow.config import KVFlowConfig
from kvflow.engine import AsyncEngine
from kvflow.engine_adapters.base import ModelRunner
from kvflow.kv.store import KVStore
from kvflow.request import FinishReason, Request, RequestOutput, SamplingParams

if TYPE_CHECKING:
    import torch

    from kvflow.engine_adapters.torch.model import TorchLlama


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    """One prompt's result, with timings in seconds."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    num_cached_tokens: int
    ttft_s: float | None
    e2e_s: float | None


_DTYPE_NAMES = {"torch.float16": "float16", "torch.bfloat16": "bfloat16",
                "torch.float32": "float32", "torch.float64": "float64"}  # fmt: skip


def _layout_of(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> dict[str, Any]:
    return {
        "kv.layout.num_layers": num_layers,
        "kv.layout.num_kv_heads": num_kv_heads,
        "kv.layout.head_dim": head_dim,
        "kv.layout.dtype": _DTYPE_NAMES[str(dtype)],
    }


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
    ) -> None:
        self.policy = policy
        self._ids = itertools.count()
        if engine == "torch":
            from kvflow.engine_adapters.torch.model import TorchLlama

            net: TorchLlama = (
                model if isinstance(model, TorchLlama) else TorchLlama.from_pretrained(model, dtype)
            )
            spec = net.spec
            layout = _layout_of(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.torch_dtype)
            device = net.device
        elif engine == "hf":
            from kvflow.engine_adapters.hf import load_hf_model

            hf_net: Any = load_hf_model(model) if isinstance(model, str | Path) else model
            if dtype is not None:
                import torch

                hf_net = hf_net.to(getattr(torch, dtype))
            cfg = hf_net.config.get_text_config()
            heads = int(cfg.num_attention_heads)
            kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
            param = next(hf_net.parameters())
            layout = _layout_of(int(cfg.num_hidden_layers), kv_heads, head_dim, param.dtype)
            device = param.device
        else:
            raise ValueError(f"engine must be 'torch' or 'hf', got {engine!r}")
        self.config = KVFlowConfig.load(overrides={**layout, **dict(settings or {})})
        self.store = KVStore.with_tensors(self.config.kv, device=device)
        assert self.store.device_storage is not None  # with_tensors made it
        kv_cache = self.store.device_storage.data
        block_size = self.config.kv.block_size
        self.runner: ModelRunner
        if engine == "torch":
            from kvflow.engine_adapters.torch.runner import TorchRunner

            self.runner = TorchRunner(net, block_size, kv_cache=kv_cache, seed=seed)
        else:
            from kvflow.engine_adapters.hf import HFRunner

            self.runner = HFRunner(hf_net, block_size, kv_cache=kv_cache, seed=seed)

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
        outputs: list[CompletionOutput] = _run(self._serve, requests)
        return outputs

    async def _serve(self, requests: list[Request]) -> list[CompletionOutput]:
        results: dict[str, CompletionOutput] = {}
        engine = AsyncEngine(self.config, self.runner, self.policy, self.store)
        async with engine, anyio.create_task_group() as tg:
            for req in requests:
                tg.start_soon(self._collect, engine, req, results)
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


def _run(fn: Any, *args: Any) -> Any:
    """anyio.run on asyncio, with uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    return anyio.run(fn, *args, backend="asyncio", backend_options=options)


__all__ = ["LLM", "CompletionOutput"]
