"""Regenerate the bundled sample traces: ``python -m kvflow.traces.make_sample [--out DIR]``.

- ``sample.jsonl`` ("shared-prefix", the default): a shared-prefix workload where a
  queue forms, so that cache-aware policies have something to reorder: 64 system
  prompts of 1024 tokens, more than the default device tier (4096 blocks of 16 tokens)
  holds beside the running requests, and two tenants with their own SLOs and
  priorities (t0 interactive, t1 batch-like).
- ``multiturn.jsonl`` ("multi-turn"): 100 conversations (5 per second) of 2 to 5 turns
  whose prompts carry the whole history, 3 s apart, from two tenants ("chat"
  interactive, "agent" batch-like); the open conversations' histories outgrow the
  default device tier and a queue forms, so which requests go first and which
  histories stay cached matters.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from kvflow.request import SLO
from kvflow.traces import bundled_samples
from kvflow.traces.distributions import LogNormal, Poisson, Uniform
from kvflow.traces.native import TraceRecord, dump_native
from kvflow.traces.synthetic import (
    TenantSpec,
    WorkloadSpec,
    generate_workload,
    shared_prefix_workload,
)

NUM_REQUESTS = 400
NUM_GROUPS = 64
PREFIX_LEN = 1024
SUFFIX_LEN = (32, 256)
OUTPUT_LEN = (16, 128)
RATE_RPS = 60.0
TENANT_SLOS = (
    SLO(ttft_ms=500.0, tpot_ms=50.0),  # t0: interactive
    SLO(ttft_ms=2000.0, tpot_ms=150.0),  # t1: batch-like
)
TENANT_PRIORITIES = (0, 1)
SEED = 0

MULTI_TURN = WorkloadSpec(
    num_sessions=100,
    prompt_len=LogNormal(400, 0.8, 4096),
    output_len=LogNormal(150, 0.7, 1024),
    arrivals=Poisson(5.0),
    turns=Uniform(2, 5),
    think_time_s=3.0,
    tenants=(
        TenantSpec("chat", weight=3.0, slo=SLO(ttft_ms=1000.0, tpot_ms=50.0), priority=0),
        TenantSpec("agent", weight=1.0, slo=SLO(ttft_ms=3000.0, tpot_ms=100.0), priority=1),
    ),
    seed=0,
)
"""The multi-turn sample's workload."""


def build_sample() -> list[TraceRecord]:
    """The records of the bundled shared-prefix sample (the default)."""
    return shared_prefix_workload(
        NUM_REQUESTS,
        num_groups=NUM_GROUPS,
        prefix_len=PREFIX_LEN,
        suffix_len=SUFFIX_LEN,
        output_len=OUTPUT_LEN,
        rate_rps=RATE_RPS,
        num_tenants=len(TENANT_SLOS),
        tenant_slos=TENANT_SLOS,
        tenant_priorities=TENANT_PRIORITIES,
        seed=SEED,
    )


def build_multi_turn_sample() -> list[TraceRecord]:
    """The records of the bundled multi-turn sample."""
    return generate_workload(MULTI_TURN)


BUILDERS = {"shared-prefix": build_sample, "multi-turn": build_multi_turn_sample}
"""How each bundled sample is made, by its name in `bundled_samples()`."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvflow.traces.make_sample")
    parser.add_argument(
        "--out",
        type=Path,
        help="write into this directory instead of the package's data directory",
    )
    parser.add_argument(
        "--only", choices=sorted(BUILDERS), help="regenerate one sample (default: all)"
    )
    args = parser.parse_args(argv)
    for name, path in bundled_samples().items():
        if args.only is not None and name != args.only:
            continue
        target = args.out / path.name if args.out is not None else path
        records = BUILDERS[name]()
        dump_native(records, target)
        print(f"wrote {len(records)} requests ({name}) to {target}")


if __name__ == "__main__":
    main()
