"""The Ray driver of `kvflow cluster up --ray` (`python -m kvflow.cluster.ray_driver
SPEC.json`; see `kvflow.cluster.ray_fleet`): connects to or starts the Ray cluster,
starts one actor per instance, writes their addresses to the spec's `ready` file (or
`{"error": ...}`), holds them until SIGTERM/SIGINT, then stops them and exits."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from kvflow.cluster.launcher import RAY_STOP_FILE, write_atomic
from kvflow.cluster.ray_fleet import InstanceActor

DRAIN_TIMEOUT_S = 30.0
"""How long each server may drain, unless `kvflow cluster down --timeout` said
(`RAY_STOP_FILE`)."""
START_TIMEOUT_S = 600.0

logger = logging.getLogger("kvflow.cluster")


def _write(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    spec = json.loads(Path(argv[0]).read_text())
    ready = Path(spec["ready"])
    stopping = threading.Event()

    def on_signal() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())

    on_signal()
    import ray

    instances = spec["instances"]
    local = spec["address"] is None
    context: Any
    try:
        if local:
            num_cpus = max(2, math.ceil(len(instances) * spec["cpus_per_instance"]))
            context = ray.init(
                num_cpus=num_cpus,
                namespace=spec["namespace"],
                include_dashboard=False,
                log_to_driver=False,
            )
        else:
            context = ray.init(
                address=spec["address"], namespace=spec["namespace"], log_to_driver=False
            )
        on_signal()  # again: ray.init puts in its own handlers, which exit at once
        actor_class: Any = ray.remote(InstanceActor)  # ray's handles are loosely typed
        actors: list[Any] = [
            actor_class.options(
                name=inst["name"],
                num_cpus=spec["cpus_per_instance"],
                num_gpus=spec["gpus_per_instance"],
                max_restarts=0,
            ).remote()
            for inst in instances
        ]
        where = ray.get([a.reserve.remote(local) for a in actors], timeout=START_TIMEOUT_S)
        peer_at = [f"{w['host']}:{w['peer_port']}" for w in where]
        starts = [
            a.start.remote(i["args"], [peer_at[j] for j in i["pulls_from"]], i["log"])
            for a, i in zip(actors, instances, strict=True)
        ]
        infos = ray.get(starts, timeout=START_TIMEOUT_S)
    except Exception as err:  # reported by `up`, which stops this process
        logger.exception("kvflow: the Ray instances did not start")
        _write(ready, {"error": f"{type(err).__name__}: {err}"})
        return 1
    logger.info("kvflow: %d instances on Ray at %s", len(infos), context.address_info)
    info = context.address_info
    _write(
        ready,
        {
            "instances": infos,
            "address": info.get("address"),
            "session_dir": info.get("session_dir"),
        },
    )
    while not stopping.wait(1.0):
        pass
    drain_s = DRAIN_TIMEOUT_S
    with contextlib.suppress(OSError, ValueError, KeyError):
        stop = json.loads((Path(argv[0]).parent / RAY_STOP_FILE).read_text())
        drain_s = float(stop["drain_timeout_s"])
    logger.info("kvflow: stopping the instances (drain timeout %s s)", drain_s)
    try:
        ray.get([a.stop.remote(drain_s) for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
        ray.shutdown()
    logger.info("kvflow: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
