"""From an OpenAI request body to an engine `Request`, and its outputs back to OpenAI
response objects: whole, or as server-sent events."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from kvflow.engine import AsyncEngine, EngineClosedError, EngineOverloadedError
from kvflow.engine_adapters.text import OutputText, TextCodec
from kvflow.request import (
    SLO,
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    first_bad_token,
)
from kvflow.serve.errors import APIError, bad_request
from kvflow.serve.logprobs import LogprobsFormatter
from kvflow.serve.metrics import RequestMetrics, RequestObserver
from kvflow.serve.protocol import (
    NEUTRAL_VALUES,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationFields,
)
from kvflow.serve.responses import DONE, ResponseShape, usage

RETRY_AFTER_S = "1"
"""What a 503 tells clients to wait before retrying, in seconds."""


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What the server serves and how requests reach it."""

    name: str
    engine_name: str
    codec: TextCodec
    engine: AsyncEngine
    max_model_len: int
    vocab_size: int
    metrics: RequestMetrics


def engine_failure(err: Exception) -> APIError:
    """A 500 for a request the engine failed (e.g. the runner raised in its step)."""
    return APIError(500, f"the request failed in the engine: {err}", code="engine_error")


def error_event(err: APIError) -> bytes:
    """An error inside an event stream, as vLLM sends one: `data: {"error": ...}`."""
    body = err.body()
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


def unavailable(message: str) -> APIError:
    return APIError(503, message, code="unavailable", headers={"Retry-After": RETRY_AFTER_S})


@dataclass(slots=True)
class Generation:
    """A request submitted to the engine, its first output already in hand."""

    request: Request
    first: RequestOutput
    outputs: AsyncIterator[RequestOutput]
    observer: RequestObserver
    in_flight: set[str]

    async def next(self) -> RequestOutput | None:
        """The output after those seen (None: the stream ended)."""
        return await anext(self.outputs, None)

    async def aclose(self) -> None:
        """Leave the stream: an unfinished request is aborted and its blocks freed."""
        self.in_flight.discard(self.request.request_id)
        aclose: Callable[[], Any] | None = getattr(self.outputs, "aclose", None)
        if aclose is not None:
            await aclose()
        self.observer.finish("abort")


