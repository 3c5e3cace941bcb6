"""Build a real runner and the tiered store whose device tier is its KV cache.

`kvflow.LLM`, `kvflow replay --engine torch|hf` and `kvflow calibrate` share this: the
model's KV layout goes into `kv.layout.*`, the store allocates its tensors, and the
runner writes into the store's device tensor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

import anyio

from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.base import ModelRunner
from kvflow.kv.store import KVStore

if TYPE_CHECKING:
    import torch

EngineName = Literal["torch", "hf"]
ENGINES: tuple[EngineName, ...] = ("torch", "hf")


T = TypeVar("T")


class LoadedModel(NamedTuple):
    """A model ready to run, with what the scheduler and the store need to know of it."""

    engine: EngineName
    net: Any
    """A `TorchLlama` (engine "torch") or a transformers model (engine "hf")."""
    layout: dict[str, Any]
    """`kv.layout.*` settings matching the model's KV."""
    device: torch.device
    vocab_size: int
    max_position_embeddings: int


class BuiltRunner(NamedTuple):
    """A runner over the device tier of `store`, and the config both were built from."""

    config: KVFlowConfig
    runner: ModelRunner
    store: KVStore


def _layout_of(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> dict[str, Any]:
    from kvflow.engine_adapters.torch.spec import DTYPES

    return {
        "kv.layout.num_layers": num_layers,
        "kv.layout.num_kv_heads": num_kv_heads,
        "kv.layout.head_dim": head_dim,
        "kv.layout.dtype": next(name for name, d in DTYPES.items() if d == dtype),
    }


def load_model(
    model: str | Path | Any, engine: EngineName = "torch", dtype: str | None = None
) -> LoadedModel:
    """Load a checkpoint directory for `engine`, or describe an already loaded model.

    Args:
        model: a checkpoint directory (`config.json` + `*.safetensors`), a `TorchLlama`
            (engine "torch") or a transformers causal LM (engine "hf").
        engine: "torch" (kvflow's paged-attention runner) or "hf" (transformers).
        dtype: compute dtype for a model loaded from a directory (e.g. "float64"); for
            engine "hf" a loaded model is cast to it too.

    Raises:
        ValueError: an unknown engine, or a checkpoint that cannot be loaded.
    """
    if engine == "torch":
        from kvflow.engine_adapters.torch.model import TorchLlama

        net: Any = (
            model if isinstance(model, TorchLlama) else TorchLlama.from_pretrained(model, dtype)
        )
        spec = net.spec
        return LoadedModel(
            engine,
            net,
            _layout_of(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.torch_dtype),
            net.device,
            spec.vocab_size,
            spec.max_position_embeddings,
        )
    if engine == "hf":
        from kvflow.engine_adapters.hf import hf_kv_dims, load_hf_model
        from kvflow.engine_adapters.torch.spec import DTYPES

        if isinstance(model, str | Path):
            net = load_hf_model(model, dtype)  # loaded in `dtype`, not cast after
        else:
            net = model
            if dtype is not None:
                if dtype not in DTYPES:
                    raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
                net = net.to(DTYPES[dtype])
        cfg = net.config.get_text_config()
        param = next(net.parameters())
        return LoadedModel(
            engine,
            net,
            _layout_of(*hf_kv_dims(net), param.dtype),
            param.device,
            int(cfg.vocab_size),
            int(getattr(cfg, "max_position_embeddings", None) or 2**31 - 1),
        )
    raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def build_runner(
    model: LoadedModel,
    settings: Mapping[str, Any] | None = None,
    *,
    config_file: str | Path | None = None,
    seed: int = 0,
) -> BuiltRunner:
    """A fresh store (tensors allocated from the config) and a runner over its device
    tier. Call it once per run: a store's cached blocks belong to one scheduler.

    Args:
        model: from `load_model`; its KV layout overrides the config's.
        settings: dotted config keys, as `kvflow replay --set` takes them.
        config_file: a JSON or TOML config to start from.
        seed: seeds the sampling of requests without their own seed.

    Raises:
        ConfigError: a bad setting.
    """
    config = KVFlowConfig.load(config_file, {**model.layout, **dict(settings or {})})
    store = KVStore.with_tensors(config.kv, device=model.device, model_id=config.peer.model_id)
    if store.device_storage is None:  # with_tensors always makes it
        raise RuntimeError("the store has no device tensor")
    kv_cache = store.device_storage.data
    block_size = config.kv.block_size
    runner: ModelRunner
    if model.engine == "torch":
        from kvflow.engine_adapters.torch.runner import TorchRunner

        runner = TorchRunner(model.net, block_size, kv_cache=kv_cache, seed=seed)
    else:
        from kvflow.engine_adapters.hf import HFRunner

        runner = HFRunner(model.net, block_size, kv_cache=kv_cache, seed=seed)
    return BuiltRunner(config, runner, store)


def run_blocking(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """`anyio.run` on asyncio, with uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    return anyio.run(fn, *args, backend="asyncio", backend_options=options)


__all__ = ["ENGINES", "BuiltRunner", "EngineName", "LoadedModel", "build_runner", "load_model"]
