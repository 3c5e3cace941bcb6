"""`kvflow synth` never writes a trace that `kvflow replay` cannot read: parameters that
would give lengths over the trace cap, or more than the RAM can hold, are refused before
anything is written; what it does write reads back."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvflow.cli import main
from kvflow.traces.distributions import Fixed, LogNormal
from kvflow.traces.formats import load_trace
from kvflow.traces.limits import MAX_TRACE_TOKENS
from kvflow.traces.synthetic import SystemPrompts, WorkloadSpec, check_workload

ABSURD = {
    "prompt": (["--prompt-len", "100000000"], "prompt_len='100000000'"),
    "output": (["--output-len", str(10**18)], "output_len='1000000000000000000'"),
    "turns": (["--turns", "1000000", "--prompt-len", "100"], "turns='1000000'"),
    "system": (
        ["--system-prompts", "2", "--system-prompt-len", "20000000"],
        "system_prompt_len=20000000",
    ),
    "unbounded": (["--prompt-len", "lognormal:100:50", "-n", "5"], "session 0, turn 0"),
    "sessions": (["-n", str(10**12), "--prompt-len", "1"], "RAM available"),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_parameters_are_refused_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    args, needle = ABSURD[case]
    out = tmp_path / "w.jsonl"
    assert main(["synth", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvflow: error: ") and needle in err[0]
    assert not out.exists()


def spec(prompt: int, output: int, turns: int, system: int) -> WorkloadSpec:
    return WorkloadSpec(
        num_sessions=1,
        prompt_len=Fixed(prompt),
        output_len=Fixed(output),
        turns=Fixed(turns),
        system_prompts=SystemPrompts(1, system),
    )


def test_the_longest_prompt_may_be_exactly_the_cap() -> None:
    # system + 3 prompts + 2 outputs (the last turn's output is not in any prompt)
    check_workload(spec(1000, 500, 3, MAX_TRACE_TOKENS - 4000))
    with pytest.raises(ValueError, match="prompts of up to 16777217 tokens"):
        check_workload(spec(1000, 500, 3, MAX_TRACE_TOKENS - 3999))
    check_workload(spec(1, MAX_TRACE_TOKENS, 1, 1))
    with pytest.raises(ValueError, match="output_len='16777217'"):
        check_workload(spec(1, MAX_TRACE_TOKENS + 1, 1, 1))


def test_an_unbounded_length_that_draws_past_the_cap_stops_generation() -> None:
    from kvflow.traces.synthetic import generate_workload

    wild = WorkloadSpec(num_sessions=3, prompt_len=LogNormal(100, 60), output_len=Fixed(1))
    with pytest.raises(ValueError, match=r"session \d+, turn 0: a prompt of \d+ tokens"):
        generate_workload(wild)


LENGTH = st.one_of(
    st.integers(1, 3000),
    st.integers(MAX_TRACE_TOKENS + 1, 10**18),  # absurd: refused, never written
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    num_sessions=st.integers(0, 4),
    turns=st.integers(1, 3),
    prompt=LENGTH,
    output=LENGTH,
    num_system=st.integers(0, 2),
    system_len=LENGTH,
    out_format=st.sampled_from(["native", "mooncake"]),
)
def test_what_synth_writes_replay_reads(
    tmp_path_factory: pytest.TempPathFactory,
    num_sessions: int,
    turns: int,
    prompt: int,
    output: int,
    num_system: int,
    system_len: int,
    out_format: str,
) -> None:
    out = tmp_path_factory.mktemp("synth") / ("w.jsonl" if out_format == "native" else "m.jsonl")
    args = ["synth", str(out), "-n", str(num_sessions), "--turns", str(turns)]
    args += ["--prompt-len", str(prompt), "--output-len", str(output), "--format", out_format]
    if num_system:
        args += ["--system-prompts", str(num_system), "--system-prompt-len", str(system_len)]
    code = main(args)
    longest = (system_len if num_system else 0) + turns * prompt + (turns - 1) * output
    if max(longest, output) > MAX_TRACE_TOKENS or num_sessions == 0:  # 0: nothing to write
        assert code == 2 and not out.exists()
        return
    assert code == 0
    requests = load_trace(out, format=out_format)
    assert len(requests) == num_sessions * turns
    assert all(len(r.prompt_token_ids) <= MAX_TRACE_TOKENS for r in requests)
    assert all(r.max_new_tokens == output for r in requests)