class OpenAIServing:
    """The handlers behind `/v1/completions` and `/v1/chat/completions`."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.in_flight: set[str] = set()
        """Ids of the requests submitted and not yet left."""

    # -- requests in -------------------------------------------------------------------
    def check_common(self, body: GenerationFields) -> None:
        if body.model != self.model.name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves {self.model.name!r}",
                param="model",
                code="model_not_found",
            )
        if body.n != 1:
            raise bad_request(f"n={body.n!r} is not supported: kvflow serves n=1 only", "n")
        if body.stream_options is not None and not body.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        for name, neutral in NEUTRAL_VALUES.items():
            value = getattr(body, name)
            if value not in neutral:
                allowed = " or ".join(repr(v) for v in neutral)
                raise bad_request(f"{name}={value!r} is not supported (only {allowed})", name)

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        """The prompt's token ids; a batch (a list of strings or of token-id lists) gives
        one list per prompt, each a choice of the response (as vLLM answers)."""
        given: Any = body.prompt
        batch = isinstance(given, list) and bool(given) and isinstance(given[0], str | list)
        prompts = cast("list[str | list[int]]", given if batch else [given])
        if body.echo:
            raise bad_request("echo=true is not supported", "echo")
        if batch and body.stream and len(prompts) > 1:
            raise bad_request(
                f"prompt: streaming a batch of {len(prompts)} prompts is not supported; "
                "send them one per request, or stream=false",
                "prompt",
            )
        encode = self.model.codec.encode
        return [
            self._checked_ids(
                encode(p) if isinstance(p, str) else list(p), f"prompt[{i}]" if batch else "prompt"
            )
            for i, p in enumerate(prompts)
        ]

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        # A message's other fields (name, tool_call_id, ...) are the template's to render.
        messages = [
            {**(m.model_extra or {}), "role": m.role, "content": m.text()} for m in body.messages
        ]
        try:
            ids = self.model.codec.encode_chat(messages, body.add_generation_prompt)
        except ValueError as err:
            raise bad_request(str(err), "messages") from None
        return self._checked_ids(ids, "messages")

    def logprobs_asked(self, body: CompletionRequest | ChatCompletionRequest) -> int | None:
        """How many top log-probabilities the request asks for per token (0: the sampled
        token's only), or None; a 400 when the engine computes none."""
        if isinstance(body, CompletionRequest):
            asked, param = body.logprobs, "logprobs"
        else:
            if body.top_logprobs is not None and not body.logprobs:
                raise bad_request(
                    f"top_logprobs={body.top_logprobs!r} needs logprobs=true", "top_logprobs"
                )
            asked, param = (body.top_logprobs or 0) if body.logprobs else None, "logprobs"
        if asked is not None and not self.model.engine.runner.supports_logprobs:
            raise bad_request(
                f"{param}: log-probabilities are not supported by engine "
                f"{self.model.engine_name!r}",
                param,
            )
        return asked

    def _checked_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise bad_request(f"{param} is empty (0 tokens)", param)
        vocab = self.model.vocab_size
        bad = first_bad_token(ids, vocab)
        if bad is not None:
            raise bad_request(f"{param}: token id {bad[1]!r} is outside [0, {vocab})", param)
        return ids

    def make_request(
        self,
        body: GenerationFields,
        prompt_ids: list[int],
        max_tokens: int | None,
        prefix: str,
        logprobs: int | None = None,
    ) -> Request:
        max_len = self.model.max_model_len
        num_prompt = len(prompt_ids)
        where = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        if num_prompt >= max_len:
            raise bad_request(
                f"the {where} has {num_prompt} tokens; max_model_len is {max_len}, which "
                "leaves no room for output",
                where,
            )
        if max_tokens is None:
            max_tokens = 16 if where == "prompt" else max_len - num_prompt
        if num_prompt + max_tokens > max_len:
            raise bad_request(
                f"max_model_len is {max_len} tokens, but the request needs "
                f"{num_prompt + max_tokens} ({num_prompt} in the {where} + {max_tokens} "
                "max_tokens); shorten the prompt or lower max_tokens",
                "max_tokens",
            )
        stop_ids = list(body.stop_token_ids or ())
        eos = self.model.codec.eos_token_id
        if eos is not None and not body.ignore_eos and eos not in stop_ids:
            stop_ids.append(eos)
        engine = self.model.engine
        try:
            sampling = SamplingParams(
                temperature=body.temperature,
                top_k=max(body.top_k, 0),
                top_p=body.top_p,
                seed=body.seed,
                stop_token_ids=tuple(stop_ids),
                logprobs=logprobs,
            )
            return Request(
                f"{prefix}-{uuid.uuid4().hex}",
                tuple(prompt_ids),
                max_tokens,
                priority=body.priority,
                tenant=body.tenant,
                slo=SLO(body.ttft_slo_ms, body.tpot_slo_ms),
                deadline=None if body.deadline_s is None else engine.clock() + body.deadline_s,
                sampling=sampling,
            )
        except ValueError as err:
            raise bad_request(str(err)) from None

    async def submit(self, request: Request) -> Generation:
        """Submit, and wait for the first output (a rejection comes back at once).

        Raises:
            APIError: 503 when the engine is full or closing, 400 when it rejects the
                request (e.g. it needs more KV blocks than the device holds).
        """
        engine = self.model.engine
        observer = self.model.metrics.observer(len(request.prompt_token_ids))
        # One output per resumption: the tokens of every step since the last go out
        # in one event, so a stream that falls behind catches up in one write.
        outputs = engine.generate(request, coalesce=True)
        rid = request.request_id
        self.in_flight.add(rid)  # from now on, a shutdown with on_close=abort aborts it
        try:
            first = await outputs.__anext__()
            if first.finished and first.finish_reason is FinishReason.REJECTED:
                raise bad_request(f"request rejected: {first.finish_detail}", "max_tokens")
        except EngineOverloadedError as err:
            self.in_flight.discard(rid)
            raise unavailable(f"the server is at capacity ({err}); retry later") from None
        except EngineClosedError as err:
            self.in_flight.discard(rid)
            raise unavailable(f"the server is shutting down ({err})") from None
        except BaseException:
            self.in_flight.discard(rid)
            raise
        observer.observe(first)
        return Generation(request, first, outputs, observer, self.in_flight)

    # -- outputs back ------------------------------------------------------------------
    async def collect(
        self, gen: Generation, stops: Sequence[str], logprobs: LogprobsFormatter | None = None
    ) -> tuple[str, str, int]:
        """The whole output: text, finish reason, completion tokens; the tokens'
        log-probabilities go to `logprobs` when given."""
        text = OutputText(self.model.codec, stops)
        parts: list[str] = []
        reason: str | None = None
        num_tokens = 0
        try:
            out: RequestOutput | None = gen.first
            while out is not None:
                if out is not gen.first:
                    gen.observer.observe(out)
                delta, reason = text.feed(out)
                parts.append(delta)
                kept = text.num_kept  # fewer than the new tokens when a stop string ended it
                if logprobs is not None and out.logprobs is not None:
                    logprobs.add(out.new_token_ids[:kept], out.logprobs[:kept])
                num_tokens = out.num_output_tokens - (len(out.new_token_ids) - kept)
                if reason is not None:
                    gen.observer.finish(reason)
                    break
                out = await gen.next()
        except Exception as err:  # the runner or the engine failed the request
            gen.observer.finish("error")
            raise engine_failure(err) from None
        finally:
            await gen.aclose()
        return "".join(parts), reason or "abort", num_tokens

    async def stream(
        self,
        gen: Generation,
        stops: Sequence[str],
        shape: ResponseShape,
        logprobs: LogprobsFormatter | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Server-sent events: the shape's first chunk (chat's role), one chunk per
        output with new text (or new log-probabilities, with `logprobs`), the usage
        chunk when asked for, then `[DONE]`.

        Each yielded item is one write to the socket: chat's role chunk goes with the
        first text, and the last text, the usage and `[DONE]` go together."""
        text = OutputText(self.model.codec, stops)
        num_tokens = 0
        head = shape.first_event() or b""
        tail = b""
        try:
            out: RequestOutput | None = gen.first
            while out is not None:
                if out is not gen.first:
                    gen.observer.observe(out)
                delta, reason = text.feed(out)
                kept = text.num_kept  # fewer than the new tokens when a stop string ended it
                num_tokens = out.num_output_tokens - (len(out.new_token_ids) - kept)
                lps = None
                if logprobs is not None and out.logprobs:
                    lps = logprobs.chunk(out.new_token_ids[:kept], out.logprobs[:kept])
                chunk = b""
                if delta or reason is not None or lps is not None:
                    chunk = shape.event(delta, reason, lps)
                if reason is not None:
                    gen.observer.finish(reason)
                    tail = chunk
                    break
                if chunk:
                    yield head + chunk
                    head = b""
                out = await gen.next()
            if shape.with_usage:
                tail += shape.usage_event(self.usage(gen, num_tokens))
        except Exception as err:  # after the headers: the error goes in the stream
            gen.observer.finish("error")
            tail += error_event(engine_failure(err))
        finally:
            await gen.aclose()
        yield head + tail + DONE

    @staticmethod
    def usage(gen: Generation, num_completion_tokens: int) -> dict[str, Any]:
        num_prompt = len(gen.request.prompt_token_ids)
        return usage(num_prompt, num_completion_tokens, gen.first.num_cached_tokens)


__all__ = ["Generation", "OpenAIServing", "ServedModel", "unavailable"]
