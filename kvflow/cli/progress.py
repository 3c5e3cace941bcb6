"""A progress bar for long replays and sweeps, on the terminal only."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from kvflow.request import Request
from kvflow.scheduler.core import Scheduler
from kvflow.scheduler.plan import StepPlan, StepResult
from kvflow.traces.replay import StepHook

UPDATE_EVERY_S = 0.1
"""Least wall time between two redraws of a replay's bar."""
CHECK_EVERY_STEPS = 32
"""Steps between two looks at the wall clock (a replay step takes well under 1 ms)."""


class ReplayProgress:
    """Bars counting finished requests of replays (or finished sweep points).

    Disabled, it draws nothing and hands out no hooks, so replays run untouched; it is
    disabled by default when the console is not a terminal. Use as a context manager.
    """

    def __init__(self, console: Console, enabled: bool | None = None) -> None:
        self.enabled = console.is_terminal if enabled is None else enabled
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not self.enabled,
        )

    def __enter__(self) -> ReplayProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def replay_hook(self, description: str, requests: Sequence[Request]) -> StepHook | None:
        """A bar over `requests` and the replay hook that advances it (None: disabled).

        The hook looks at the wall clock every `CHECK_EVERY_STEPS` steps and redraws at
        most every `UPDATE_EVERY_S`; requests done = arrived - still queued or running.
        """
        if not self.enabled:
            return None
        arrivals = sorted(r.arrival_time for r in requests)
        progress = self._progress
        task = progress.add_task(description, total=len(arrivals))
        countdown = CHECK_EVERY_STEPS
        last_update = time.perf_counter()

        def on_step(scheduler: Scheduler, plan: StepPlan, result: StepResult, now: float) -> None:
            nonlocal countdown, last_update
            countdown -= 1
            if countdown:
                return
            countdown = CHECK_EVERY_STEPS
            wall = time.perf_counter()
            if wall - last_update < UPDATE_EVERY_S:
                return
            last_update = wall
            arrived = bisect.bisect_right(arrivals, plan.now)
            progress.update(task, completed=arrived - scheduler.num_unfinished)

        return on_step

    def counter(self, description: str, total: int) -> Callable[[object], None]:
        """A bar of `total` items and a callback advancing it by one per call."""
        task = self._progress.add_task(description, total=total)

        def advance(_: object) -> None:
            self._progress.advance(task)

        return advance

    def bars(self) -> list[tuple[str, float, float | None]]:
        """(description, completed, total) of every bar, in the order they were made."""
        return [(t.description, t.completed, t.total) for t in self._progress.tasks]

    def finish_all(self) -> None:
        """Fill every bar (a replay's last steps may not have redrawn it)."""
        for task in self._progress.tasks:
            if task.total is not None:
                self._progress.update(task.id, completed=task.total)
