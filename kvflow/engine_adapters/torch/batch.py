"""One forward pass's inputs, flattened: every entry's new tokens side by side.

A batch mixes prefill chunks (several tokens, at any offset, continuing from KV that
earlier steps left in the entry's blocks) and decode tokens (one token each). Tokens are
laid out entry after entry; `slot_blocks[t]`/`slot_offsets[t]` say where token `t`'s K
and V go in the paged cache (block `block_ids[pos // block_size]`, row
`pos % block_size`). Decodes attend in one padded batch; each prefill chunk attends on
its own with a causal mask offset by its start position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor


class BatchEntry(NamedTuple):
    """One request's share of a forward pass.

    `token_ids` are the tokens to compute, at positions `start, start + 1, ...`; their
    KV goes into `block_ids` (which must also hold the KV of positions `0..start-1`).
    `wants_logits`: the entry's last token's logits are returned (it samples).
    """

    token_ids: Sequence[int]
    start: int
    block_ids: Sequence[int]
    wants_logits: bool


@dataclass(frozen=True, slots=True)
class PrefillSlice:
    """A prefill chunk: tokens `token_begin:token_end` of the batch, attending causally
    over positions `0..start + i` of its request (KV read from `block_ids` when
    `start > 0`). `mask[i, j]` is True where query `i` may attend to position `j`."""

    token_begin: int
    token_end: int
    start: int
    block_ids: Tensor
    mask: Tensor


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    """Tensors of one forward pass, built once and shared by every layer."""

    input_ids: Tensor
    """[num_tokens] token ids."""
    positions: Tensor
    """[num_tokens] position of each token in its request."""
    slot_blocks: Tensor
    """[num_tokens] block each token's KV is written to."""
    slot_offsets: Tensor
    """[num_tokens] row within that block."""
    decode_indices: Tensor | None
    """[num_decodes] batch positions of single-token entries (None when there are none)."""
    decode_block_table: Tensor | None
    """[num_decodes, max_blocks] their block tables, padded with block 0."""
    decode_mask: Tensor | None
    """[num_decodes, 1, 1, max_blocks * block_size] True on positions 0..pos of each."""
    prefills: list[PrefillSlice]
    logits_indices: Tensor | None
    """Batch positions whose logits are returned, in entry order (None: all tokens)."""
    _folded_masks: dict[int, list[Tensor]] = field(default_factory=dict, repr=False)

    def prefill_masks(self, group: int) -> list[Tensor]:
        """Each prefill's mask with every row repeated `group` times (once per query head
        sharing a KV head), made on the first layer's call and reused by the others."""
        masks = self._folded_masks.get(group)
        if masks is None:
            masks = [p.mask.repeat_interleave(group, dim=0) for p in self.prefills]
            self._folded_masks[group] = masks
        return masks

    @property
    def num_tokens(self) -> int:
        """Tokens computed in this pass, over all entries."""
        return int(self.input_ids.shape[0])


def build_batch(
    entries: Sequence[BatchEntry],
    block_size: int,
    device: torch.device,
    *,
    all_logits: bool = False,
) -> ForwardBatch:
    """Flatten `entries` into a `ForwardBatch` on `device`.

    Args:
        entries: the requests of the step, in plan order.
        block_size: tokens per KV block.
        device: where the tensors live (the model's device).
        all_logits: return logits for every token rather than the sampling entries'
            last tokens (for scoring whole prompts).

    Raises:
        ValueError: an entry has no tokens, a negative start, or too few blocks.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slot_blocks: list[int] = []
    slot_offsets: list[int] = []
    logits_indices: list[int] = []
    decode_indices: list[int] = []
    decode_tables: list[Sequence[int]] = []
    decode_lengths: list[int] = []
    prefills: list[PrefillSlice] = []
    prefill_spans: list[tuple[int, int, int]] = []  # (batch offset, start, tokens)
    prefill_tables: list[Sequence[int]] = []
    for entry in entries:
        n = len(entry.token_ids)
        start = entry.start
        end = start + n
        if n == 0 or start < 0:
            raise ValueError(f"batch entry with {n} tokens at start {start}")
        num_blocks = -(-end // block_size)
        if len(entry.block_ids) < num_blocks:
            raise ValueError(
                f"batch entry covering positions 0..{end - 1} needs {num_blocks} blocks of "
                f"{block_size}, got {len(entry.block_ids)}"
            )
        begin = len(input_ids)
        blocks = entry.block_ids
        input_ids.extend(entry.token_ids)
        positions.extend(range(start, end))
        slot_blocks.extend([blocks[p // block_size] for p in range(start, end)])
        slot_offsets.extend([p % block_size for p in range(start, end)])
        if entry.wants_logits:
            logits_indices.append(begin + n - 1)
        if n == 1:
            decode_indices.append(begin)
            decode_tables.append(blocks[:num_blocks])
            decode_lengths.append(end)
        else:
            prefill_spans.append((begin, start, n))
            prefill_tables.append(blocks[:num_blocks])

    # Every index list goes to the device in one copy, then is cut into views.
    max_blocks = max((len(t) for t in decode_tables), default=0)
    padded = [b for t in decode_tables for b in (*t, *[0] * (max_blocks - len(t)))]
    parts: list[Sequence[int]] = [
        input_ids,
        positions,
        slot_blocks,
        slot_offsets,
        logits_indices,
        decode_indices,
        decode_lengths,
        padded,
        *prefill_tables,
    ]
    flat = torch.tensor([v for part in parts for v in part], dtype=torch.long)
    views = list(torch.split(flat.to(device), [len(part) for part in parts]))
    ids, pos, blocks_t, offsets, logits_t, decode_idx, lengths, table = views[:8]

    for (begin, start, n), table_ids in zip(prefill_spans, views[8:], strict=True):
        end = start + n
        query_pos = pos[begin : begin + n]
        mask = torch.arange(end, device=device)[None, :] <= query_pos[:, None]
        prefills.append(PrefillSlice(begin, begin + n, start, table_ids, mask))

    decode_table = decode_mask = None
    if decode_indices:
        decode_table = table.view(len(decode_indices), max_blocks)
        span = torch.arange(max_blocks * block_size, device=device)
        decode_mask = (span[None, :] < lengths[:, None])[:, None, None, :]
    return ForwardBatch(
        input_ids=ids,
        positions=pos,
        slot_blocks=blocks_t,
        slot_offsets=offsets,
        decode_indices=decode_idx if decode_indices else None,
        decode_block_table=decode_table,
        decode_mask=decode_mask,
        prefills=prefills,
        logits_indices=None if all_logits else logits_t,
    )
