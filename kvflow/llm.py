"""The offline API, in the shape users know from vLLM:

    llm = kvflow.LLM(model="path/to/llama", settings={"kv.device.num_blocks": 64})
    outputs = llm.generate([[1, 2, 3], [1, 2, 4]], max_new_tokens=16)   # token ids
    outputs = llm.generate(["Hello", "Hi"], SamplingParams(max_tokens=16))  # text
    outputs = llm.chat([{"role": "user", "content": "Hello"}])             # chat template

It runs the same `AsyncEngine` as online serving underneath, over a tiered store whose
device tier is the runner's KV cache, so prefix hits persist across `generate` calls.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import anyio

from kvflow.config import KVFlowConfig
from kvflow.engine import AsyncEngine, EngineClosedError, RequestFailedError
from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.factory import build_runner, load_model, run_blocking
from kvflow.engine_adapters.text import HFTextCodec, OutputText, TextCodec
from kvflow.kv.store import KVStore
from kvflow.request import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
    first_bad_token,
)


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    """One prompt's result, with timings in seconds."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    num_cached_tokens: int
    ttft_s: float | None
    e2e_s: float | None
    text: str = ""
    """The output as text (`generate` with text or `SamplingParams`, and `chat`; empty
    for a model without a tokenizer)."""
    logprobs: list[TokenLogprobs] | None = None
    """One per output token, when `SamplingParams.logprobs` asked for them."""


