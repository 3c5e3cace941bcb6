"""How a request ends, decided in the pure scheduler so the simulator and the real
engine agree: at a stop token or the model's EOS (unless `ignore_eos`) at commit, as
rejected when the model cannot serve it, as aborted with its id free at once and its
blocks released after the running step; a checkpoint's EOS tokens as transformers reads
them; prompt entries that are not token ids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvflow.config import KVFlowConfig
from kvflow.engine_adapters.eos import read_eos_token_ids
from kvflow.engine_adapters.simulated import LatencyModel, SimulatedRunner
from kvflow.request import FinishReason, Request, SamplingParams
from kvflow.scheduler import ModelInfo, Scheduler
from kvflow.traces.replay import make_policy, replay
from tests.builders import ScriptedRunner, make_config, make_request, run_to_completion

EOS = 7


def scheduler_for(model: ModelInfo | None = None) -> Scheduler:
    config = make_config(**{"kv.block_size": 4, "kv.device.num_blocks": 64})
    return Scheduler(config, make_policy("fcfs", config), model=model)


@pytest.mark.parametrize(
    ("sampling", "model", "num_tokens", "reason", "detail"),
    [
        (SamplingParams(), ModelInfo(eos_token_ids=(3, EOS)), 1, FinishReason.STOP, "eos token 7"),
        (SamplingParams(ignore_eos=True), ModelInfo(eos_token_ids=(EOS,)), 5, FinishReason.LENGTH,
         ""),
        (SamplingParams(stop_token_ids=[EOS]), None, 1, FinishReason.STOP, "stop token 7"),
        (SamplingParams(stop_token_ids=[EOS], ignore_eos=True), ModelInfo(eos_token_ids=(EOS,)), 1,
         FinishReason.STOP, "stop token 7"),
        (SamplingParams(), None, 5, FinishReason.LENGTH, ""),
    ],
)  # fmt: skip
def test_commit_stops_at_eos_unless_ignored_and_at_stop_tokens(
    sampling: SamplingParams,
    model: ModelInfo | None,
    num_tokens: int,
    reason: FinishReason,
    detail: str,
) -> None:
    sched = scheduler_for(model)
    state = sched.add(make_request(10, 5, sampling=sampling))
    run_to_completion(sched, ScriptedRunner(token=EOS))
    assert state.output_token_ids == [EOS] * num_tokens  # the stop token is kept
    assert state.finish_reason is reason and state.finish_detail == detail
    assert sched.num_leaked_blocks() == 0


def test_the_length_limit_wins_over_an_eos_on_the_last_token_as_in_vllm() -> None:
    sched = scheduler_for(ModelInfo(eos_token_ids=(EOS,)))
    state = sched.add(make_request(10, 1))
    run_to_completion(sched, ScriptedRunner(token=EOS))
    assert state.finish_reason is FinishReason.LENGTH and state.num_output_tokens == 1


def test_the_simulator_has_no_eos_so_outputs_keep_their_lengths() -> None:
    requests = [make_request(12, 4 + i, base=100 * i) for i in range(6)]
    runner = SimulatedRunner(LatencyModel(1.0, 0.0, 0.0, 0.0))
    result = replay(requests, KVFlowConfig(), "fcfs", runner)
    assert [s.num_output_tokens for s in result.states] == [4 + i for i in range(6)]
    assert runner.model_info.eos_token_ids == ()


def test_model_info_rejects_what_the_model_cannot_serve() -> None:
    info = ModelInfo(vocab_size=100, max_position_embeddings=32)
    assert info.rejection(Request("a", (1, 2, 3), 4)) is None
    reason = info.rejection(Request("a", (1, 100, 3), 4))
    assert reason is not None and "prompt_token_ids[1] = 100" in reason and "100" in reason
    reason = info.rejection(Request("a", (1,) * 30, 4))
    assert reason is not None and "34" in reason and "max_position_embeddings (32)" in reason
    sched = scheduler_for(info)
    state = sched.add(Request("b", (1, 2, 500), 4))
    assert state.finish_reason is FinishReason.REJECTED and "vocabulary" in state.finish_detail


@pytest.mark.parametrize(
    ("stops", "message"),
    [([-1], "-1"), ([1.5], "1.5"), ([True], "True")],
)
def test_sampling_params_take_token_ids_as_stop_tokens(stops: list[object], message: str) -> None:
    with pytest.raises(ValueError, match="stop_token_ids") as err:
        SamplingParams(stop_token_ids=stops)  # type: ignore[arg-type]
    assert message in str(err.value)
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": math.nan}, "temperature must be a finite number >= 0, got nan"),
        ({"temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
        ({"temperature": "0.5"}, "temperature must be a finite number >= 0, got '0.5'"),
        ({"top_p": math.nan}, "top_p must be in (0, 1], got nan"),
        ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
        ({"top_k": -2}, "top_k must be an int >= 0 (or -1, vLLM's no-filter), got -2"),
        ({"top_k": 1.5}, "top_k must be an int >= 0 (or -1, vLLM's no-filter), got 1.5"),
        ({"top_k": True}, "top_k must be an int >= 0 (or -1, vLLM's no-filter), got True"),
        ({"max_tokens": 2.5}, "max_tokens must be an int >= 1, got 2.5"),
        ({"max_tokens": 0}, "max_tokens must be an int >= 1, got 0"),
        ({"seed": 1.5}, "seed must be an int or None, got 1.5"),
        ({"seed": "7"}, "seed must be an int or None, got '7'"),
        ({"logprobs": 2.0}, "logprobs must be None or an int >= 0, got 2.0"),
        ({"logprobs": -1}, "logprobs must be None or an int >= 0, got -1"),
    ],
)
def test_sampling_params_name_a_bad_value(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(**fields)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_top_k_minus_one_is_no_filter_as_in_vllm() -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=-1) == SamplingParams()
    assert SamplingParams(top_k=5, seed=3, max_tokens=4, logprobs=0).top_k == 5


@pytest.mark.parametrize(
    ("generation", "config", "expected"),
    [
        ({"eos_token_id": [2, 9]}, {"eos_token_id": 2}, (2, 9)),
        ({"pad_token_id": 0}, {"eos_token_id": 5}, (5,)),
        (None, {"eos_token_id": 5}, (5,)),
        ({}, {"eos_token_id": None}, ()),
        (None, {}, ()),
    ],
)
def test_a_checkpoints_eos_tokens_come_from_generation_config_then_config(
    tmp_path: Path, generation: dict[str, object] | None, config: dict[str, object],
    expected: tuple[int, ...],
) -> None:  # fmt: skip
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_eos_token_ids(tmp_path) == expected


def test_a_malformed_eos_token_id_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ValueError, match=r"config\.json.*eos_token_id.*'</s>'"):
        read_eos_token_ids(tmp_path)


@pytest.mark.parametrize("bad", [2.5, "7", -1, 2**32, None])
def test_a_request_names_a_prompt_entry_that_is_not_a_token_id(bad: object) -> None:
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] = .* is not a token id"):
        Request("a", (1, bad, 3), 4)  # type: ignore[arg-type]


def test_an_abort_during_a_step_frees_the_id_at_once_and_the_blocks_after_it() -> None:
    sched = scheduler_for()
    first = sched.add(make_request(10, 5, request_id="x"))
    plan = sched.plan(0.0)  # "x" holds blocks; a runner would now read them
    held = list(first.block_ids)
    assert sched.abort("x", 0.1, defer_release=True) is first
    assert first.finish_reason is FinishReason.ABORTED and first.block_ids == []
    again = sched.add(make_request(10, 2, request_id="x"), 0.1)  # the id is free
    sched.check_integrity()  # the deferred blocks count as held
    assert sched.pool.num_used_blocks == len(held) and sched.num_leaked_blocks() == 0
    sched.commit(plan, ScriptedRunner().execute(plan), 0.2)  # the old entry is skipped
    sched.release_deferred(0.2)
    sched.check_integrity()
    run_to_completion(sched)
    assert again.num_output_tokens == 2 and again.finish_reason is FinishReason.LENGTH
    assert sched.pool.num_used_blocks == 0
