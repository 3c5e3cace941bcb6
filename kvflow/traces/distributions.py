"""Length distributions and arrival processes for synthetic workloads.

Each samples from a `random.Random` the caller seeds, so a workload is a pure function
of its arguments. `parse_length` reads the command line's spelling of a length
distribution.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

LengthAspect = Literal["prompt", "output"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class LengthDist(ABC):
    """A distribution of token counts (integers >= 1)."""

    @abstractmethod
    def sample(self, rng: random.Random) -> int:
        """One length drawn with `rng`."""

    @abstractmethod
    def spec(self) -> str:
        """The distribution as `parse_length` reads it."""

    @property
    @abstractmethod
    def min_value(self) -> int:
        """The smallest length it can give."""

    @property
    @abstractmethod
    def max_length(self) -> int | None:
        """The largest length it can give (None: no bound)."""


@dataclass(frozen=True, slots=True)
class Fixed(LengthDist):
    """Always `value` (draws nothing from the generator)."""

    value: int

    def __post_init__(self) -> None:
        _require(
            type(self.value) is int and self.value >= 0,
            f"length must be an int >= 0, got {self.value!r}",
        )

    def sample(self, rng: random.Random) -> int:
        return self.value

    def spec(self) -> str:
        return str(self.value)

    @property
    def min_value(self) -> int:
        return self.value

    @property
    def max_length(self) -> int:
        return self.value


@dataclass(frozen=True, slots=True)
class Uniform(LengthDist):
    """Uniform over lo..hi inclusive."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        _require(
            type(self.lo) is int and type(self.hi) is int and 0 <= self.lo <= self.hi,
            f"uniform lengths need 0 <= lo <= hi, got {self.lo!r}:{self.hi!r}",
        )

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.lo, self.hi)

    def spec(self) -> str:
        return f"{self.lo}:{self.hi}"

    @property
    def min_value(self) -> int:
        return self.lo

    @property
    def max_length(self) -> int:
        return self.hi


@dataclass(frozen=True, slots=True)
class LogNormal(LengthDist):
    """exp(N(ln median, sigma²)) rounded, clipped to [1, max_value]: the long-tailed shape
    of real prompt and output lengths."""

    median: float
    sigma: float
    max_value: int | None = None

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.median) and self.median >= 1,
            f"lognormal median must be >= 1, got {self.median!r}",
        )
        _require(
            math.isfinite(self.sigma) and self.sigma >= 0,
            f"lognormal sigma must be >= 0, got {self.sigma!r}",
        )
        _require(
            self.max_value is None or self.max_value >= 1,
            f"lognormal max must be >= 1, got {self.max_value!r}",
        )

    def sample(self, rng: random.Random) -> int:
        draw = rng.lognormvariate(math.log(self.median), self.sigma)
        value = max(1, round(min(draw, 2.0**62)))  # a huge sigma can draw inf
        return value if self.max_value is None else min(value, self.max_value)

    def spec(self) -> str:
        tail = "" if self.max_value is None else f":{self.max_value}"
        return f"lognormal:{self.median:g}:{self.sigma:g}{tail}"

    @property
    def min_value(self) -> int:
        return 1

    @property
    def max_length(self) -> int | None:
        return self.max_value


@dataclass(frozen=True, slots=True)
class Empirical(LengthDist):
    """Uniform over observed lengths (with repeats), e.g. a trace's prompt lengths."""

    values: tuple[int, ...]
    source: str = ""

    def __post_init__(self) -> None:
        _require(bool(self.values), "an empirical length distribution needs values")
        _require(min(self.values) >= 0, "empirical lengths must be >= 0")

    @classmethod
    def from_trace(cls, path: str | os.PathLike[str], aspect: LengthAspect) -> Empirical:
        """The prompt or output lengths of the requests of a trace file (any format)."""
        from kvflow.traces.formats import load_trace

        requests = load_trace(path)
        if aspect == "prompt":
            values = tuple(len(r.prompt_token_ids) for r in requests)
        else:
            values = tuple(r.max_new_tokens for r in requests)
        if not values:
            raise ValueError(f"{path}: no requests to take {aspect} lengths from")
        return cls(values, source=str(path))

    def sample(self, rng: random.Random) -> int:
        return self.values[rng.randrange(len(self.values))]

    def spec(self) -> str:
        return f"trace:{self.source}" if self.source else f"empirical({len(self.values)} values)"

    @property
    def min_value(self) -> int:
        return min(self.values)

    @property
    def max_length(self) -> int:
        return max(self.values)


