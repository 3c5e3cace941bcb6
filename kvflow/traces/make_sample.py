"""Regenerate the bundled sample trace: ``python -m kvflow.traces.make_sample [--out PATH]``.

A shared-prefix workload where a queue forms, so that cache-aware policies have
something to reorder: 64 system prompts of 1024 tokens, more than the default device
tier (4096 blocks of 16 tokens) holds beside the running requests, and two tenants
with their own SLOs and priorities (t0 interactive, t1 batch-like).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from kvflow.request import SLO
from kvflow.traces import bundled_sample_path
from kvflow.traces.native import TraceRecord, dump_native
from kvflow.traces.synthetic import shared_prefix_workload

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


def build_sample() -> list[TraceRecord]:
    """The records of the bundled sample."""
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvflow.traces.make_sample")
    parser.add_argument("--out", type=Path, default=bundled_sample_path(), help="output file")
    args = parser.parse_args(argv)
    records = build_sample()
    dump_native(records, args.out)
    print(f"wrote {len(records)} requests to {args.out}")


if __name__ == "__main__":
    main()
