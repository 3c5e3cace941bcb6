"""Token sampling: greedy, or temperature / top-k / top-p with reproducible seeds.

A seeded request draws each output token from a fresh generator seeded by
(`SamplingParams.seed`, output index), so its tokens do not depend on which other
requests shared its steps, on chunking, or on preemption and recompute, nor on its
request id: as in vLLM, the same prompt with the same seed gives the same tokens in any
request (a server's request ids are random). Requests without a seed draw from the
sampler's own generator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from kvflow.request import RequestState, SamplingParams, TokenLogprobs


def sample_seed(seed: int, output_index: int) -> int:
    """A stable 63-bit seed for one draw (the same in every process and on every machine)."""
    digest = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Scale by 1/temperature, then keep the top-k, then the smallest top-p nucleus
    (in that order, as transformers applies its warpers); the rest become -inf.

    Args:
        logits: [vocab_size] logits of one request; temperature must be > 0.
    """
    logits = logits / params.temperature
    vocab_size = logits.shape[-1]
    if 0 < params.top_k < vocab_size:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    """Picks one token per row of logits for the requests that sample in a step.

    Args:
        device: where the logits live (generators are created there).
        seed: seeds the generator shared by requests without their own seed.
    """

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._unseeded = torch.Generator(device=device).manual_seed(seed)

    def sample(self, logits: Tensor, requests: Sequence[RequestState]) -> list[int]:
        """Tokens for `requests` from `logits` [len(requests), vocab_size].

        The output index of each draw is the request's current number of output tokens
        (the index of the token being sampled).
        """
        if logits.shape[0] != len(requests):
            raise ValueError(f"{logits.shape[0]} rows of logits for {len(requests)} requests")
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(requests) if r.request.sampling.temperature > 0]
        if random_rows:
            tokens = tokens.clone()
            for i in random_rows:
                tokens[i] = self._draw(logits[i], requests[i])
        return [int(t) for t in tokens.tolist()]

    @staticmethod
    def logprobs(
        logits: Tensor, requests: Sequence[RequestState], tokens: Sequence[int]
    ) -> list[TokenLogprobs | None] | None:
        """The log-probabilities of `tokens` (sampled from `logits` for `requests`) and
        of the most likely tokens, for the requests that asked (`SamplingParams.logprobs`);
        None when none did. They are of the raw logits (before temperature, top-k and
        top-p, as vLLM's default), computed in at least float32."""
        asked = [i for i, r in enumerate(requests) if r.request.sampling.logprobs is not None]
        if not asked:
            return None
        rows = logits[asked]
        rows = torch.log_softmax(rows.to(torch.promote_types(rows.dtype, torch.float32)), -1)
        out: list[TokenLogprobs | None] = [None] * len(requests)
        for row, i in zip(rows, asked, strict=True):
            k = min(requests[i].request.sampling.logprobs or 0, row.shape[-1])
            top: tuple[tuple[int, float], ...] = ()
            if k:
                values, ids = torch.topk(row, k)
                top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
            out[i] = TokenLogprobs(float(row[tokens[i]]), top)
        return out

    def _draw(self, logits: Tensor, state: RequestState) -> Tensor:
        params = state.request.sampling
        probs = filter_logits(logits.to(torch.float32), params).softmax(-1)
        if params.seed is None:
            gen = self._unseeded
        else:
            seed = sample_seed(params.seed, state.num_output_tokens)
            gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.multinomial(probs, 1, generator=gen)[0]
