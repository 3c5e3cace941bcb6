"""The planner's search and cost arithmetic, the prices file, and the plan table."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from rich.console import Console

from kvflow.cluster.plan import FleetEvaluation, fleet_cost
from kvflow.cluster.plan_search import (
    Candidate,
    LoadPlan,
    SizePlan,
    evaluate_split,
    priced,
    search_size,
)
from kvflow.cluster.prices import GpuPrice, PricesError, load_prices, pick_gpu
from kvflow.traces.tables import render_plan_table


def _evaluation(
    n: int, attainment: float, pd: tuple[int, int] | None = None, **fields: float
) -> FleetEvaluation:
    num_requests = 1000
    met = round(attainment * num_requests)
    return FleetEvaluation(
        rate_scale=1.0,
        num_instances=n,
        num_requests=num_requests,
        num_met=met,
        num_ttft_missed=int(fields.get("ttft", num_requests - met)),
        num_tpot_missed=int(fields.get("tpot", 0)),
        num_unserved=int(fields.get("unserved", 0)),
        num_preemptions=0,
        output_tokens_per_s=fields.get("tokens_per_s", 1000.0),
        goodput_rps=fields.get("goodput", 1.0),
        pd=pd,
    )


class _Recorder:
    """Evaluates colocated sizes by a given attainment curve and records each batch of
    sizes asked for."""

    def __init__(self, curve: Callable[[int], float]) -> None:
        self.curve = curve
        self.batches: list[list[int]] = []

    def __call__(self, fleets: Sequence[Candidate]) -> list[FleetEvaluation]:
        assert all(f.pd is None for f in fleets)
        self.batches.append([f.num_instances for f in fleets])
        return [_evaluation(f.num_instances, self.curve(f.num_instances)) for f in fleets]


class _SplitRecorder:
    """Evaluates splits (P, D) by a given attainment curve and records each batch."""

    def __init__(self, curve: Callable[[int, int], float]) -> None:
        self.curve = curve
        self.batches: list[list[tuple[int, int]]] = []

    def __call__(self, fleets: Sequence[Candidate]) -> list[FleetEvaluation]:
        splits = []
        for f in fleets:
            assert f.pd is not None and sum(f.pd) == f.num_instances
            splits.append(f.pd)
        self.batches.append(splits)
        return [_evaluation(p + d, self.curve(p, d), (p, d)) for p, d in splits]


def _decode_bound(need_p: int, need_d: int) -> Callable[[int, int], float]:
    """Meets the target (0.95) with at least `need_p` prefill and `need_d` decode
    instances; below that, the fewer instances short, the closer."""

    def curve(p: int, d: int) -> float:
        short = max(0, need_p - p) + max(0, need_d - d)
        return 0.95 if short == 0 else 0.8 - 0.1 * short

    return curve


@pytest.mark.parametrize("answer", [1, 2, 3, 5, 7, 8, 13, 16])
@pytest.mark.parametrize("jobs", [1, 2, 3, 8])
def test_search_finds_the_smallest_size_and_replays_the_one_below(answer: int, jobs: int) -> None:
    evaluate = _Recorder(lambda n: 0.95 if n >= answer else 0.5 * n / answer)
    plan = search_size(evaluate, 1.0, 0.9, max_instances=16, jobs=jobs)
    assert plan.num_instances == answer
    assert plan.meeting is not None and plan.meeting.attainment >= 0.9
    if answer > 1:
        assert plan.below is not None and plan.below.num_instances == answer - 1
        assert plan.below.attainment < 0.9
    assert plan.monotone
    sizes = [n for batch in evaluate.batches for n in batch]
    assert len(sizes) == len(set(sizes))  # no size replayed twice
    assert all(len(batch) <= jobs for batch in evaluate.batches)
    assert len(evaluate.batches) <= 5 + 4  # log-many rounds: the ladder, then bisection
    if jobs == 1:
        assert len(sizes) <= 5 + 4  # never all 16


def test_search_starts_exponentially() -> None:
    evaluate = _Recorder(lambda n: 1.0 if n >= 5 else 0.0)
    search_size(evaluate, 1.0, 0.9, max_instances=64, jobs=1)
    assert evaluate.batches[:4] == [[1], [2], [4], [8]]
    assert evaluate.batches[4:] == [[6], [5]]


def test_an_unreachable_target_gives_no_size_and_the_evaluation_at_the_maximum() -> None:
    plan = search_size(_Recorder(lambda n: 0.1 * n), 1.0, 0.9, max_instances=6, jobs=2)
    assert plan.num_instances is None
    assert plan.meeting is None
    assert plan.below is not None and plan.below.num_instances == 6
    assert [e.num_instances for e in plan.evaluations] == [1, 2, 4, 6]


def test_a_non_monotone_curve_is_reported() -> None:
    # 2 meets, 4 does not, 8 meets: all three replayed in the ladder's one batch.
    curve = {1: 0.0, 2: 0.95, 4: 0.5, 8: 0.95}
    plan = search_size(_Recorder(lambda n: curve[n]), 1.0, 0.9, max_instances=8, jobs=4)
    assert plan.num_instances == 2
    assert not plan.monotone


def test_the_binding_constraint_is_what_failed_most() -> None:
    assert _evaluation(2, 0.5, ttft=300, tpot=200).binding_constraint() == "ttft"
    assert _evaluation(2, 0.5, ttft=10, tpot=490).binding_constraint() == "tpot"
    assert _evaluation(2, 0.5, ttft=10, tpot=10, unserved=480).binding_constraint() == "memory"
    assert _evaluation(2, 1.0).binding_constraint() == "-"


def test_cost_arithmetic_by_hand() -> None:
    gpu = GpuPrice("x", price_per_gpu_hour=2.5, gpus_per_instance=4)
    cost = fleet_cost(gpu, _evaluation(3, 1.0, tokens_per_s=1000.0, goodput=2.0))
    assert cost.num_gpus == 12
    assert cost.dollars_per_hour == pytest.approx(30.0)  # 3 x 4 x 2.5
    # 30 $/h over 1000 tok/s x 3600 s = 3.6 M tokens/h: 8.333 $ per million
    assert cost.dollars_per_million_output_tokens == pytest.approx(30.0 / 3.6)
    assert cost.goodput_per_dollar == pytest.approx(2.0 * 3600 / 30.0)  # 240 requests / $
    idle = fleet_cost(gpu, _evaluation(1, 1.0, tokens_per_s=0.0))
    assert idle.dollars_per_million_output_tokens is None


def test_the_shipped_prices_are_labelled_examples_and_name_real_presets() -> None:
    from kvflow.cluster.prices import default_prices_path

    text = default_prices_path().read_text()
    assert "EXAMPLE" in text and "edit for your provider" in text.lower()
    prices = load_prices()
    assert {"h100", "4xh100"} <= set(prices)
    h100 = prices["h100"]
    assert h100.config_overrides() == {
        "sim.preset": "llama3-8b-h100",
        "kv.device.num_blocks": h100.device_blocks,
    }
    assert prices["4xh100"].price_per_instance_hour == pytest.approx(
        4 * prices["4xh100"].price_per_gpu_hour
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[gpu.a\nprice = 1", "does not parse"),
        ("[other]\nx = 1\n", "no [gpu.NAME] tables"),
        ("[gpu.a]\nprice_per_gpu_hour = -1\n", "gpu.a.price_per_gpu_hour"),
        ("[gpu.a]\nprice_per_gpu_hour = 1\ngpus_per_instance = 0\n", "gpu.a.gpus_per_instance"),
        ("[gpu.a]\nprice_per_gpu_hour = 1\nsim_preset = 'nope'\n", "'nope' is not a known"),
        ("[gpu.a]\nprice_per_gpu_hour = 1\ncolour = 'red'\n", "unknown key 'colour'"),
    ],
)
def test_a_bad_prices_file_names_the_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(PricesError, match="prices file") as err:
        load_prices(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_a_missing_prices_file_and_an_unknown_gpu() -> None:
    with pytest.raises(PricesError, match=re.escape("cannot read prices file '/nonexistent.toml'")):
        load_prices("/nonexistent.toml")
    with pytest.raises(PricesError, match="unknown gpu 'b200' in here; known: 4xh100, cpu, h100"):
        pick_gpu(load_prices(), "b200", "here")


def _render(loads: Sequence[LoadPlan], width: int) -> list[str]:
    console = Console(width=width, record=True, file=None)
    with console.capture() as captured:
        console.print(render_plan_table(loads, width))
    return captured.get().splitlines()


def test_the_plan_table_fits_100_columns() -> None:
    gpu = GpuPrice("x", 2.5)
    met = search_size(_Recorder(lambda n: 1.0 if n >= 3 else 0.2), 2.0, 0.9, 16)
    unmet = search_size(_Recorder(lambda n: 0.1), 4.0, 0.9, 4)
    lines = _render([LoadPlan(priced(gpu, met)), LoadPlan(priced(gpu, unmet))], 100)
    assert max(len(line) for line in lines) <= 100
    text = "\n".join(lines)
    assert "x2" in text and "x4" in text and "> 4" in text and "7.50" in text
    assert "colocated" not in text  # no P:D rows, no fleet column: the table as before


def test_the_plan_table_has_a_split_row_per_load_and_marks_the_cheaper() -> None:
    gpu = GpuPrice("x", 2.5)
    colocated = search_size(_Recorder(lambda n: 1.0 if n >= 5 else 0.2), 2.0, 0.9, 16)
    split = search_size(_SplitRecorder(_decode_bound(1, 3)), 2.0, 0.9, 16, jobs=4, pd=True)
    colocated_x4 = search_size(_Recorder(lambda n: 1.0 if n >= 9 else 0.2), 4.0, 0.9, 16)
    missed = evaluate_split(_SplitRecorder(_decode_bound(1, 3)), 4.0, 0.9, (2, 1))
    loads = [
        LoadPlan(priced(gpu, colocated), priced(gpu, split)),
        LoadPlan(priced(gpu, colocated_x4), priced(gpu, missed)),
    ]
    assert loads[0].cheaper() == "pd"  # 4 instances against 5, at the same tokens/s
    assert loads[1].cheaper() is None
    lines = _render(loads, 100)
    assert max(len(line) for line in lines) <= 100
    rows = [line for line in lines if "colocated" in line or "P:" in line]
    assert len(rows) == 4
    assert "1P:3D" in rows[1] and "yes" in rows[1] and "10.00" in rows[1]  # 4 x 2.50 $/h
    assert "yes" not in rows[0] and "12.50" in rows[0]
    assert rows[2].startswith("x4") and "9" in rows[2]
    assert "2P:1D" in rows[3] and "> 3" in rows[3]  # the fixed split, and it missed
    assert "60.0%" in next(line for line in _render(loads, 160) if "2P:1D" in line)


@pytest.mark.parametrize(("need_p", "need_d"), [(1, 1), (1, 3), (2, 5), (4, 4), (6, 1)])
@pytest.mark.parametrize("jobs", [1, 2, 7])
@pytest.mark.parametrize("hint", [None, 2, 5, 16])
def test_split_search_finds_the_smallest_total_and_replays_every_split_below(
    need_p: int, need_d: int, jobs: int, hint: int | None
) -> None:
    evaluate = _SplitRecorder(_decode_bound(need_p, need_d))
    plan = search_size(evaluate, 1.0, 0.9, max_instances=16, jobs=jobs, pd=True, hint=hint)
    total = need_p + need_d
    assert plan.pd and plan.num_instances == total
    assert plan.meeting is not None and plan.meeting.pd == (need_p, need_d)  # the only one
    asked = [split for batch in evaluate.batches for split in batch]
    assert len(asked) == len(set(asked))  # no split replayed twice
    assert all(sum(split) >= 2 for split in asked)
    # every split of the answer's total and of the one below was replayed
    for size in (total, total - 1):
        if size >= 2:
            assert {(p, size - p) for p in range(1, size)} <= set(asked)
    if total > 2:
        assert plan.below is not None and plan.below.num_instances == total - 1
        assert plan.below.attainment < 0.9
    else:
        assert plan.below is None
    assert plan.monotone
    # a round holds at most `jobs` fleets, or the splits of one total
    for batch in evaluate.batches:
        assert len(batch) <= jobs or len({sum(split) for split in batch}) == 1
    # totals probed: the hint, a ladder (2, 4, 8, 16; or the hint +- 1, 2, 4, 8 and the
    # end) and a bisection, never every total
    assert len({sum(split) for split in asked}) <= (4 if hint is None else 1 + 5) + 3


@pytest.mark.parametrize("total", [2, 3, 6, 16])
def test_a_right_hint_replays_the_answer_and_the_total_below_only(total: int) -> None:
    evaluate = _SplitRecorder(_decode_bound(1, total - 1))
    plan = search_size(evaluate, 1.0, 0.9, max_instances=16, jobs=2, pd=True, hint=total)
    assert plan.num_instances == total
    totals = {sum(split) for batch in evaluate.batches for split in batch}
    assert totals == {total, total - 1} - {1}
    assert evaluate.batches[0] == [(p, total - p) for p in range(1, total)]  # the hint first


def test_split_search_picks_the_best_split_of_the_total() -> None:
    # every split of 5 meets; 2:3 has the highest attainment, 3:2 ties it on attainment
    # but has more goodput and wins
    def curve(p: int, d: int) -> float:
        return {(2, 3): 0.97, (3, 2): 0.97}.get((p, d), 0.92 if p + d >= 5 else 0.5)

    class _Goodput(_SplitRecorder):
        def __call__(self, fleets: Sequence[Candidate]) -> list[FleetEvaluation]:
            return [
                _evaluation(e.num_instances, e.attainment, e.pd, goodput=float(e.pd[0]))
                if e.pd is not None
                else e
                for e in super().__call__(fleets)
            ]

    plan = search_size(_Goodput(curve), 1.0, 0.9, max_instances=8, jobs=2, pd=True)
    assert plan.num_instances == 5
    assert plan.meeting is not None and plan.meeting.pd == (3, 2)


def test_split_search_that_never_meets_reports_the_best_split_at_the_maximum() -> None:
    plan = search_size(
        _SplitRecorder(lambda p, d: 0.1 * p + 0.01 * d), 1.0, 0.9, max_instances=6, pd=True
    )
    assert plan.num_instances is None and plan.meeting is None
    assert plan.below is not None and plan.below.pd == (5, 1)
    assert sorted({e.num_instances for e in plan.evaluations}) == [2, 4, 6]
    with pytest.raises(ValueError, match="max_instances must be >= 2"):
        search_size(_SplitRecorder(lambda p, d: 1.0), 1.0, 0.9, max_instances=1, pd=True)


def test_a_fixed_split_is_one_replay() -> None:
    evaluate = _SplitRecorder(_decode_bound(1, 3))
    met = evaluate_split(evaluate, 2.0, 0.9, (1, 3))
    assert met.num_instances == 4 and met.below is None and met.monotone
    missed = evaluate_split(evaluate, 2.0, 0.9, (1, 2))
    assert missed.num_instances is None and missed.meeting is None
    assert missed.below is not None and missed.below.pd == (1, 2)
    assert evaluate.batches == [[(1, 3)], [(1, 2)]]


def test_size_plan_is_frozen() -> None:
    plan = SizePlan(1.0, 0.9, 1, 1, (_evaluation(1, 1.0),))
    with pytest.raises(AttributeError):
        plan.num_instances = 2  # type: ignore[misc]