LengthSpec = int | tuple[int, int] | LengthDist
"""A fixed length, (lo, hi) for uniform over lo..hi inclusive, or any `LengthDist`."""


def as_length_dist(name: str, spec: LengthSpec, minimum: int = 1) -> LengthDist:
    """`spec` as a `LengthDist` whose lengths are all >= `minimum`.

    Raises:
        ValueError: naming `name` and quoting `spec`.
    """
    try:
        if isinstance(spec, LengthDist):
            dist = spec
        elif isinstance(spec, tuple):
            dist = Uniform(*spec)
        else:
            dist = Fixed(spec)
        ok = dist.min_value >= minimum
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must be an int >= {minimum}, (lo, hi) with {minimum} <= lo <= hi, or a "
            f"length distribution giving lengths >= {minimum}, got {spec!r}"
        )
    return dist


def parse_length(text: str, aspect: LengthAspect = "prompt") -> LengthDist:
    """A length distribution from its command-line spelling.

    ``N`` (fixed), ``LO:HI`` or ``uniform:LO:HI``, ``lognormal:MEDIAN:SIGMA[:MAX]``,
    ``trace:PATH`` (the `aspect` lengths of a trace file).

    Raises:
        ValueError: a spelling it cannot read, quoting it.
    """
    path = length_trace_path(text)
    kind, _, rest = text.partition(":")
    try:
        if path is not None:
            return Empirical.from_trace(path, aspect)
        if kind == "lognormal":
            parts = rest.split(":")
            if len(parts) not in (2, 3):
                raise ValueError("expected lognormal:MEDIAN:SIGMA[:MAX]")
            cap = int(parts[2]) if len(parts) == 3 else None
            return LogNormal(float(parts[0]), float(parts[1]), cap)
        if kind == "uniform":
            kind, _, rest = rest.partition(":")
        if rest:
            return Uniform(int(kind), int(rest))
        return Fixed(int(kind))
    except ValueError as err:
        raise ValueError(
            f"bad length {text!r} ({err}); expected N, LO:HI, uniform:LO:HI, "
            "lognormal:MEDIAN:SIGMA[:MAX] or trace:PATH"
        ) from None


def length_trace_path(text: str) -> str | None:
    """The trace file a length spelling samples from (``trace:PATH``; see
    `parse_length`), None for any other spelling."""
    kind, _, rest = text.partition(":")
    return rest if kind == "trace" and rest else None


class ArrivalProcess(ABC):
    """When requests (or sessions) arrive."""

    @abstractmethod
    def times(self, num: int, rng: random.Random) -> list[float]:
        """`num` arrival times in seconds, non-decreasing, rounded to microseconds."""


def _accumulate(gaps: Sequence[float]) -> list[float]:
    return [round(t, 6) for t in itertools.accumulate(gaps)]


@dataclass(frozen=True, slots=True)
class Poisson(ArrivalProcess):
    """Exponential gaps at `rate_rps` per second."""

    rate_rps: float

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.rate_rps) and self.rate_rps > 0,
            f"rate_rps must be > 0, got {self.rate_rps!r}",
        )

    def times(self, num: int, rng: random.Random) -> list[float]:
        return _accumulate([rng.expovariate(self.rate_rps) for _ in range(num)])


@dataclass(frozen=True, slots=True)
class Gamma(ArrivalProcess):
    """Gamma-distributed gaps with mean 1/`rate_rps` and coefficient of variation `cv`:
    cv = 1 is as variable as Poisson, cv > 1 is bursty, cv < 1 more regular."""

    rate_rps: float
    cv: float

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.rate_rps) and self.rate_rps > 0,
            f"rate_rps must be > 0, got {self.rate_rps!r}",
        )
        _require(math.isfinite(self.cv) and self.cv > 0, f"cv must be > 0, got {self.cv!r}")

    def times(self, num: int, rng: random.Random) -> list[float]:
        shape = 1.0 / (self.cv * self.cv)
        scale = 1.0 / (self.rate_rps * shape)
        return _accumulate([rng.gammavariate(shape, scale) for _ in range(num)])


@dataclass(frozen=True, slots=True)
class AllAtOnce(ArrivalProcess):
    """Every arrival at t = 0 (a closed batch)."""

    def times(self, num: int, rng: random.Random) -> list[float]:
        return [0.0] * num
