"""The torch runner: a Llama-architecture decoder with paged attention over kvflow's
KV cache tensor `[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`.

Importing this package imports torch; the scheduler, policies and simulator never do.
"""

from kvflow.engine_adapters.torch.attention import allocate_kv_cache, kv_cache_shape
from kvflow.engine_adapters.torch.batch import BatchEntry, ForwardBatch, build_batch
from kvflow.engine_adapters.torch.model import TorchLlama
from kvflow.engine_adapters.torch.runner import TorchRunner
from kvflow.engine_adapters.torch.sampling import Sampler, filter_logits, sample_seed
from kvflow.engine_adapters.torch.spec import DTYPES, LlamaSpec, default_device, default_dtype

__all__ = [
    "DTYPES",
    "BatchEntry",
    "ForwardBatch",
    "LlamaSpec",
    "Sampler",
    "TorchLlama",
    "TorchRunner",
    "allocate_kv_cache",
    "build_batch",
    "default_device",
    "default_dtype",
    "filter_logits",
    "kv_cache_shape",
    "sample_seed",
]
