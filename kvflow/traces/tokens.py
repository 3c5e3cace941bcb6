"""Deterministic synthetic token ids for traces that give lengths instead of tokens.

Traces often say "1024 tokens of system prompt shared by group X, then 200 tokens of
the user's own" without the tokens themselves. These functions make such prompts so
that prefix sharing is exact: every request of a group gets the same leading tokens,
and tokens are identical across processes, machines and Python versions (seeds come
from xxhash of the names, never from `hash()`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import operator
import random
import sys
from array import array
from collections import OrderedDict

import xxhash

from kvflow.traces.limits import MAX_TRACE_TOKENS

VOCAB_SIZE = 32000
"""Generated token ids lie in [0, VOCAB_SIZE)."""

_GROUP_SEED = 0x6B76_6772_6F75_70  # "kvgroup"
_REQUEST_SEED = 0x6B76_7265_7175  # "kvrequ"
_MAX_CACHED_GROUPS = 4096
_PIECE_TOKENS = 16
_NUM_PIECES = 256
_PIECES_SEED = 0x6B76_7069_6563_65  # "kvpiece"
_NEEDS_BYTESWAP = sys.byteorder != "little"

_group_cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()


def _check_num_tokens(num_tokens: int) -> None:
    # Readers check lengths against the cap with file and line; this guards direct calls.
    if num_tokens > MAX_TRACE_TOKENS:
        raise ValueError(
            f"num_tokens={num_tokens!r} exceeds kvflow.traces.limits.MAX_TRACE_TOKENS "
            f"({MAX_TRACE_TOKENS})"
        )


@functools.cache
def _token_of_uint16() -> tuple[int, ...]:
    # Multiply-shift maps 16 random bits onto the vocabulary (each id gets 2 or 3 of the
    # 65536 inputs). Indexing a tuple of shared int objects keeps generation in C and
    # lets every prompt share the same int objects.
    vocab = tuple(range(VOCAB_SIZE))
    return tuple(vocab[(v * VOCAB_SIZE) >> 16] for v in range(1 << 16))


def random_token_ids(seed: int, num_tokens: int) -> tuple[int, ...]:
    """`num_tokens` pseudo-random ids in [0, VOCAB_SIZE), a pure function of `seed`.

    A shorter sequence is always a prefix of a longer one with the same seed.

    Raises:
        ValueError: `num_tokens` over `MAX_TRACE_TOKENS`.
    """
    if num_tokens <= 0:
        return ()
    _check_num_tokens(num_tokens)
    # Whole 32-bit words only, so that the stream does not depend on the length asked.
    num_words = (num_tokens + 1) // 2
    raw = array("H", random.Random(seed).randbytes(4 * num_words))
    if _NEEDS_BYTESWAP:  # pragma: no cover - big-endian hosts
        raw.byteswap()
    if num_tokens == 1:
        return (_token_of_uint16()[raw[0]],)
    tokens: tuple[int, ...] = operator.itemgetter(*raw[:num_tokens])(_token_of_uint16())
    return tokens


@functools.cache
def _pieces() -> tuple[tuple[int, ...], ...]:
    stream = random_token_ids(_PIECES_SEED, _PIECE_TOKENS * _NUM_PIECES)
    return tuple(stream[i : i + _PIECE_TOKENS] for i in range(0, len(stream), _PIECE_TOKENS))


def keyed_token_ids(key: str, num_tokens: int) -> tuple[int, ...]:
    """`num_tokens` ids in [0, VOCAB_SIZE), a pure function of `key`, cheap to make.

    The first 16 tokens are uniform random (SHAKE-128 of the key); the rest are random
    16-token pieces of a fixed pool, picked by the same digest. So two keys' sequences
    differ from their first token on, except with probability 1/VOCAB_SIZE per leading
    token: what prefix sharing needs, at about half `random_token_ids`' cost. A shorter
    sequence is always a prefix of a longer one with the same key.
    """
    if num_tokens <= 0:
        return ()
    _check_num_tokens(num_tokens)
    num_head = min(num_tokens, _PIECE_TOKENS)
    num_pieces = -(-(num_tokens - num_head) // _PIECE_TOKENS)
    digest = hashlib.shake_128(key.encode()).digest(2 * _PIECE_TOKENS + num_pieces)
    head = array("H", digest[: 2 * num_head])
    if _NEEDS_BYTESWAP:  # pragma: no cover - big-endian hosts
        head.byteswap()
    table = _token_of_uint16()
    parts: list[tuple[int, ...]] = [
        operator.itemgetter(*head)(table) if num_head > 1 else (table[head[0]],)
    ]
    if num_pieces == 1:
        parts.append(_pieces()[digest[2 * _PIECE_TOKENS]])
    elif num_pieces:
        parts.extend(operator.itemgetter(*digest[2 * _PIECE_TOKENS :])(_pieces()))
    tokens = tuple(itertools.chain.from_iterable(parts))
    return tokens if len(tokens) == num_tokens else tokens[:num_tokens]


def name_seed(name: str, *, salt: int = 0) -> int:
    """A stable 64-bit seed for a name (xxh64, independent of PYTHONHASHSEED)."""
    return xxhash.xxh64_intdigest(name.encode(), seed=salt)


def group_prefix_token_ids(group: str, num_tokens: int) -> tuple[int, ...]:
    """The first `num_tokens` tokens of prefix group `group`: the same for every caller.

    Streams are cached per group (least recently used dropped past a few thousand
    groups), so building many prompts of one group costs a slice each.
    """
    cached = _group_cache.get(group)
    if cached is None or len(cached) < num_tokens:
        _check_num_tokens(num_tokens)
        grown = min(2 * len(cached), MAX_TRACE_TOKENS) if cached else 0
        length = max(num_tokens, grown, 256)
        cached = random_token_ids(name_seed(group, salt=_GROUP_SEED), length)
        _group_cache[group] = cached
        if len(_group_cache) > _MAX_CACHED_GROUPS:
            _group_cache.popitem(last=False)
    else:
        _group_cache.move_to_end(group)
    return cached[:num_tokens]


def prompt_token_ids(
    request_id: str, num_tokens: int, *, group: str | None = None, prefix_len: int = 0
) -> tuple[int, ...]:
    """A prompt of `num_tokens` tokens: `prefix_len` of `group`'s, then the request's own.

    The request's own tokens come from `request_id`. Its first one is never the group's
    next token, so the prompt shares exactly `prefix_len` leading tokens with the group's
    stream (and with any request of the group whose prefix is longer).
    """
    if not 0 <= prefix_len <= num_tokens:
        raise ValueError(f"prefix_len must be in [0, {num_tokens}], got {prefix_len!r}")
    if group is None or prefix_len == 0:
        return random_token_ids(name_seed(request_id, salt=_REQUEST_SEED), num_tokens)
    num_unique = num_tokens - prefix_len
    stream = group_prefix_token_ids(group, prefix_len + (1 if num_unique else 0))
    if not num_unique:
        return stream
    unique = random_token_ids(name_seed(request_id, salt=_REQUEST_SEED), num_unique)
    if unique[0] == stream[prefix_len]:
        unique = ((unique[0] + 1) % VOCAB_SIZE, *unique[1:])
    return stream[:prefix_len] + unique
