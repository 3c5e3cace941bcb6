"""Block keys: chained, stable, and the same whether hashed or copied from a recent prompt."""

from __future__ import annotations

from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from kvflow.kv.chain_memo import ChainMemo
from kvflow.kv.hashing import extend_block_keys, hash_block, root_key

BS = 4


def keys_of(tokens: list[int], num_full_blocks: int, root: int) -> list[int]:
    keys: list[int] = []
    extend_block_keys(keys, tokens, num_full_blocks, BS, root)
    return keys


def test_keys_chain_each_block_to_its_parent() -> None:
    root = root_key(("model",))
    tokens = list(range(3 * BS + 1))
    keys = keys_of(tokens, 3, root)
    assert keys[0] == hash_block(root, tokens[:BS])
    assert keys[2] == hash_block(keys[1], tokens[2 * BS : 3 * BS])
    # The same tokens under another root (model, adapter) share no key.
    assert set(keys).isdisjoint(keys_of(tokens, 3, root_key(("other",))))


def test_keys_do_not_depend_on_how_the_tokens_are_held() -> None:
    tokens = [7, 1, 2**32 - 1, 0] * 5
    root = root_key()
    as_list = keys_of(tokens, 5, root)
    assert keys_of(array("I", tokens), 5, root) == as_list  # type: ignore[arg-type]
    grown = keys_of(tokens, 2, root)
    extend_block_keys(grown, tokens, 5, BS, root)  # extended later, as a request grows
    assert grown == as_list


# Prompts built from a few shared stems, so that they share prefixes of any length.
stems = st.lists(st.integers(0, 3), min_size=0, max_size=6)
prompts = st.lists(
    st.tuples(st.sampled_from(["a", "b"]), stems, st.integers(0, BS - 1)), min_size=1, max_size=12
)


@settings(max_examples=150, deadline=None)
@given(prompts, st.integers(1, 4))
def test_chain_memo_gives_the_keys_hashing_gives(
    specs: list[tuple[str, list[int], int]], max_nodes: int
) -> None:
    memo = ChainMemo(BS, max_nodes=max_nodes)
    roots = {"a": root_key(("a",)), "b": root_key(("b",))}
    for root_name, stem, tail in specs:
        # Each stem id is one block of tokens; `tail` extra tokens make a partial block.
        tokens = [t for s in stem for t in [s * 10 + i for i in range(BS)]] + [99] * tail
        root = roots[root_name]
        num_full = len(tokens) // BS
        got: list[int] = []
        memo.extend(got, array("I", tokens), num_full, root)
        assert got == keys_of(tokens, num_full, root)
        assert memo.num_nodes <= max_nodes


def conversation(seed: int, num_turns: int) -> list[list[int]]:
    """A conversation's prompts: each the previous one, an output and a new user turn,
    after one of two system prompts."""
    system = [1000 + seed % 2] * (3 * BS)
    prompt = list(system)
    turns = []
    for turn in range(num_turns):
        prompt = prompt + [seed * 100 + turn] * (2 * BS + turn)  # not block-aligned
        turns.append(prompt)
        prompt = prompt + [7] * (turn + 1)  # the output
    return turns


def test_chain_memo_reuses_the_previous_turn_among_many_conversations() -> None:
    memo = ChainMemo(BS)
    root = root_key()
    convs = [conversation(seed, 4) for seed in range(50)]
    hashed = 0
    for turn in range(4):
        for conv in convs:  # interleaved: the previous turn is rarely the latest prompt
            tokens = conv[turn]
            before = memo.num_reused_keys
            keys: list[int] = []
            memo.extend(keys, array("I", tokens), len(tokens) // BS, root)
            assert keys == keys_of(tokens, len(tokens) // BS, root)
            hashed += len(keys) - (memo.num_reused_keys - before)
            if turn:  # every full block of the previous turn's prompt is copied
                assert memo.num_reused_keys - before >= len(conv[turn - 1]) // BS
    # Hashed once: the two system prompts, then each turn's new blocks (a block that
    # straddled the end of the previous prompt is hashed again, whole).
    assert hashed <= 2 * 3 + sum(len(c[-1]) // BS - 3 + 4 for c in convs)


def test_chain_memo_copies_the_common_prefix_of_a_recent_prompt() -> None:
    memo = ChainMemo(BS)
    root = root_key()
    system = list(range(3 * BS))
    first: list[int] = []
    memo.extend(first, system + [50] * BS + [1], 4, root)
    second: list[int] = []
    memo.extend(second, system + [60] * BS, 4, root)
    assert memo.num_reused_keys == 3  # the three system-prompt blocks
    assert second[:3] == first[:3] and second[3] != first[3]
    assert second == keys_of(system + [60] * BS, 4, root)
    third: list[int] = []
    memo.extend(third, system[: 2 * BS], 2, root)  # a prompt inside a held one
    assert memo.num_reused_keys == 5 and third == first[:2]


def test_chain_memo_keeps_at_most_max_bytes_of_tokens_dropping_the_oldest() -> None:
    memo = ChainMemo(BS, max_bytes=4 * 4 * BS * 3)  # three 4-block prompts
    root = root_key()
    for i in range(10):
        tokens = [i] * BS + [100 + i] * 3 * BS
        keys: list[int] = []
        memo.extend(keys, tokens, 4, root)
        assert keys == keys_of(tokens, 4, root)
        assert memo.num_bytes <= memo.max_bytes
    assert memo.num_nodes == 3  # the newest three
    keys = []
    memo.extend(keys, [9] * BS + [109] * 3 * BS, 4, root)
    assert memo.num_reused_keys == 4  # the newest is held ...
    memo.extend([], [0] * BS + [100] * 3 * BS, 4, root)
    assert memo.num_reused_keys == 4  # ... the oldest is not


def test_chain_memo_keeps_the_shared_prefix_of_dropped_prompts_while_it_is_used() -> None:
    memo = ChainMemo(BS, max_nodes=3)
    root = root_key()
    system = [5] * (2 * BS)
    for i in range(6):  # the system prompt's run stays; the users' runs come and go
        memo.extend([], system + [i] * BS, 3, root)
        assert memo.num_nodes <= 3
    assert memo.num_reused_keys == 5 * 2


def test_chain_memo_leaves_the_token_array_free_to_grow() -> None:
    memo = ChainMemo(BS)
    tokens = array("I", range(3 * BS))
    keys: list[int] = []
    memo.extend(keys, tokens, 3, root_key())  # read in place ...
    tokens.append(1)  # ... and let go: a decode appends to the same array
    memo.extend(keys, tokens, 3, root_key())
    assert keys == keys_of(list(tokens), 3, root_key())
