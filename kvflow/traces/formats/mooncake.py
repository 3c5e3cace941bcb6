"""Mooncake traces (kvcache-ai/Mooncake, FAST'25): JSON lines with block hash ids.

Each line is ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}``.
Every hash id stands for one block of 512 prompt tokens (`TraceOptions.hash_block_size`);
ids are prefix-chained, so requests that list the same ids in the same leading positions
share that prefix. ``len(hash_ids) == ceil(input_length / 512)``; the last block is
partial when `input_length` is not a multiple of 512.

kvflow turns each id into 512 token ids, a pure function of (namespace, id) (see
`kvflow.traces.tokens.keyed_token_ids`): the namespace defaults to the file name's
stem, so ids of different files never collide unless they are read with the same
namespace. A request's prompt is its blocks' tokens,
the last block cut to `input_length`. kvflow's own block hashing therefore sees exactly
the sharing the trace records, at any kvflow block size: two prompts have the same
leading tokens for as many 512-token blocks as they have leading ids in common (plus
the common part of a shared partial last block); blocks of distinct ids start with
independent random tokens, so they differ from their first token on (but for a chance
of 1/VOCAB_SIZE per leading token).

Arrivals are seconds after the file's first request. Request ids are ``r{i}``, i the
0-based index of the record in the file.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import xxhash

from kvflow.request import Request
from kvflow.traces.errors import FieldError
from kvflow.traces.formats._io import is_finite_number, iter_json_lines, show
from kvflow.traces.formats.base import LoadLog, TraceFormat, TraceHead, TraceOptions, rebase
from kvflow.traces.limits import check_length, check_total
from kvflow.traces.tokens import keyed_token_ids

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per hash id in the Mooncake releases."""

_NEEDS_BYTESWAP = sys.byteorder != "little"
_EMPTY: tuple[int, ...] = ()


