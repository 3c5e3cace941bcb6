"""`kvflow.LLM.generate` with vLLM's `SamplingParams` on a model that has no tokenizer:
token-id prompts need none (their output has no text); text prompts and stop strings
do, and say so in one line naming the directory or the field."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import kvflow
from kvflow.engine import EngineClosedError
from kvflow.engine_adapters.hf import save_random_hf_llama
from kvflow.engine_adapters.torch import LlamaSpec
from kvflow.request import FinishReason, SamplingParams

SPEC = LlamaSpec(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    dtype="float64",
)
SETTINGS = {"kv.block_size": 4, "kv.device.num_blocks": 32}
PROMPTS = [[5, 6, 7, 8, 9], [5, 6, 7, 1]]


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory with weights and config, and no tokenizer files."""
    path = tmp_path_factory.mktemp("no-tokenizer")
    save_random_hf_llama(SPEC, path, seed=2, init_std=0.3)
    assert not list(path.glob("tokenizer*"))
    return path


@pytest.fixture(scope="module")
def llm(bare_dir: Path) -> Any:
    with kvflow.LLM(bare_dir, dtype="float64", settings=SETTINGS) as llm:
        yield llm


def test_token_id_prompts_with_sampling_params_need_no_tokenizer(llm: kvflow.LLM) -> None:
    expected = llm.generate(PROMPTS, max_new_tokens=6)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=6))
    assert [o.token_ids for o in outputs] == expected
    assert all(len(ids) == 6 for ids in expected)
    for out in outputs:
        assert out.finish_reason is FinishReason.LENGTH
        assert out.text == ""  # no tokenizer: no text to give
    [same] = llm.generate(PROMPTS[:1], sampling_params=SamplingParams(max_tokens=6))
    assert same.token_ids == expected[0]


def test_stop_token_ids_work_without_a_tokenizer(llm: kvflow.LLM) -> None:
    [full] = llm.generate(PROMPTS[:1], max_new_tokens=6)
    stop = full[2]
    [out] = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=6, stop_token_ids=[stop]))
    assert out.token_ids == full[: full.index(stop) + 1]
    assert out.finish_reason is FinishReason.STOP


def test_one_sampling_params_per_prompt_as_in_vllm(llm: kvflow.LLM) -> None:
    expected = [
        llm.generate([p], SamplingParams(max_tokens=n))
        for p, n in zip(PROMPTS, (2, 5), strict=True)
    ]
    outputs = llm.generate(PROMPTS, [SamplingParams(max_tokens=2), SamplingParams(max_tokens=5)])
    assert [o.token_ids for o in outputs] == [e.token_ids for [e] in expected]
    assert [len(o.token_ids) for o in outputs] == [2, 5]
    [same] = llm.generate(PROMPTS[:1], sampling_params=[SamplingParams(max_tokens=2)])
    assert same.token_ids == outputs[0].token_ids
    with pytest.raises(ValueError, match=r"2 prompts but 1 SamplingParams"):
        llm.generate(PROMPTS, [SamplingParams(max_tokens=2)])
    with pytest.raises(TypeError, match=r"sampling_params\[1\] is a dict, not a SamplingParams"):
        llm.generate(PROMPTS, [SamplingParams(), {"max_tokens": 2}])  # type: ignore[arg-type, list-item]


def test_a_closed_llm_refuses_to_generate(bare_dir: Path) -> None:
    llm = kvflow.LLM(bare_dir, dtype="float64", settings=SETTINGS)
    assert len(llm.generate(PROMPTS[:1], max_new_tokens=2)[0]) == 2
    llm.close()
    llm.close()  # closing twice is harmless
    for call in (
        lambda: llm.generate(PROMPTS, max_new_tokens=2),
        lambda: llm.generate(PROMPTS, SamplingParams(max_tokens=2)),
        lambda: llm.generate_outputs(PROMPTS, max_new_tokens=2),
    ):
        with pytest.raises(EngineClosedError, match="this LLM is closed"):
            call()


def test_text_needs_a_tokenizer_and_says_which_directory_lacks_one(
    llm: kvflow.LLM, bare_dir: Path
) -> None:
    with pytest.raises(ValueError, match="text prompts need a tokenizer") as err:
        llm.generate("Once upon a time", SamplingParams(max_tokens=4))
    assert f"the model directory {str(bare_dir)!r} has none" in str(err.value)
    with pytest.raises(ValueError, match=r"stop=\('\\n',\): stop strings need a tokenizer"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=4, stop=("\n",)))


def test_a_loaded_model_without_a_tokenizer_takes_token_ids(bare_dir: Path) -> None:
    from kvflow.engine_adapters.torch import TorchLlama

    model = TorchLlama.from_pretrained(bare_dir, dtype="float64")
    with kvflow.LLM(model, settings=SETTINGS) as llm:
        [out] = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3))
        assert len(out.token_ids) == 3 and out.text == ""
        with pytest.raises(ValueError, match="text prompts need a tokenizer"):
            llm.chat([{"role": "user", "content": "hi"}])


LOWER_LAYERS = ("config", "request", "kv", "peer", "policies", "scheduler", "engine_adapters")
LIBRARY = (*LOWER_LAYERS, "engine", "llm", "registry", "gc_pause", "__init__")


def test_the_library_layer_does_not_import_the_server_layer() -> None:
    """DESIGN.md's layers: nothing below `serve` imports `kvflow.serve`."""
    root = Path(kvflow.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0].removesuffix(".py") not in LIBRARY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{rel}: {n}" for n in names if n.startswith("kvflow.serve")]
    assert offenders == []


def test_a_tokenizer_that_does_not_load_is_a_one_line_error_naming_the_directory(
    bare_dir: Path, tmp_path: Path
) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bare_dir, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with (
        kvflow.LLM(broken, dtype="float64", settings=SETTINGS) as llm,
        pytest.raises(ValueError, match="no loadable tokenizer") as err,
    ):
        llm.generate(PROMPTS, SamplingParams(max_tokens=2))
    assert str(broken) in str(err.value) and "\n" not in str(err.value)
