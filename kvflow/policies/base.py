"""The policy contract: which waiting requests go first, and who is preempted."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar

from kvflow.kv.location import PrefixLocation
from kvflow.request import RequestState

if TYPE_CHECKING:
    from kvflow.scheduler.plan import StepPlan


class SchedulerView:
    """Read-only access a policy gets to the scheduler: time, the cache, the queues.

    `locate` answers from a per-step memo, so asking twice in a step costs nothing.
    """

    __slots__ = (
        "_locate",
        "_memo",
        "block_size",
        "max_num_seqs",
        "now",
        "num_free_blocks",
        "num_running",
        "num_waiting",
    )

    def __init__(
        self, block_size: int, max_num_seqs: int, locate: Callable[[RequestState], PrefixLocation]
    ) -> None:
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self._locate = locate
        self._memo: dict[str, PrefixLocation] = {}
        self.now = 0.0
        self.num_free_blocks = 0
        self.num_running = 0
        self.num_waiting = 0

    def _begin_step(
        self, now: float, num_free_blocks: int, num_running: int, num_waiting: int
    ) -> None:
        self.now = now
        self.num_free_blocks = num_free_blocks
        self.num_running = num_running
        self.num_waiting = num_waiting
        self._memo.clear()

    def locate(self, request: RequestState) -> PrefixLocation:
        """Where the leading blocks of this request's tokens are cached."""
        loc = self._memo.get(request.request_id)
        if loc is None:
            loc = self._memo[request.request_id] = self._locate(request)
        return loc

    def cached_tokens(self, request: RequestState) -> int:
        """Tokens of the request's known tokens that are cached anywhere (all tiers)."""
        return self.locate(request).total_tokens


class Policy(abc.ABC):
    """A scheduling policy.

    Subclasses implement `order`; the other hooks have sensible defaults. A policy is
    created once per scheduler and may keep state (e.g. per-tenant counters).
    Constructor keyword arguments are the policy's options (`--set policies.NAME.KEY=V`
    for built-ins).
    """

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def order(self, waiting: Sequence[RequestState], view: SchedulerView) -> Iterable[RequestState]:
        """Waiting requests in the order they should be admitted.

        Args:
            waiting: the queue, oldest first, except that preempted requests come first.
            view: time, cache locations and queue sizes.

        Returns:
            An iterable over (a subset of) `waiting`; the scheduler admits from it until
            budget, slots or blocks run out, so it may be lazy. Requests left out stay
            waiting.
        """

    def victim(self, candidates: Sequence[RequestState], view: SchedulerView) -> RequestState:
        """The running request to preempt when blocks run out.

        Args:
            candidates: running requests that may be preempted, in running order (the
                last was admitted last); never empty.

        Returns:
            One of `candidates`. The default takes the last admitted, as vLLM does.
        """
        return candidates[-1]

    def preempt_for(
        self, request: RequestState, running: Sequence[RequestState], view: SchedulerView
    ) -> RequestState | None:
        """A running request to preempt so that `request` (waiting, next in order, but
        short of slots or blocks) can be admitted; None (the default) to wait instead."""
        return None

    def drop(
        self, waiting: Sequence[RequestState], view: SchedulerView
    ) -> Iterable[tuple[RequestState, str]]:
        """Waiting requests to reject now, each with a reason. Called every step only
        when `drops_requests()` is true."""
        return ()

    def drops_requests(self) -> bool:
        """Whether the scheduler should call `drop` each step (default: when a subclass
        overrides it). Checked once, when the scheduler is built."""
        return type(self).drop is not Policy.drop

    def on_add(self, request: RequestState, view: SchedulerView) -> None:  # noqa: B027
        """Called when a request arrives (after admission checks pass)."""

    def on_step(self, plan: StepPlan, view: SchedulerView) -> None:  # noqa: B027
        """Called after each plan. Only called when a subclass overrides it."""

    def on_finish(self, request: RequestState, view: SchedulerView) -> None:  # noqa: B027
        """Called when a request finishes for any reason."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
