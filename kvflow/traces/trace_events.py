"""The step timeline of replays as Chrome / Perfetto trace events (JSON).

Open the file in https://ui.perfetto.dev or chrome://tracing. The file is
``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}``, written as the
replay goes (memory stays flat however long the replay). Events, all with ``"pid": 1``:

- track names (`ph: "M"`): `process_name`, then per track `thread_name` (`args.name`:
  the policy) and `thread_sort_index`;
- one complete event per step (`ph: "X"`, `cat: "step"`): `name` is `prefill`,
  `decode` or `mixed`; `tid` is the policy's track; `ts` and `dur` are the step's start
  and length in microseconds of virtual time; `args` holds `step_id`, `batch_size`,
  `num_prefill_tokens`, `num_decode_tokens`, `num_kv_tokens` and `num_preempted`;
- counters (`ph: "C"`, at the step's end, unless `counters=False`): `"<policy> queue"`
  with `args` `waiting` (queued or waiting for KV) and `running`, and `"<policy> kv"`
  with `args.used_blocks_pct` (device blocks held by requests, in percent).

Each policy's replay gets its own track (`tid` 1, 2, ... in the order tracks are
made); replays start at the trace's first arrival, so the tracks line up in time.
"""

from __future__ import annotations

import json
import os
from types import TracebackType
from typing import IO, Any

from kvflow.scheduler.core import Scheduler
from kvflow.scheduler.plan import StepPlan, StepResult
from kvflow.traces.replay import StepHook

PID = 1


class TimelineWriteError(OSError):
    """The timeline file could not be written (its `filename` says which): apart from
    any other OSError of the run it is written beside."""


class TraceEventWriter:
    """Writes trace events to `path` as replays run; use as a context manager.

    Args:
        path: the JSON file to write.
        counters: also write the queue and KV counter events (two per step).
    """

    def __init__(self, path: str | os.PathLike[str], *, counters: bool = True) -> None:
        self.counters = counters
        self.path = os.fspath(path)
        self._file: IO[str] = open(path, "w")  # noqa: SIM115 - closed by close()
        self._file.write('{"traceEvents": [\n')
        self._num_events = 0
        self._track_names: list[str] = []
        self._num_steps: list[int] = []
        self._write(
            {
                "name": "process_name",
                "ph": "M",
                "pid": PID,
                "tid": 0,
                "args": {"name": "kvflow replay (virtual time)"},
            }
        )

    def _write(self, event: dict[str, Any] | str) -> None:
        text = event if isinstance(event, str) else json.dumps(event)
        try:
            self._file.write(text if not self._num_events else ",\n" + text)
        except OSError as err:
            raise self._named(err) from None
        self._num_events += 1

    def _named(self, err: OSError) -> TimelineWriteError:
        """`err` with this writer's path as its filename (a buffered write that fails
        names no file of its own)."""
        return TimelineWriteError(err.errno, err.strerror or str(err), self.path)

    def track(self, name: str) -> StepHook:
        """A new track named `name` (a policy) and the replay hook that fills it."""
        tid = len(self._track_names) + 1
        self._track_names.append(name)
        self._num_steps.append(0)
        self._write(
            {"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": name}}
        )
        self._write(
            {
                "name": "thread_sort_index",
                "ph": "M",
                "pid": PID,
                "tid": tid,
                "args": {"sort_index": tid},
            }
        )
        queue_name = json.dumps(f"{name} queue")
        kv_name = json.dumps(f"{name} kv")
        head = f'"pid": {PID}, "tid": {tid}'
        index = tid - 1
        write = self._write
        num_steps = self._num_steps
        counters = self.counters

        def on_step(scheduler: Scheduler, plan: StepPlan, result: StepResult, now: float) -> None:
            num_steps[index] += 1
            num_prefill = plan.num_prefill_tokens
            num_decode = plan.num_decode_tokens
            kind = "mixed" if num_prefill and num_decode else "prefill" if num_prefill else "decode"
            end_us = now * 1e6
            dur_us = result.duration_s * 1e6
            write(
                f'{{"name": "{kind}", "cat": "step", "ph": "X", {head}, '
                f'"ts": {end_us - dur_us:.3f}, "dur": {dur_us:.3f}, "args": {{'
                f'"step_id": {plan.step_id}, "batch_size": {len(plan.requests)}, '
                f'"num_prefill_tokens": {num_prefill}, "num_decode_tokens": {num_decode}, '
                f'"num_kv_tokens": {plan.num_kv_tokens}, '
                f'"num_preempted": {len(plan.preempted_ids)}}}}}'
            )
            if counters:
                pool = scheduler.pool
                num_running = len(scheduler.running)
                used_pct = 100.0 * pool.num_used_blocks / pool.num_blocks
                write(
                    f'{{"name": {queue_name}, "ph": "C", {head}, "ts": {end_us:.3f}, '
                    f'"args": {{"waiting": {scheduler.num_unfinished - num_running}, '
                    f'"running": {num_running}}}}}'
                )
                write(
                    f'{{"name": {kv_name}, "ph": "C", {head}, "ts": {end_us:.3f}, '
                    f'"args": {{"used_blocks_pct": {used_pct:.3f}}}}}'
                )

        return on_step

    def num_steps(self, name: str) -> int:
        """Step events written so far on the (first) track named `name`."""
        return self._num_steps[self._track_names.index(name)]

    def close(self) -> None:
        """Finish the JSON document and close the file (again: nothing)."""
        if self._file.closed:
            return
        other = {"generator": "kvflow", "clock": "virtual", "tracks": self._track_names}
        try:
            try:
                self._file.write(
                    f'\n], "displayTimeUnit": "ms", "otherData": {json.dumps(other)}}}\n'
                )
            finally:
                self._file.close()
        except OSError as err:
            raise self._named(err) from None

    def __enter__(self) -> TraceEventWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
