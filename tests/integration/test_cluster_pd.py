"""Prefill/decode disaggregation in real processes: `kvflow cluster up --pd 1:1` with a
tiny random Llama in float64 (a `--role prefill` and a `--role decode` instance behind
a prefilling router), against a colocated instance of the same model. Greedy tokens
through the pair equal the colocated instance's; the decode instance pulls the prompt's
blocks (peer hits, no prefill of them there); the prefill instance's leases end once
pulled; a prefill instance killed mid-handoff leaves the decode instance recomputing."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster_process import Cluster, cluster, metric, wait_until
from tests.serve_process import ServerProcess

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.text_model import build_text_model

BLOCK_SIZE = 4
SETTINGS = {
    "kv.block_size": BLOCK_SIZE,
    "kv.device.num_blocks": 256,
    "kv.cpu.num_blocks": 256,
    "kv.load_policy": "always",
    "peer.pull_timeout_s": 5.0,  # generous on a loaded machine: a killed peer fails at once
    "peer.handoff_wait_s": 5.0,
    "peer.heartbeat_interval_s": 0.2,
}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"]
WORDS += ["kvflow", "schedulers", "decide"]  # 13: prompt(seed) starts apart for seed < 13


def prompt(seed: int, num_words: int = 30) -> str:
    return " ".join(WORDS[(seed * 5 + i * 3) % len(WORDS)] for i in range(num_words))


def settings() -> list[str]:
    return [a for key, value in SETTINGS.items() for a in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text-model")
    build_text_model(path, max_position_embeddings=256)
    return path


@pytest.fixture(scope="module")
def colocated_process(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Started before the cluster, loading beside it."""
    args = ["--engine", "torch", "--model", str(model_dir), "--dtype", "float64", *settings()]
    server = ServerProcess(args, tmp_path_factory.mktemp("colocated") / "serve.log")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def pd(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory, colocated_process: ServerProcess
) -> Iterator[Cluster]:
    args = ["--pd", "1:1", "--engine", "torch", "--model", str(model_dir), "--dtype", "float64"]
    with cluster(tmp_path_factory.mktemp("pd"), None, *args, *settings(), sim=False) as c:
        yield c


@pytest.fixture(scope="module")
def colocated(colocated_process: ServerProcess, pd: Cluster) -> str:
    colocated_process.wait_healthy()
    return colocated_process.base_url


def one(c: Cluster, role: str) -> dict[str, Any]:
    (proc,) = [p for p in c.instances if p["role"] == role]
    return proc


def complete(url: str, model: str, text: str, **fields: Any) -> httpx.Response:
    body = {"model": model, "prompt": text, "max_tokens": 8, "temperature": 0.0}
    body |= {"ignore_eos": True, **fields}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60.0)
    assert reply.status_code == 200, reply.text
    return reply


def test_greedy_tokens_through_a_pd_pair_equal_a_colocated_instances(
    pd: Cluster, colocated: str, model_dir: Path
) -> None:
    prefill, decode = one(pd, "prefill")["url"], one(pd, "decode")["url"]
    model = str(model_dir)
    num_cached = num_prompt = 0
    for seed in range(3):
        text = prompt(seed, 20 + 7 * seed)
        via = complete(pd.url, model, text)
        alone = complete(colocated, model, text)
        assert via.json()["choices"][0]["text"] == alone.json()["choices"][0]["text"]
        assert via.headers["x-kvflow-instance"] == decode
        usage = via.json()["usage"]
        num_prompt += usage["prompt_tokens"]
        num_cached += usage["prompt_tokens_details"]["cached_tokens"]
        assert usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"] <= 4
    messages = [{"role": "user", "content": prompt(7)}]
    chat = {"model": model, "messages": messages, "max_tokens": 6, "temperature": 0.0}
    chat |= {"ignore_eos": True}
    with httpx.stream("POST", f"{pd.url}/v1/chat/completions", json={**chat, "stream": True}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(
        httpx.Response(200, content=e[6:]).json()["choices"][0]["delta"].get("content") or ""
        for e in events
    )
    alone_chat = httpx.post(f"{colocated}/v1/chat/completions", json=chat, timeout=60.0)
    assert streamed == alone_chat.json()["choices"][0]["message"]["content"]
    # The decode instance pulled the prompts' blocks: peer hits, no prefill of them.
    peer_hits = metric(decode, "kvflow:prefix_cache_hits_by_tier_total", tier="peer")
    assert peer_hits >= num_cached > 0
    assert metric(decode, "kvflow:handoffs_received_total", outcome="ready") == 4
    assert metric(decode, "kvflow:peer_pull_failures_total") == 0
    assert metric(prefill, "kvflow:handoffs_kept_total") == 4
    assert metric(pd.url, "kvflow:router_prefills_total", outcome="handoff") == 4
    # Each lease ended when its blocks were pulled.
    wait_until("leases ended", lambda: metric(prefill, "kvflow:handoff_leases") == 0)
    pulled = metric(prefill, "kvflow:handoff_leases_ended_total", how="pulled")
    assert pulled == 4
    assert metric(prefill, "kvflow:peer_blocks_served_total") * BLOCK_SIZE == peer_hits


def test_a_prefill_instance_killed_mid_handoff_ends_in_recompute(
    pd: Cluster, colocated: str, model_dir: Path
) -> None:
    prefill, decode = one(pd, "prefill"), one(pd, "decode")["url"]
    model = str(model_dir)
    text = prompt(11, 40)
    ask = complete(prefill["url"], model, text, max_tokens=1, kvflow_handoff={"keep": True})
    ticket = ask.json()["kvflow_handoff"]
    assert ticket["num_tokens"] == len(ticket["block_keys"]) * BLOCK_SIZE > 0
    os.kill(prefill["pid"], signal.SIGKILL)  # after its answer, before the decode pulled
    hits = metric(decode, "kvflow:prefix_cache_hits_by_tier_total", tier="peer")
    taken = metric(decode, "kvflow:handoffs_received_total")
    recomputed = complete(decode, model, text, kvflow_handoff=ticket)
    alone = complete(colocated, model, text)
    assert recomputed.json()["choices"][0]["text"] == alone.json()["choices"][0]["text"]
    assert recomputed.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert metric(decode, "kvflow:prefix_cache_hits_by_tier_total", tier="peer") == hits
    assert metric(decode, "kvflow:handoffs_received_total") == taken + 1
    # Through the router too: the dead prefill instance leaves the rotation, the
    # decode instance computes the prompt.
    again = complete(pd.url, model, prompt(12))
    assert (
        again.json()["choices"][0]["text"]
        == complete(colocated, model, prompt(12)).json()["choices"][0]["text"]
    )
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    healthy = metric(pd.url, "kvflow:router_instance_healthy", instance=prefill["url"])
    assert healthy == 0