class BlockTokens:
    """Token ids of hash-id blocks in one namespace, made once per id and cached.

    Args:
        namespace: seeds every block's tokens together with its id.
        block_size: tokens per block.
    """

    def __init__(self, namespace: str, block_size: int = MOONCAKE_BLOCK_TOKENS) -> None:
        self.namespace = namespace
        self.block_size = block_size
        self._blocks: dict[int, tuple[int, ...]] = {}
        # Last id of a run of full blocks -> (the ids, a prompt starting with their
        # tokens): a later prompt with the same leading ids copies that prefix in one
        # slice instead of joining block after block.
        self._prefixes: dict[int, tuple[list[int], int, tuple[int, ...]]] = {}

    def block(self, hash_id: int) -> tuple[int, ...]:
        """The `block_size` tokens of block `hash_id`."""
        tokens = self._blocks.get(hash_id)
        if tokens is None:
            key = f"mooncake\x1f{self.namespace}\x1f{hash_id}"
            tokens = self._blocks[hash_id] = keyed_token_ids(key, self.block_size)
        return tokens

    def prompt(self, hash_ids: list[int], num_tokens: int) -> tuple[int, ...]:
        """The prompt of `num_tokens` tokens made of these blocks (the last one cut)."""
        size = self.block_size
        num_full = min(len(hash_ids), num_tokens // size)
        prefixes = self._prefixes
        start, base = 0, _EMPTY
        for k in range(num_full, 0, -1):
            hit = prefixes.get(hash_ids[k - 1])
            if hit is not None and hit[1] == k and hit[0][:k] == hash_ids[:k]:
                start, base = k, hit[2][: k * size]
                break
        block = self.block
        parts = [block(h) for h in hash_ids[start:]]
        cut = num_tokens - size * (len(hash_ids) - 1)
        if parts and cut < size:
            parts[-1] = parts[-1][:cut]
        tokens = base + tuple(itertools.chain.from_iterable(parts)) if parts else base
        for k in range(start + 1, num_full + 1):
            prefixes.setdefault(hash_ids[k - 1], (hash_ids, k, tokens))
        return tokens


def _check_record(obj: object, block_size: int) -> tuple[float, int, int, list[int]]:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {show(obj)}")
    for key in ("timestamp", "input_length", "output_length", "hash_ids"):
        if key not in obj:
            raise FieldError(key, "missing (required)")
    ts = obj["timestamp"]
    if not (is_finite_number(ts) and ts >= 0):
        raise FieldError(
            "timestamp", f"expected milliseconds, a finite number >= 0, got {show(ts)}"
        )
    num_in, num_out = obj["input_length"], obj["output_length"]
    for key, value in (("input_length", num_in), ("output_length", num_out)):
        check_length(key, value, show(value))
    ids = obj["hash_ids"]
    if not isinstance(ids, list) or not all(type(h) is int and h >= 0 for h in ids):
        raise FieldError("hash_ids", f"expected a list of integers >= 0, got {show(ids)}")
    expected = -(-num_in // block_size)
    if len(ids) != expected:
        raise FieldError(
            "hash_ids",
            f"expected ceil(input_length / {block_size}) = {expected} ids for input_length "
            f"{num_in}, got {len(ids)}",
        )
    return ts, num_in, num_out, ids


class MooncakeFormat(TraceFormat):
    """Mooncake JSON lines; hash ids become shared token blocks."""

    name = "mooncake"
    summary = "Mooncake JSON lines (timestamp ms, input_length, output_length, hash_ids)"

    def sniff(self, head: TraceHead) -> bool:
        first = head.first_json
        return isinstance(first, dict) and (
            "hash_ids" in first or {"input_length", "output_length"} <= first.keys()
        )

    def read(self, path: Path, options: TraceOptions, log: LoadLog) -> list[Request]:
        block_size = options.hash_block_size
        parsed: list[tuple[str, float, int, int, list[int]]] = []
        for index, (line_no, obj) in enumerate(iter_json_lines(path, log)):
            try:
                ts, num_in, num_out, ids = _check_record(obj, block_size)
            except ValueError as err:
                log.bad(line_no, err)
                continue
            parsed.append((f"r{index}", ts, num_in, num_out, ids))
        # Whole blocks: a partial last block's tokens are made (and cached) in full.
        check_total(path, [len(p[4]) * block_size for p in parsed])
        blocks = BlockTokens(options.namespace_of(path), block_size)
        arrivals = [ms / 1000 for ms in rebase([p[1] for p in parsed])]
        return [
            Request(
                request_id=rid,
                prompt_token_ids=blocks.prompt(ids, num_in),
                max_new_tokens=num_out,
                arrival_time=arrival,
            )
            for (rid, _, num_in, num_out, ids), arrival in zip(parsed, arrivals, strict=True)
        ]


def _pack(tokens: Sequence[int]) -> bytes:
    packed = array("I", tokens)
    if _NEEDS_BYTESWAP:  # pragma: no cover - big-endian hosts
        packed.byteswap()
    return packed.tobytes()


def mooncake_records(
    requests: Iterable[Request], block_size: int = MOONCAKE_BLOCK_TOKENS
) -> list[dict[str, Any]]:
    """Mooncake records of `requests` (in arrival order): each block of `block_size`
    prompt tokens gets a dense id, equal for equal prefixes (a chained hash of the
    tokens), so the records keep the requests' prefix sharing at block granularity.
    A partial last block gets the id of any earlier equal partial block, else a new one.
    """
    ids_of: dict[int, int] = {}
    records = []
    for request in sorted(requests, key=lambda r: r.arrival_time):
        tokens = request.prompt_token_ids
        parent = 0
        hash_ids = []
        for start in range(0, len(tokens), block_size):
            parent = xxhash.xxh3_64_intdigest(_pack(tokens[start : start + block_size]), parent)
            hash_ids.append(ids_of.setdefault(parent, len(ids_of)))
        records.append(
            {
                "timestamp": round(request.arrival_time * 1000),
                "input_length": len(tokens),
                "output_length": request.max_new_tokens,
                "hash_ids": hash_ids,
            }
        )
    return records


def dump_mooncake(
    requests: Iterable[Request],
    path: str | os.PathLike[str],
    block_size: int = MOONCAKE_BLOCK_TOKENS,
) -> None:
    """Write `requests` as a Mooncake trace (see `mooncake_records`); timestamps are
    whole milliseconds."""
    lines = [json.dumps(r, separators=(", ", ": ")) for r in mooncake_records(requests, block_size)]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
