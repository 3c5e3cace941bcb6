"""The README's Python snippets run as written and do what the text around them says.

Each ```python block of README.md is executed in a fresh namespace, in a temporary
directory. The one placeholder a reader must fill in, a checkpoint path, is replaced by
a tiny random Llama saved for the test; nothing else is changed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from kvflow.engine_adapters.hf import save_random_hf_llama
from kvflow.engine_adapters.torch import LlamaSpec
from kvflow.request import RequestState

README = Path(__file__).resolve().parents[2] / "README.md"
CHECKPOINT_PLACEHOLDER = "path/to/llama-checkpoint"
ASYNC_ENGINE_MARKER = 'AsyncEngine(config, runner, "lpm", store)'
"""The AsyncEngine snippet (the metrics snippet builds an AsyncEngine too)."""


def python_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def snippet(marker: str) -> str:
    found = [s for s in python_snippets() if marker in s]
    assert len(found) == 1, f"expected one README snippet containing {marker!r}"
    return found[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = LlamaSpec(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, max_position_embeddings=256, dtype="float32",
    )  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    save_random_hf_llama(spec, path, seed=3)
    return path


def run_snippet(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_every_snippet_is_covered_here() -> None:
    markers = [
        "replay(requests, config",
        "kvflow.LLM(",
        ASYNC_ENGINE_MARKER,
        "class ShortestPromptFirst",
        "from openai import OpenAI",
        "EngineMetrics(",
    ]
    assert len(python_snippets()) == len(markers)
    for marker in markers:
        snippet(marker)


def test_tour_serves_no_request_before_it_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = run_snippet(snippet("replay(requests, config"), tmp_path, monkeypatch)
    requests = ns["requests"]
    assert ns["result"].stats.prefix_hit_rate > 0
    scheduler = ns["scheduler"]
    assert not scheduler.has_unfinished
    states: list[RequestState] = ns["states"]
    assert len(states) == len(requests)
    for state in states:
        assert state.first_scheduled_time is not None
        assert state.first_scheduled_time >= state.arrival_time, state
        assert state.num_output_tokens == state.max_new_tokens
    # The loop jumps over idle gaps: the last request finishes soon after it arrives.
    assert ns["now"] >= requests[-1].arrival_time


def test_llm_snippet_generates(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = snippet("kvflow.LLM(").replace(CHECKPOINT_PLACEHOLDER, str(tiny_checkpoint))
    ns = run_snippet(code, tmp_path, monkeypatch)
    outputs = ns["outputs"]
    assert len(outputs) == 2
    assert all(len(o) == 32 for o in outputs)


def test_async_engine_snippet_streams(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    code = snippet(ASYNC_ENGINE_MARKER).replace(CHECKPOINT_PLACEHOLDER, str(tiny_checkpoint))
    run_snippet(code, tmp_path, monkeypatch)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 2
    assert lines[-1].endswith("True length")


def test_policy_snippet_replays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = run_snippet(snippet("class ShortestPromptFirst"), tmp_path, monkeypatch)
    result = ns["result"]
    assert [s.num_output_tokens for s in result.states] == [8, 8, 8]
    # One request at a time, shortest prompt first: r2 (100 tokens), r1, r0 (300).
    first = {s.request_id: s.first_token_time for s in result.states}
    assert first["r2"] < first["r1"] < first["r0"]


def test_openai_client_snippet_talks_to_a_sim_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from tests.serve_process import ServerProcess

    with ServerProcess(["--engine", "sim"], tmp_path / "serve.log") as server:
        code = snippet("from openai import OpenAI").replace(
            "http://127.0.0.1:8000", server.base_url
        )
        ns = run_snippet(code, tmp_path, monkeypatch)
    assert ns["out"].usage.completion_tokens >= 1
    out = capsys.readouterr().out
    assert re.search(r"(tok\d+ )+", out)


def test_engine_metrics_snippet_prints_kvflow_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    run_snippet(snippet("EngineMetrics("), tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert 'kvflow:generation_tokens_total{model_name="my-model"} 8.0' in out
    assert 'kvflow:request_success_total{finished_reason="length",model_name="my-model"} 1.0' in out
