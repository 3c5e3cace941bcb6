"""Synthetic workloads: arrival processes, length distributions, sessions, tenants."""

from __future__ import annotations

import itertools
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvflow.request import SLO
from kvflow.traces import bundled_sample_path, bundled_samples, dump_native
from kvflow.traces.distributions import (
    AllAtOnce,
    Empirical,
    Fixed,
    Gamma,
    LogNormal,
    Poisson,
    Uniform,
    as_length_dist,
    length_trace_path,
    parse_length,
)
from kvflow.traces.make_sample import build_multi_turn_sample
from kvflow.traces.native import TraceRecord, read_native
from kvflow.traces.synthetic import (
    SystemPrompts,
    TenantSpec,
    WorkloadSpec,
    gamma_arrivals,
    generate_workload,
    poisson_arrivals,
    shared_prefix_workload,
)
from kvflow.traces.tokens import group_prefix_token_ids


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def gap_cv(times: list[float]) -> float:
    gaps = [b - a for a, b in itertools.pairwise([0.0, *times])]
    return statistics.pstdev(gaps) / statistics.fmean(gaps)


# --- arrivals -----------------------------------------------------------------------------


def test_gamma_arrivals_keep_the_rate_and_set_the_burstiness() -> None:
    bursty = gamma_arrivals(4000, 20.0, 3.0, seed=1)
    poisson = poisson_arrivals(4000, 20.0, seed=1)
    regular = gamma_arrivals(4000, 20.0, 0.25, seed=1)
    for times in (bursty, poisson, regular):
        assert times == sorted(times) and times[0] > 0
        assert 4000 / times[-1] == pytest.approx(20.0, rel=0.1)
    assert gap_cv(bursty) == pytest.approx(3.0, rel=0.15)
    assert gap_cv(poisson) == pytest.approx(1.0, rel=0.1)
    assert gap_cv(regular) == pytest.approx(0.25, rel=0.1)
    assert gamma_arrivals(10, 5.0, 2.0, seed=1) == gamma_arrivals(10, 5.0, 2.0, seed=1)
    assert gamma_arrivals(10, 5.0, 2.0, seed=1) != gamma_arrivals(10, 5.0, 2.0, seed=2)
    assert AllAtOnce().times(3, random.Random(0)) == [0.0, 0.0, 0.0]
    for bad in ((0.0, 1.0), (1.0, 0.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="must be > 0"):
            Gamma(*bad)
    with pytest.raises(ValueError, match="rate_rps"):
        Poisson(-1.0)


# --- lengths ------------------------------------------------------------------------------


def test_length_distributions_sample_within_their_bounds() -> None:
    rng = random.Random(0)
    assert {Fixed(7).sample(rng) for _ in range(10)} == {7}
    assert {Uniform(3, 5).sample(rng) for _ in range(200)} == {3, 4, 5}
    lognormal = [LogNormal(100, 1.0, 400).sample(rng) for _ in range(4000)]
    assert min(lognormal) >= 1 and max(lognormal) == 400  # clipped
    assert statistics.median(lognormal) == pytest.approx(100, rel=0.1)
    empirical = Empirical((5, 5, 9))
    assert Counter(empirical.sample(rng) for _ in range(3000))[5] == pytest.approx(2000, rel=0.1)


def test_lengths_sampled_from_a_trace_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    dump_native(
        [
            TraceRecord(request_id=f"r{i}", arrival_s=0.0, output_len=o, prompt_len=p)
            for i, (p, o) in enumerate([(10, 1), (20, 2), (30, 3)])
        ],
        path,
    )
    assert parse_length(f"trace:{path}", "prompt") == Empirical((10, 20, 30), str(path))
    assert parse_length(f"trace:{path}", "output") == Empirical((1, 2, 3), str(path))


def test_only_a_trace_spelling_names_a_trace_file() -> None:
    assert length_trace_path("trace:runs/a:b.jsonl") == "runs/a:b.jsonl"
    for spelling in ("trace:", "128", "32:256", "lognormal:512:0.8", "tracer:x"):
        assert length_trace_path(spelling) is None, spelling


def test_parse_length_spellings() -> None:
    assert parse_length("128") == Fixed(128)
    assert parse_length("32:256") == parse_length("uniform:32:256") == Uniform(32, 256)
    assert parse_length("lognormal:512:0.8") == LogNormal(512, 0.8)
    assert parse_length("lognormal:512:0.8:4096") == LogNormal(512, 0.8, 4096)
    for dist in (Fixed(3), Uniform(1, 2), LogNormal(5, 0.5, 9)):
        assert parse_length(dist.spec()) == dist
    for bad in ("", "x", "5:1", "lognormal:1", "lognormal:0:1", "-3", "gauss:1:2"):
        with pytest.raises(ValueError, match="bad length"):
            parse_length(bad)
    with pytest.raises(ValueError, match="suffix_len must be"):
        as_length_dist("suffix_len", 0)
    with pytest.raises(ValueError, match="suffix_len must be"):
        as_length_dist("suffix_len", (5, 2))


def test_shared_prefix_workload_takes_distributions() -> None:
    records = shared_prefix_workload(
        50, num_groups=2, prefix_len=8, suffix_len=LogNormal(20, 0.5, 40), output_len=3, seed=4
    )
    assert {r.output_len for r in records} == {3}
    assert all(9 <= r.num_prompt_tokens <= 48 for r in records)


# --- sessions -----------------------------------------------------------------------------


def test_single_turn_sessions_share_exactly_their_system_prompt() -> None:
    spec = WorkloadSpec(
        num_sessions=30,
        prompt_len=Uniform(5, 50),
        output_len=Fixed(4),
        arrivals=Poisson(10.0),
        system_prompts=SystemPrompts(3, 64),
        seed=2,
    )
    records = generate_workload(spec)
    assert [r.request_id for r in records] == [f"r{i}" for i in range(30)]
    assert {r.prefix_group for r in records} == {"s2-g0", "s2-g1", "s2-g2"}
    assert all(r.prefix_len == 64 and 69 <= r.num_prompt_tokens <= 114 for r in records)
    requests = [r.to_request() for r in records]
    for a, b in itertools.combinations(zip(records, requests, strict=True), 2):
        shared = common_prefix_len(a[1].prompt_token_ids, b[1].prompt_token_ids)
        assert shared == (64 if a[0].prefix_group == b[0].prefix_group else 0)


def test_multi_turn_sessions_carry_their_history_with_think_time() -> None:
    spec = WorkloadSpec(
        num_sessions=6,
        prompt_len=Uniform(10, 30),
        output_len=Uniform(5, 15),
        arrivals=Poisson(1.0),
        turns=Uniform(2, 4),
        think_time_s=2.5,
        seed=7,
    )
    records = generate_workload(spec)
    assert [r.arrival_s for r in records] == sorted(r.arrival_s for r in records)
    assert "prompt_token_ids" not in str([r.to_json() for r in records])  # compact
    sessions: dict[str, list[TraceRecord]] = {}
    for r in records:
        sessions.setdefault(r.request_id.split("-")[0], []).append(r)
    assert len(sessions) == 6 and all(2 <= len(s) <= 4 for s in sessions.values())
    for turns in sessions.values():
        turns.sort(key=lambda r: int(r.request_id.split("-")[1]))
        tokens = [r.to_request().prompt_token_ids for r in turns]
        for k in range(1, len(turns)):
            assert turns[k].arrival_s == pytest.approx(turns[0].arrival_s + 2.5 * k, abs=1e-6)
            before, now = turns[k - 1], turns[k]
            # history = previous prompt + its output; then 10..30 new user tokens
            assert 10 <= now.num_prompt_tokens - before.num_prompt_tokens - before.output_len <= 30
            assert tokens[k][: len(tokens[k - 1])] == tokens[k - 1]
    firsts = [s[0].to_request().prompt_token_ids for s in sessions.values()]
    assert all(common_prefix_len(a, b) == 0 for a, b in itertools.combinations(firsts, 2))


def test_multi_turn_sessions_under_system_prompts_share_exactly_those() -> None:
    spec = WorkloadSpec(
        num_sessions=8,
        prompt_len=Fixed(20),
        output_len=Fixed(10),
        arrivals=AllAtOnce(),
        turns=Fixed(3),
        system_prompts=SystemPrompts(2, 48),
        seed=1,
    )
    records = generate_workload(spec)
    assert all(r.prompt_token_ids is not None for r in records)
    by_session: dict[str, list[tuple[int, ...]]] = {}
    for r in records:
        assert r.prompt_token_ids is not None
        by_session.setdefault(r.request_id.split("-")[0], []).append(r.prompt_token_ids)
    for turns in by_session.values():
        assert [len(t) for t in turns] == [68, 98, 128]  # 48 + 20, + 10 + 20, ...
        assert turns[1][:68] == turns[0] and turns[2][:98] == turns[1]
    systems = {g: group_prefix_token_ids(f"s1-g{g}", 48) for g in (0, 1)}
    firsts = [turns[0] for turns in by_session.values()]
    assert {t[:48] for t in firsts} == set(systems.values())
    for a, b in itertools.combinations(firsts, 2):
        assert common_prefix_len(a, b) == (48 if a[:48] == b[:48] else 0)


def test_tenants_bring_their_slos_priorities_and_shares() -> None:
    tenants = (
        TenantSpec("chat", weight=3.0, slo=SLO(ttft_ms=200.0, tpot_ms=20.0), priority=0),
        TenantSpec("batch", weight=1.0, slo=SLO(ttft_ms=5000.0), priority=2),
    )
    spec = WorkloadSpec(400, Fixed(10), Fixed(5), arrivals=Poisson(50.0), tenants=tenants)
    records = generate_workload(spec)
    counts = Counter(r.tenant for r in records)
    assert 2.4 < counts["chat"] / counts["batch"] < 3.8
    for r in records:
        tenant = tenants[0] if r.tenant == "chat" else tenants[1]
        assert (r.priority, r.ttft_slo_ms, r.tpot_slo_ms) == (
            tenant.priority,
            tenant.slo.ttft_ms,
            tenant.slo.tpot_ms,
        )
    # Another tenant mix does not move arrivals or lengths.
    alone = generate_workload(WorkloadSpec(400, Fixed(10), Fixed(5), arrivals=Poisson(50.0)))
    assert [r.arrival_s for r in alone] == [r.arrival_s for r in records]
    assert generate_workload(spec) == records


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_sessions": -1}, "num_sessions"),
        ({"prompt_len": Fixed(0)}, "prompt_len"),
        ({"turns": Fixed(0)}, "turns"),
        ({"think_time_s": -1.0}, "think_time_s"),
        ({"tenants": ()}, "at least one tenant"),
        ({"tenants": (TenantSpec("a"), TenantSpec("a"))}, "unique"),
    ],
)
def test_bad_workload_specs_are_refused(overrides: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"num_sessions": 1, "prompt_len": Fixed(1), "output_len": Fixed(1)}
    with pytest.raises(ValueError, match=message):
        WorkloadSpec(**(args | overrides))  # type: ignore[arg-type]


# --- bundled samples ----------------------------------------------------------------------


def test_the_multi_turn_sample_is_what_make_sample_generates(tmp_path: Path) -> None:
    samples = bundled_samples()
    assert samples["shared-prefix"] == bundled_sample_path()
    path = tmp_path / "multiturn.jsonl"
    dump_native(build_multi_turn_sample(), path)
    assert path.read_bytes() == samples["multi-turn"].read_bytes()
    records = read_native(samples["multi-turn"])
    assert 250 <= len(records) <= 400
    assert {r.tenant for r in records} == {"chat", "agent"}
    assert len({r.prefix_group for r in records}) == 100  # one history per conversation
