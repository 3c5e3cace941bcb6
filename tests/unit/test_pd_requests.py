"""The requests a disaggregated fleet makes of one request: its prefill copy and the
decode half, copied without repacking the prompt yet equal to what
`dataclasses.replace` (which checks and packs everything again) makes."""

from __future__ import annotations

import dataclasses

from kvflow.cluster.pd import decode_request, prefill_request
from kvflow.request import SLO, Request, RequestState


def original() -> Request:
    prompt = [7, 70_000, 3, 2**32 - 1] * 50
    return Request("r1", prompt, 9, arrival_time=1.5, tenant="t", slo=SLO(200, 20), deadline=2)


def fields(request: Request) -> dict[str, object]:
    return {name: getattr(request, name) for name in Request.__slots__}


def test_the_prefill_copy_asks_for_the_first_token_alone() -> None:
    request = original()
    copy = prefill_request(request)
    assert copy.max_new_tokens == 1
    assert fields(copy) == fields(dataclasses.replace(request, max_new_tokens=1))
    assert request.max_new_tokens == 9  # the original is left as it was


def test_the_decode_half_continues_from_the_prompt_and_first_token() -> None:
    request = original()
    prefilled = RequestState(prefill_request(request))
    prefilled.token_ids.append(42)  # the first token, made on the prefill instance
    half = decode_request(request, prefilled, arrival_time=3.0)
    expected = dataclasses.replace(
        request,
        prompt_token_ids=[*request.prompt_token_ids, 42],
        max_new_tokens=8,
        arrival_time=3.0,
        deadline=None,
    )
    assert fields(half) == fields(expected)
    assert half.prompt_token_ids == (*request.prompt_token_ids, 42)
    assert list(half.prompt_array) == list(half.prompt_token_ids)
    prefilled.token_ids.append(43)  # the prefill state's tokens are not the half's
    assert len(half.prompt_array) == len(request.prompt_token_ids) + 1
