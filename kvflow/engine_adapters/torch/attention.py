"""Paged attention over kvflow's KV cache tensor.

The cache is one tensor of layout `[num_blocks, num_layers, 2, block_size,
num_kv_heads, head_dim]` (index 0 of the third axis holds keys, 1 values): one block's
KV for every layer is contiguous, so the tiered store moves a block between device,
CPU and disk as a single slice. Keys are stored after rotary embedding, as
transformers' caches store them.

Grouped-query attention never copies KV per query head: the query heads that share a KV
head are folded into the query-length axis (`[.., num_kv_heads, num_queries_per_kv, ..]`)
and attend against their one KV head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvflow.engine_adapters.torch.batch import ForwardBatch


def kv_cache_shape(
    num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, int, int, int, int, int]:
    """The cache layout: `[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`."""
    return (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)


def allocate_kv_cache(
    shape: tuple[int, int, int, int, int, int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A zeroed cache. Zeros, not `empty`: padded attention reads rows it masks out,
    and a NaN there would still poison the softmax-weighted sum."""
    return torch.zeros(shape, dtype=dtype, device=device)


def check_kv_cache(
    kv_cache: Tensor,
    expected: tuple[int, int, int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Raise ValueError unless `kv_cache` has the layout, dtype and device a model needs."""
    if tuple(kv_cache.shape[1:]) != expected[1:]:
        raise ValueError(
            f"kv_cache has shape {tuple(kv_cache.shape)}; expected [num_blocks, "
            f"num_layers, 2, block_size, num_kv_heads, head_dim] = [*, {expected[1:]}]"
        )
    if kv_cache.dtype != dtype or kv_cache.device.type != device.type:
        raise ValueError(
            f"kv_cache is {kv_cache.dtype} on {kv_cache.device}; the model needs {dtype} "
            f"on {device}"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")


def resolve_kv_cache(
    num_blocks: int | None,
    kv_cache: Tensor | None,
    shape_for: Callable[[int], tuple[int, int, int, int, int, int]],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """A runner's cache: `kv_cache` once checked, or a zeroed one of `num_blocks` blocks.

    Args:
        shape_for: the layout the model needs for a given number of blocks.

    Raises:
        ValueError: neither or both of `num_blocks` and `kv_cache`, `num_blocks` < 1, or
            a cache that does not fit the model.
    """
    if (num_blocks is None) == (kv_cache is None):
        raise ValueError("give exactly one of num_blocks and kv_cache")
    if kv_cache is not None:
        check_kv_cache(kv_cache, shape_for(kv_cache.shape[0]), dtype, device)
        return kv_cache
    if num_blocks is None or num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks!r}")
    return allocate_kv_cache(shape_for(num_blocks), dtype, device)


def write_kv(kv_cache: Tensor, layer: int, batch: ForwardBatch, k: Tensor, v: Tensor) -> None:
    """Store the batch's new keys and values ([num_tokens, num_kv_heads, head_dim])."""
    kv_cache[batch.slot_blocks, layer, 0, batch.slot_offsets] = k
    kv_cache[batch.slot_blocks, layer, 1, batch.slot_offsets] = v


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor, layer: int, batch: ForwardBatch
) -> Tensor:
    """Write this layer's new KV into the cache, then attend.

    Args:
        q: [num_tokens, num_heads, head_dim] queries, after rotary.
        k, v: [num_tokens, num_kv_heads, head_dim] new keys (after rotary) and values.
        kv_cache: the paged cache (see module docstring).
        layer: index of this layer in the cache.
        batch: where each token's KV goes and what each entry attends to.

    Returns:
        [num_tokens, num_heads * head_dim] attention outputs.
    """
    write_kv(kv_cache, layer, batch, k, v)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5
    out = torch.empty_like(q)
    # [num_blocks, block_size, kv_heads, d] views; index_select copies whole blocks.
    layer_k = kv_cache.select(1, layer).select(1, 0)
    layer_v = kv_cache.select(1, layer).select(1, 1)
    if batch.decode_indices is not None:
        table = batch.decode_block_table
        mask = batch.decode_mask
        if table is None or mask is None:
            raise ValueError("a batch with decodes lacks their block table or mask")
        num_decodes = table.shape[0]
        # [num_decodes * max_blocks, block_size, kv_heads, d] -> [num_decodes, kv_heads, L, d]
        flat = table.flatten()
        ctx_k = layer_k.index_select(0, flat).view(num_decodes, -1, num_kv_heads, head_dim)
        ctx_v = layer_v.index_select(0, flat).view(num_decodes, -1, num_kv_heads, head_dim)
        ctx_k, ctx_v = ctx_k.transpose(1, 2), ctx_v.transpose(1, 2)
        dq = q[batch.decode_indices].view(num_decodes, num_kv_heads, group, head_dim)
        dout = F.scaled_dot_product_attention(dq, ctx_k, ctx_v, attn_mask=mask, scale=scale)
        out[batch.decode_indices] = dout.reshape(num_decodes, num_heads, head_dim)
    for chunk, mask in zip(batch.prefills, batch.prefill_masks(group), strict=True):
        lo, hi = chunk.token_begin, chunk.token_end
        n = hi - lo
        if chunk.start == 0:
            ctx_k, ctx_v = k[lo:hi], v[lo:hi]
        else:
            ctx_len = chunk.start + n
            ctx_k = layer_k.index_select(0, chunk.block_ids).flatten(0, 1)[:ctx_len]
            ctx_v = layer_v.index_select(0, chunk.block_ids).flatten(0, 1)[:ctx_len]
        # Rows of the folded query axis are (token, head-in-group) pairs.
        pq = q[lo:hi].view(n, num_kv_heads, group, head_dim).transpose(0, 1)
        pq = pq.reshape(1, num_kv_heads, n * group, head_dim)
        pout = F.scaled_dot_product_attention(
            pq,
            ctx_k.transpose(0, 1).unsqueeze(0),
            ctx_v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=scale,
        )
        out[lo:hi] = (
            pout.view(num_kv_heads, n, group, head_dim)
            .transpose(0, 1)
            .reshape(n, num_heads, head_dim)
        )
    return out.view(num_tokens, num_heads * head_dim)
