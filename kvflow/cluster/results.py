"""What a fleet replay returns: each instance's outcome, the pulls between instances,
and the fleet's own figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvflow.cluster.pd import Handoff
from kvflow.kv.store import StoreStats
from kvflow.request import RequestState
from kvflow.scheduler.stats import SchedulerStats


class FleetStalledError(RuntimeError):
    """Instances hold requests they cannot schedule, and no event is due."""


@dataclass(frozen=True, slots=True)
class Pull:
    """A prefix pulled from a peer for one request."""

    request_id: str
    source: int
    target: int
    num_local_tokens: int
    """Tokens of the prompt the target was expected to hold already."""
    num_tokens: int
    """Tokens pulled."""
    num_bytes: int
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class InstanceResult:
    """What one instance of the fleet did."""

    index: int
    states: list[RequestState]
    stats: SchedulerStats
    store_stats: StoreStats
    num_leaked_blocks: int
    end_time: float
    landing_tier: str
    """The tier pulled blocks landed in (their hits are counted there by its scheduler)."""
    role: str = ""
    """`prefill` or `decode` with disaggregation, else empty."""


@dataclass(frozen=True, slots=True)
class FleetResult:
    """A fleet replay's outcome: each instance's, and the fleet's own figures."""

    policy: str
    router: str
    peers: bool
    instances: list[InstanceResult]
    pulls: list[Pull]
    routed: list[int]
    """Requests routed to each instance."""
    load_imbalance: float
    """Sum over arrivals of the highest instance load (queued prefill tokens) divided
    by the sum of the mean load: 1 is perfectly even, N all on one instance of N."""
    request_imbalance: float
    """The same over the requests each instance holds (waiting, loading, running)."""
    end_time: float
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    pd: tuple[int, int] | None = None
    """(prefill, decode) instance counts with disaggregation."""
    handoffs: list[Handoff] = field(default_factory=list)
    merged_states: list[RequestState] | None = None
    """With disaggregation: one state per request, its prefill and decode halves joined."""

    @property
    def states(self) -> list[RequestState]:
        if self.merged_states is not None:
            return self.merged_states
        return [s for inst in self.instances for s in inst.states]

    @property
    def pd_handoff_bytes(self) -> int:
        return sum(h.num_bytes for h in self.handoffs)

    @property
    def network_bytes(self) -> int:
        return sum(p.num_bytes for p in self.pulls)
