"""A request's part in a prefill/decode handoff (its `kvflow_handoff` field): on a
prefill instance, keep the prompt's KV once the request finished and answer with a
ticket; on a decode instance, make the ticket's blocks known before the request is
submitted, so the scheduler pulls them (`kvflow.peer.handoff`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvflow.peer.handoff import HandoffTicket, accept, keep, prompt_block_keys
from kvflow.request import Request
from kvflow.serve.errors import bad_request
from kvflow.serve.protocol import GenerationFields, HandoffInfo, KeepKV

if TYPE_CHECKING:
    from kvflow.peer.node import PeerNode
    from kvflow.serve.serving import Generation


@dataclass(frozen=True, slots=True)
class RequestHandoff:
    node: PeerNode
    ask: KeepKV | HandoffInfo

    async def before_submit(self, request: Request) -> None:
        """Decode side: wait (bounded) until the ticket's blocks are known here; the
        request is then served either way (pulled, or recomputed)."""
        if not isinstance(self.ask, HandoffInfo):
            return
        info = self.ask
        ticket = HandoffTicket(
            info.peer,
            info.peer_id,
            info.fingerprint,
            info.seq,
            tuple(info.block_keys),
            info.block_size,
        )
        await accept(self.node, ticket, self._keys(request))

    def response_fields(self, gens: Sequence[Generation]) -> dict[str, Any]:
        """Prefill side, once the request finished: the ticket for the response
        (`kvflow_handoff: null` when none of its blocks is held any more)."""
        if not isinstance(self.ask, KeepKV):
            return {}
        [gen] = gens
        # The blocks a decode instance can take: not a last block the prompt ends with
        # (it computes the prompt's last token, as for any prefix hit).
        num_usable = (len(gen.request.prompt_token_ids) - 1) // self.node.store.config.block_size
        ticket = keep(self.node, self._keys(gen.request)[:num_usable])
        if ticket is None:
            return {"kvflow_handoff": None}
        fields = ticket._asdict()
        fields["block_keys"] = list(ticket.block_keys)
        fields["num_tokens"] = ticket.num_tokens
        return {"kvflow_handoff": HandoffInfo.model_validate(fields).model_dump()}

    def _keys(self, request: Request) -> list[int]:
        block_size = self.node.store.config.block_size
        return prompt_block_keys(request.prompt_token_ids, block_size, request.extra_keys)


def request_handoff(
    node: PeerNode | None, body: GenerationFields, num_prompts: int
) -> RequestHandoff | None:
    """The request's handoff part, or None without one.

    A ticket given to a server without a peer layer is ignored (it computes the
    prompt, as any failed handoff ends).

    Raises:
        APIError: 400 when a keep is asked of a server without a peer layer, or of a
            streamed or batched request.
    """
    ask = body.kvflow_handoff
    if ask is None or (node is None and isinstance(ask, HandoffInfo)):
        return None
    if node is None:
        raise bad_request(
            "kvflow_handoff needs the peer layer: kvflow serve --role prefill|decode "
            "(or --peer-port)",
            "kvflow_handoff",
        )
    if isinstance(ask, KeepKV):
        if body.stream:
            raise bad_request("kvflow_handoff.keep needs stream=false", "kvflow_handoff")
        if num_prompts != 1:
            raise bad_request(
                f"kvflow_handoff.keep takes one prompt, got {num_prompts}", "kvflow_handoff"
            )
    return RequestHandoff(node, ask)


__all__ = ["RequestHandoff", "request_handoff"]
