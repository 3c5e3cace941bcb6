"""A full lower tier evicts a prompt from its tail toward its root, as the device does.

A prefix is only reusable from its root (`locate` and `count_prefix` stop at the first
missing block), so a tier that lost a prompt's root holds the rest as dead weight. The
device releases a request's blocks tail first; the cpu and disk tiers get their blocks
one copy at a time (write_through copies each block as it is sealed, write_back copies a
later turn's new blocks after the earlier turn's), so their eviction order must be set
when the request ends. Each case runs on the simulated store and on real tensors (a slab
file and threaded copies), which must agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvflow.config import KVFlowConfig
from kvflow.kv.block_pool import BlockPool
from kvflow.kv.store import KVStore
from kvflow.policies import make_policy
from kvflow.request import Request
from kvflow.scheduler import Scheduler
from tests.builders import ScriptedRunner, make_request, run_over_real_copies

LAYOUT = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 4, "dtype": "float32"}


class Tiers:
    """A scheduler over a store with 4-token blocks, a large device tier and small
    lower tiers; `serve` runs one request to its end and lands every copy."""

    def __init__(self, tmp_path: Path, real: bool, **kv: Any) -> None:
        settings = {
            "kv.block_size": 4, "kv.layout": LAYOUT, "kv.device.num_blocks": 64,
            "kv.disk.path": str(tmp_path / "kv.slab"),
            "scheduler.max_num_batched_tokens": 8,  # a prefill of two blocks a step
            **{f"kv.{k}": v for k, v in kv.items()},
        }  # fmt: skip
        self.config = KVFlowConfig.from_dict({}, settings)
        self.real = real
        self.store = KVStore.with_tensors(self.config.kv) if real else KVStore(self.config.kv)
        self.scheduler = Scheduler(self.config, make_policy("fcfs", self.config), self.store)
        self.now = 0.0

    def serve(self, request: Request) -> list[int]:
        """Run `request` to its end; returns the keys of its full prompt blocks."""
        state = self.scheduler.add(request, self.now)
        if self.real:
            self.now += run_over_real_copies(self.scheduler, ScriptedRunner(), self.store)
        else:
            runner = ScriptedRunner(step_s=0.01)
            while self.scheduler.has_unfinished:
                plan = self.scheduler.plan(self.now)
                result = runner.execute(plan)
                self.now += result.duration_s
                self.scheduler.commit(plan, result, self.now)
        self.store.drain(self.now)
        self.scheduler.check_integrity()
        return state.block_keys[: len(request.prompt_token_ids) // 4]

    def tier(self, name: str) -> BlockPool:
        pool = {"cpu": self.store.cpu, "disk": self.store.disk}[name]
        assert pool is not None
        return pool


@pytest.fixture(params=[False, True], ids=["simulated", "real"])
def real(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def tiers_of(tmp_path: Path, real: bool) -> Iterator[Any]:
    made: list[Tiers] = []

    def make(**kv: Any) -> Tiers:
        made.append(Tiers(tmp_path, real, **kv))
        return made[-1]

    yield make
    for tiers in made:
        tiers.store.close()


def prompt(n_blocks: int, base: int) -> Request:
    return make_request(4 * n_blocks, max_new_tokens=2, base=base)


def test_a_write_through_cpu_tier_keeps_an_old_prompts_root(tiers_of: Any) -> None:
    tiers = tiers_of(**{"write_policy": "write_through", "cpu.num_blocks": 8})
    old = tiers.serve(prompt(6, base=1000))
    assert tiers.tier("cpu").count_prefix(old) == 6

    new = tiers.serve(prompt(4, base=5000))  # 10 blocks for 8 slots: two must go

    cpu = tiers.tier("cpu")
    assert cpu.count_prefix(new) == 4
    assert cpu.count_prefix(old) == 4  # the old prompt lost its two tail blocks
    assert cpu.num_cached_blocks == 8
    tiers.store.device.reset_prefix_cache()
    assert tiers.store.locate(old).cpu_tokens == 16


def test_a_written_through_disk_tier_keeps_an_old_prompts_root(tiers_of: Any) -> None:
    tiers = tiers_of(**{"write_policy": "write_through", "cpu.num_blocks": 8, "disk.num_blocks": 8})
    old = tiers.serve(prompt(6, base=1000))
    new = tiers.serve(prompt(4, base=5000))

    for name in ("cpu", "disk"):
        pool = tiers.tier(name)
        assert (pool.count_prefix(old), pool.count_prefix(new)) == (4, 4), name


def test_a_later_turns_blocks_go_before_the_earlier_turns(tiers_of: Any) -> None:
    """write_back: the second turn's new blocks land in cpu after the first turn's, and
    the conversation is still evicted from its tail."""
    tiers = tiers_of(**{"write_policy": "write_back", "cpu.num_blocks": 8})
    first = prompt(4, base=1000)
    tiers.serve(first)
    second = make_request([*first.prompt_token_ids, *range(3000, 3016)], max_new_tokens=2)
    conversation = tiers.serve(second)
    assert tiers.tier("cpu").count_prefix(conversation) == 8

    tiers.serve(prompt(4, base=5000))

    assert tiers.tier("cpu").count_prefix(conversation) == 4
