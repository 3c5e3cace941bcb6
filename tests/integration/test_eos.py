"""Generation stops where the model says: at the end-of-sequence token(s) a checkpoint's
`generation_config.json` / `config.json` name, with finish reason `stop` and the EOS
token as the last output token (as vLLM and transformers' `generate` do), unless the
request sets `ignore_eos`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import kvflow  # noqa: E402
from kvflow.engine_adapters.factory import build_runner, load_model  # noqa: E402
from kvflow.engine_adapters.hf import save_random_hf_llama  # noqa: E402
from kvflow.request import FinishReason, Request  # noqa: E402
from kvflow.traces.realtime import replay_realtime  # noqa: E402
from tests.integration.test_exactness import SPEC  # noqa: E402

MAX_NEW = 12
SETTINGS = {"kv.block_size": 4, "kv.device.num_blocks": 64}


def greedy(model: Any, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False
    )
    tokens: list[int] = out[0, len(prompt) :].tolist()
    return tokens


def set_eos(model_dir: Path, eos: int | list[int], files: tuple[str, ...]) -> None:
    for name in files:
        path = model_dir / name
        doc = json.loads(path.read_text()) if path.exists() else {}
        doc["eos_token_id"] = eos
        path.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list[int], list[int]]:
    """A tiny random Llama without EOS, a prompt, and its greedy output."""
    path = tmp_path_factory.mktemp("eos-model")
    model = save_random_hf_llama(SPEC, path, seed=3, init_std=0.2)
    prompt = [5, 17, 33, 2, 101, 7, 64]
    return path, model, prompt, greedy(model, prompt)


def first_new_token_at(tokens: list[int], min_step: int) -> int:
    """The first step >= min_step whose token did not occur earlier in `tokens`."""
    return next(k for k in range(min_step, len(tokens)) if tokens[k] not in tokens[:k])


@pytest.fixture(scope="module")
def early_eos(
    plain: tuple[Path, Any, list[int], list[int]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, int, int]:
    """The same checkpoint with its EOS set to the token greedy decoding makes at step k
    (in both files, as real checkpoints have it: a list beside an unused id in
    generation_config.json, an int in config.json). Returns (dir, k, eos)."""
    src, _, _, tokens = plain
    path = tmp_path_factory.mktemp("early-eos")
    for f in src.iterdir():
        shutil.copy(f, path / f.name)
    k = first_new_token_at(tokens, 3)
    unused = next(t for t in range(SPEC.vocab_size) if t not in tokens)
    set_eos(path, tokens[k], ("config.json",))
    set_eos(path, [unused, tokens[k]], ("generation_config.json",))
    return path, k, tokens[k]


@pytest.fixture(scope="module")
def reference(
    plain: tuple[Path, Any, list[int], list[int]], early_eos: tuple[Path, int, int]
) -> list[int]:
    """transformers' greedy output of the early-EOS checkpoint."""
    from transformers import AutoModelForCausalLM

    return greedy(AutoModelForCausalLM.from_pretrained(str(early_eos[0])), plain[2])


@pytest.mark.parametrize("engine", ["torch", "hf"])
def test_generation_stops_at_the_models_eos_like_transformers(
    plain: tuple[Path, Any, list[int], list[int]],
    early_eos: tuple[Path, int, int],
    reference: list[int],
    engine: Literal["torch", "hf"],
) -> None:
    _, _, prompt, tokens = plain
    path, k, eos = early_eos
    assert reference == tokens[: k + 1]  # transformers stops at the EOS too, keeping it
    with kvflow.LLM(path, engine=engine, settings=SETTINGS, dtype="float32") as llm:
        (out,) = llm.generate_outputs([prompt], max_new_tokens=MAX_NEW)
        assert out.token_ids == reference and out.token_ids[-1] == eos
        assert out.finish_reason is FinishReason.STOP
        (ignored,) = llm.generate_outputs([prompt], max_new_tokens=MAX_NEW, ignore_eos=True)
    assert ignored.token_ids == tokens and ignored.finish_reason is FinishReason.LENGTH


def test_trace_replay_on_a_real_engine_keeps_the_traces_lengths(
    plain: tuple[Path, Any, list[int], list[int]], early_eos: tuple[Path, int, int]
) -> None:
    _, _, prompt, _ = plain
    path, _, _ = early_eos
    requests = [Request(f"t{i}", tuple(prompt), MAX_NEW, arrival_time=0.01 * i) for i in range(3)]
    built = build_runner(load_model(path, "torch", "float32"), SETTINGS)
    assert built.runner.model_info.eos_token_ids  # the model would stop at step k
    try:
        result = replay_realtime(requests, built.config, "fcfs", built.runner, built.store)
    finally:
        built.store.close()
    assert [s.num_output_tokens for s in result.states] == [MAX_NEW] * 3
    assert all(s.finish_reason is FinishReason.LENGTH for s in result.states)
