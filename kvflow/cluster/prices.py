"""GPU prices and presets for `kvflow plan`, from a user-editable TOML file.

kvflow ships an example (`kvflow/cluster/data/prices.toml`, example prices with a
date); each ``[gpu.NAME]`` table says what one instance costs and how to simulate it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kvflow.config import ConfigError, read_small_file
from kvflow.engine_adapters.simulated import PRESETS

_FIELDS = {"description", "price_per_gpu_hour", "gpus_per_instance", "sim_preset", "device_blocks"}


class PricesError(ValueError):
    """A prices file that cannot be read, or a GPU it does not name."""


@dataclass(frozen=True, slots=True)
class GpuPrice:
    """One instance type: what it costs and how the simulator models it."""

    name: str
    price_per_gpu_hour: float
    """USD per GPU per hour."""
    gpus_per_instance: int = 1
    sim_preset: str | None = None
    """A latency preset name (None: the config's sim settings)."""
    device_blocks: int | None = None
    """KV blocks one instance's device tier holds (None: the config's)."""
    description: str = ""

    @property
    def price_per_instance_hour(self) -> float:
        return self.price_per_gpu_hour * self.gpus_per_instance

    def config_overrides(self) -> dict[str, Any]:
        """The dotted config overrides this entry implies."""
        overrides: dict[str, Any] = {}
        if self.sim_preset is not None:
            overrides["sim.preset"] = self.sim_preset
        if self.device_blocks is not None:
            overrides["kv.device.num_blocks"] = self.device_blocks
        return overrides


def default_prices_path() -> Path:
    """The example prices file kvflow ships."""
    return Path(str(resources.files("kvflow.cluster") / "data" / "prices.toml"))


def load_prices(path: str | Path | None = None) -> dict[str, GpuPrice]:
    """The ``[gpu.NAME]`` entries of a prices file (the shipped example when None).

    Raises:
        PricesError: the file cannot be read or parsed, or an entry is malformed (the
            message names the file and the key).
    """
    file = default_prices_path() if path is None else Path(path)
    try:  # bounded, UTF-8, and only a regular file: /dev/zero or a FIFO never ends
        text = read_small_file(file, "prices file")
    except ConfigError as err:
        raise PricesError(str(err)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise PricesError(f"prices file {str(file)!r} does not parse: {err}") from None
    gpus = data.get("gpu")
    if not isinstance(gpus, dict) or not gpus:
        raise PricesError(f"prices file {str(file)!r}: no [gpu.NAME] tables")
    return {name: _entry(file, name, entry) for name, entry in gpus.items()}


def _entry(file: Path, name: str, entry: Any) -> GpuPrice:
    where = f"prices file {str(file)!r}, gpu.{name}"
    if not isinstance(entry, Mapping):
        raise PricesError(f"{where}: expected a table, got {entry!r}")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise PricesError(
            f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(_FIELDS))}"
        )
    price = entry.get("price_per_gpu_hour")
    if (
        isinstance(price, bool)
        or not isinstance(price, int | float)
        or not (math.isfinite(price) and price > 0)
    ):
        raise PricesError(f"{where}.price_per_gpu_hour: expected a number > 0, got {price!r}")
    gpus = entry.get("gpus_per_instance", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise PricesError(f"{where}.gpus_per_instance: expected an integer >= 1, got {gpus!r}")
    preset = entry.get("sim_preset")
    if preset is not None and preset not in PRESETS:
        raise PricesError(
            f"{where}.sim_preset: {preset!r} is not a known preset; known: {', '.join(PRESETS)}"
        )
    blocks = entry.get("device_blocks")
    if blocks is not None and (
        isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1
    ):
        raise PricesError(f"{where}.device_blocks: expected an integer >= 1, got {blocks!r}")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise PricesError(f"{where}.description: expected a string, got {description!r}")
    return GpuPrice(name, float(price), gpus, preset, blocks, description)


def pick_gpu(prices: Mapping[str, GpuPrice], name: str, source: str) -> GpuPrice:
    """The entry `name` of `prices` (read from `source`, for the message)."""
    try:
        return prices[name]
    except KeyError:
        raise PricesError(
            f"unknown gpu {name!r} in {source}; known: {', '.join(sorted(prices))}"
        ) from None