class LLM:
    """A model behind kvflow's scheduler, for batch generation.

    Args:
        model: a checkpoint directory (`config.json` + `*.safetensors`), or a loaded
            `TorchLlama` (engine "torch") or transformers model (engine "hf").
        engine: "torch" (kvflow's paged-attention runner) or "hf" (transformers).
        settings: dotted config keys, as `kvflow replay --set` takes them.
        policy: scheduling policy name.
        dtype: compute dtype for a model loaded from a directory (e.g. "float64").
        seed: default sampling seed.
        overlap: plan each step while the previous one runs (see `AsyncEngine`).
        tokenizer: a transformers tokenizer for text prompts and `chat` (default: the
            one saved in the `model` directory, loaded on first use). Token-id prompts
            need none (their outputs' `text` is then empty).
    """

    def __init__(
        self,
        model: str | Path | Any,
        *,
        engine: Literal["torch", "hf"] = "torch",
        settings: Mapping[str, Any] | None = None,
        policy: str = "fcfs",
        dtype: str | None = None,
        seed: int = 0,
        overlap: bool = True,
        tokenizer: Any = None,
    ) -> None:
        self.policy = policy
        self._model_source = model
        self._codec: HFTextCodec | None = None if tokenizer is None else HFTextCodec(tokenizer)
        self._no_codec: str | None = None
        """Why there is no tokenizer, once looked for and none found."""
        self.overlap = overlap
        self.num_overlapped_steps = 0
        """Steps planned while the previous one ran, over all `generate` calls."""
        self.num_preemptions = 0
        """Requests preempted, over all `generate` calls."""
        self._ids = itertools.count()
        self._closed = False
        built = build_runner(load_model(model, engine, dtype), settings, seed=seed)
        self.config: KVFlowConfig = built.config
        self.store: KVStore = built.store
        self.runner: ModelRunner = built.runner

    @overload
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
    ) -> list[list[int]]: ...

    @overload
    def generate(
        self,
        prompts: str | Sequence[str],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]: ...

    @overload
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams],
    ) -> list[CompletionOutput]: ...

    def generate(
        self, prompts: Any, *args: Any, **kwargs: Any
    ) -> list[list[int]] | list[CompletionOutput]:
        """Output token ids per prompt, in prompt order, for token-id prompts and the
        sampling keywords (`max_new_tokens`, `temperature`, ... as `generate_outputs`);
        or, as vLLM's `generate`, for text prompts (a string or a list) or a
        `SamplingParams` (`max_tokens`, `stop`, `ignore_eos`, ...) as the second
        argument or `sampling_params=`, one for every prompt or a list of one per
        prompt: one `CompletionOutput` with `text` and `token_ids` per prompt.
        Generation stops after `max_new_tokens` (`max_tokens`), or at a stop token or
        one of the model's end-of-sequence tokens (kept as the last output token),
        unless `ignore_eos` (see `SamplingParams`).

        Raises:
            ValueError: a bad argument or a prompt the model or the configuration cannot
                serve (an empty one, a token id outside the vocabulary, more tokens than
                the model's positions or `scheduler.max_model_len`, more blocks than the
                device tier); the message names the argument (`prompt_token_ids[i]`)
                and quotes the value. Nothing is generated then.
            RequestFailedError: the runner raised while executing a step (the error is
                its `__cause__`).
            EngineClosedError: the LLM is closed.
        """
        params = kwargs.pop("sampling_params", None)
        if params is None and args and _is_sampling(args[0]):
            params, args = args[0], args[1:]
        if params is None and not isinstance(prompts, str) and not _has_text(prompts):
            outs = self.generate_outputs(prompts, *args, **kwargs)
            return [o.token_ids for o in outs]
        if args or kwargs:
            raise TypeError(
                "generate(prompts, sampling_params) takes no other arguments; got "
                f"{len(args)} more positional and {sorted(kwargs)!r}"
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        per_prompt = _per_prompt(params, len(prompts))
        if _has_text(prompts):
            codec = self.codec
            ids = [codec.encode(p) if isinstance(p, str) else list(p) for p in prompts]
            return self._generate_text(ids, per_prompt, codec)
        # Token ids need no tokenizer: without one the outputs have no text.
        return self._generate_text(prompts, per_prompt, self._text_codec())

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[CompletionOutput]:
        """Generate replies to one conversation (a list of `{"role", "content"}`
        messages) or several, rendered by the tokenizer's chat template (as vLLM's
        `chat`); one `CompletionOutput` per conversation. A `content` may be OpenAI's
        list of parts (`[{"type": "text", "text": ...}]`), joined into one text.

        Raises:
            ValueError: a content part that is not text (naming it), or see `generate`.
        """
        conversations: Any = (
            [messages] if messages and isinstance(messages[0], Mapping) else messages
        )
        per_prompt = _per_prompt(sampling_params, len(conversations))
        codec = self.codec
        ids = [
            codec.encode_chat(
                [_text_message(m, i) for i, m in enumerate(conv)], add_generation_prompt
            )
            for conv in conversations
        ]
        return self._generate_text(ids, per_prompt, codec)

    @property
    def codec(self) -> HFTextCodec:
        """The tokenizer's text side (loaded from the model directory on first use).

        Raises:
            ValueError: no tokenizer was given and the model directory has none (or
                the model is not a directory), or the directory's does not load.
        """
        codec = self._text_codec()
        if codec is None:
            raise ValueError(self._no_codec)
        return codec

    def _text_codec(self) -> HFTextCodec | None:
        """The tokenizer's text side, or None when the model has no tokenizer.

        Raises:
            ValueError: the model directory's tokenizer files do not load.
        """
        if self._codec is None and self._no_codec is None:
            source = self._model_source
            if not isinstance(source, str | Path):
                self._no_codec = (
                    "text prompts need a tokenizer: pass LLM(..., tokenizer=...) with a "
                    "loaded model"
                )
            elif not HFTextCodec.saved_in(source):
                self._no_codec = (
                    f"text prompts need a tokenizer: the model directory {str(source)!r} "
                    "has none; pass LLM(..., tokenizer=...)"
                )
            else:
                self._codec = HFTextCodec.from_model_dir(source)
        return self._codec

    def _generate_text(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        codec: HFTextCodec | None,
    ) -> list[CompletionOutput]:
        """`generate` with `params[i]` for prompt i; `codec` None (no tokenizer):
        outputs without text."""
        eos = None if codec is None else codec.eos_token_id
        samplings = []
        for p in params:
            if codec is None and p.stop:
                raise ValueError(
                    f"stop={p.stop!r}: stop strings need a tokenizer ({self._no_codec})"
                )
            stop_ids = list(p.stop_token_ids or ())
            if eos is not None and not p.ignore_eos and eos not in stop_ids:
                stop_ids.append(eos)
            samplings.append(dataclasses.replace(p, stop_token_ids=tuple(stop_ids)))
        requests = [
            Request(
                f"llm-{next(self._ids)}",
                self._checked(i, prompt),
                sampling.max_tokens or 16,
                sampling=sampling,
            )
            for i, (prompt, sampling) in enumerate(zip(prompt_ids, samplings, strict=True))
        ]
        outputs: list[CompletionOutput] = run_blocking(self._serve, requests, codec)
        return outputs

    def generate_outputs(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
    ) -> list[CompletionOutput]:
        """Like `generate`, with finish reasons, cache hits and timings."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        sampling = SamplingParams(
            temperature, top_k, top_p, seed, stop_token_ids, ignore_eos=ignore_eos
        )
        requests = [
            Request(
                f"llm-{next(self._ids)}", self._checked(i, p), max_new_tokens, sampling=sampling
            )
            for i, p in enumerate(prompt_token_ids)
        ]
        outputs: list[CompletionOutput] = run_blocking(self._serve, requests)
        return outputs

    def _checked(self, index: int, prompt: Sequence[int]) -> tuple[int, ...]:
        """`prompt` as a tuple, or a ValueError naming `prompt_token_ids[index]`."""
        tokens = tuple(prompt)
        if not tokens:
            raise ValueError(f"prompt_token_ids[{index}] is empty")
        vocab_size = self.runner.model_info.vocab_size or 2**32
        bad = first_bad_token(tokens, vocab_size)
        if bad is not None:
            raise ValueError(
                f"prompt_token_ids[{index}][{bad[0]}] = {bad[1]!r} is not a token id of the "
                f"model's vocabulary (an int in [0, {vocab_size}))"
            )
        return tokens

    async def _serve(
        self, requests: list[Request], codec: TextCodec | None = None
    ) -> list[CompletionOutput]:
        """Run `requests` to their ends; with a `codec`, their outputs are decoded and
        cut at their stop strings as well."""
        if self._closed:
            raise EngineClosedError(
                "this LLM is closed (close() was called, or its `with` block ended); make a new one"
            )
        results: dict[str, CompletionOutput | RequestFailedError] = {}
        engine = AsyncEngine(
            self.config, self.runner, self.policy, self.store, overlap=self.overlap
        )
        # Refuse the whole call before anything runs: a rejected prompt has no output.
        for i, req in enumerate(requests):
            reason = engine.scheduler.rejection(req)
            if reason is not None:
                raise ValueError(f"prompt_token_ids[{i}]: {reason}")
        async with engine, anyio.create_task_group() as tg:
            for req in requests:
                tg.start_soon(self._collect, engine, req, results, codec)
        self.num_overlapped_steps += engine.num_overlapped_steps
        self.num_preemptions += engine.scheduler.stats.num_preemptions
        outputs = []
        for req in requests:
            result = results[req.request_id]
            if isinstance(result, RequestFailedError):
                raise result
            outputs.append(result)
        return outputs

    @staticmethod
    async def _collect(
        engine: AsyncEngine,
        request: Request,
        results: dict[str, CompletionOutput | RequestFailedError],
        codec: TextCodec | None = None,
    ) -> None:
        """Run `request`, its output into `results`; with a `codec`, its text decoded
        as the server streams it: a stop string (`request.sampling.stop`) ends the
        request (aborting the rest) and the text before it."""
        decoder = None if codec is None else OutputText(codec, request.sampling.stop)
        parts: list[str] = []
        tokens: list[int] = []
        logprobs: list[TokenLogprobs] = []
        last: RequestOutput | None = None
        stopped = False
        outputs = engine.generate(request)
        try:
            async for out in outputs:
                last = out
                kept = len(out.new_token_ids)
                if decoder is not None:
                    delta, finish = decoder.feed(out)
                    parts.append(delta)
                    kept = decoder.num_kept  # a stop string ends at the token completing it
                    stopped = finish == "stop"
                tokens.extend(out.new_token_ids[:kept])
                if out.logprobs is not None:
                    logprobs.extend(out.logprobs[:kept])
                if stopped:
                    break
        except RequestFailedError as err:  # raised once every prompt has ended
            results[request.request_id] = err
            return
        finally:
            await outputs.aclose()  # leaving early aborts the request
        assert last is not None  # a stream always ends with a final output
        results[request.request_id] = CompletionOutput(
            request_id=request.request_id,
            token_ids=tokens,
            finish_reason=FinishReason.STOP if stopped else last.finish_reason,
            num_cached_tokens=last.num_cached_tokens,
            ttft_s=last.ttft_s,
            e2e_s=last.e2e_s,
            text="".join(parts),
            logprobs=None if request.sampling.logprobs is None else logprobs,
        )

    def close(self) -> None:
        """Free the KV store; `generate` and `chat` then raise `EngineClosedError`."""
        if not self._closed:
            self._closed = True
            self.store.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _has_text(prompts: Any) -> bool:
    return bool(prompts) and isinstance(prompts[0], str)


def _is_sampling(value: object) -> bool:
    """A `SamplingParams`, or a list of them (one per prompt)."""
    if isinstance(value, list | tuple):
        return bool(value) and isinstance(value[0], SamplingParams)
    return isinstance(value, SamplingParams)


def _per_prompt(params: object, num_prompts: int) -> list[SamplingParams]:
    """`params` (None, one `SamplingParams`, or one per prompt) as one per prompt.

    Raises:
        ValueError: a list of another length than the prompts'.
        TypeError: an entry that is not a `SamplingParams`.
    """
    if params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    if not isinstance(params, list | tuple):
        raise TypeError(
            f"sampling_params is a {type(params).__name__}, not a SamplingParams or a list of them"
        )
    if len(params) != num_prompts:
        raise ValueError(
            f"{num_prompts} prompts but {len(params)} SamplingParams: give one for every "
            "prompt, or a single one for all"
        )
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling_params[{i}] is a {type(p).__name__}, not a SamplingParams")
    return list(params)


def _text_message(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A chat message with its `content` as one text (OpenAI's list of text parts
    joined, as `kvflow serve` takes it).

    Raises:
        ValueError: a part that is not `{"type": "text", "text": str}`, naming it.
    """
    out = dict(message)
    content = out.get("content")
    if isinstance(content, list | tuple):
        texts = []
        for j, part in enumerate(content):
            ok = isinstance(part, Mapping) and part.get("type") == "text"
            if not ok or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"messages[{index}].content[{j}]: only text parts are supported "
                    f'({{"type": "text", "text": ...}}), got {part!r}'
                )
            texts.append(part["text"])
        out["content"] = "".join(texts)
    return out


__all__ = ["LLM", "CompletionOutput"]
