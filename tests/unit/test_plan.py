"""The planner's search and cost arithmetic, the prices file, and the plan table."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from rich.console import Console

from kvflow.cluster.plan import FleetEvaluation, SizePlan, fleet_cost, search_size
from kvflow.cluster.prices import GpuPrice, PricesError, load_prices, pick_gpu
from kvflow.traces.tables import render_plan_table


def _evaluation(n: int, attainment: float, **fields: float) -> FleetEvaluation:
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
    )


class _Recorder:
    """Evaluates sizes by a given attainment curve and records each batch asked for."""

    def __init__(self, curve: Callable[[int], float]) -> None:
        self.curve = curve
        self.batches: list[list[int]] = []

    def __call__(self, sizes: Sequence[int]) -> list[FleetEvaluation]:
        self.batches.append(list(sizes))
        return [_evaluation(n, self.curve(n)) for n in sizes]


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


def test_the_plan_table_fits_100_columns() -> None:
    gpu = GpuPrice("x", 2.5)
    met = search_size(_Recorder(lambda n: 1.0 if n >= 3 else 0.2), 2.0, 0.9, 16)
    unmet = search_size(_Recorder(lambda n: 0.1), 4.0, 0.9, 4)
    rows = [(p, None if p.meeting is None else fleet_cost(gpu, p.meeting)) for p in (met, unmet)]
    console = Console(width=100, record=True, file=None)
    with console.capture() as captured:
        console.print(render_plan_table(rows, 100))
    lines = captured.get().splitlines()
    assert max(len(line) for line in lines) <= 100
    text = "\n".join(lines)
    assert "x2" in text and "x4" in text and "> 4" in text and "7.50" in text


def test_size_plan_is_frozen() -> None:
    plan = SizePlan(1.0, 0.9, 1, 1, (_evaluation(1, 1.0),))
    with pytest.raises(AttributeError):
        plan.num_instances = 2  # type: ignore[misc]
