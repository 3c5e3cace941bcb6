"""The scheduler's invariants: its queues, its requests' blocks and the pool's
refcounts must add up (`Scheduler.check_integrity`, `Scheduler.num_leaked_blocks`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvflow.kv.block_pool import IntegrityError
from kvflow.request import RequestStatus

if TYPE_CHECKING:
    from kvflow.scheduler.core import Scheduler


def num_leaked_blocks(sched: Scheduler) -> int:
    """Blocks still referenced beyond what active requests hold (0 unless a bug)."""
    held = {b for r in (*sched.running, *sched.loading.values()) for b in r.block_ids}
    held.update(b for block_ids in sched.kv_manager.deferred for b in block_ids)
    return sched.pool.num_used_blocks - len(held)


def check_integrity(sched: Scheduler) -> None:
    """Raise `IntegrityError` when the queues, the requests' blocks and the pool's
    refcounts disagree."""
    problems: list[str] = []
    refs = [0] * sched.pool.num_blocks
    bs = sched.block_size
    running, waiting, loading = sched.running, sched.waiting, sched.loading
    if len(running) > sched.sched_config.max_num_seqs:
        problems.append(f"{len(running)} running > max_num_seqs")
    ids = [r.request_id for r in running]
    if len(set(ids)) != len(ids) or set(ids) & set(waiting):
        problems.append("a request is running twice or both running and waiting")
    if sched.queues.active_ids != {*ids, *waiting, *loading}:
        problems.append("the active ids disagree with the waiting, loading and running queues")
    for r in running:
        if r.status is not RequestStatus.RUNNING:
            problems.append(f"{r.request_id} is in running with status {r.status.name}")
        if len(r.block_ids) != -(-r.num_computed_tokens // bs):
            problems.append(
                f"{r.request_id} holds {len(r.block_ids)} blocks for "
                f"{r.num_computed_tokens} computed tokens"
            )
        if not r.num_sealed_blocks <= len(r.block_ids):
            problems.append(f"{r.request_id} sealed more blocks than it holds")
        for b in r.block_ids:
            refs[b] += 1
    load_waits = sched._loads.waits
    for rid, r in loading.items():
        if r.status is not RequestStatus.WAITING_FOR_KV or rid not in load_waits:
            problems.append(f"{rid} is loading with status {r.status.name}")
        if len(r.block_ids) != -(-r.num_computed_tokens // bs):
            problems.append(f"loading {rid} holds {len(r.block_ids)} blocks")
        for b in r.block_ids:
            refs[b] += 1
    for rid, r in waiting.items():
        if rid != r.request_id or r.block_ids or r.num_computed_tokens:
            problems.append(f"waiting {rid} holds blocks or computed tokens")
        if r.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            problems.append(f"{rid} is waiting with status {r.status.name}")
    for block_ids in sched.kv_manager.deferred:
        for b in block_ids:
            refs[b] += 1
    if problems:
        raise IntegrityError("; ".join(problems[:10]))
    sched.store.check_integrity(refs)
