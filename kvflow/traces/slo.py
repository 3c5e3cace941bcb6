"""SLOs given outside the trace: one for everyone, one per tenant; filled in or imposed.

A field (TTFT or TPOT) is taken, in order, from:

- filling in (the default): the request's own SLO in the trace, then its tenant's
  setting, then the global setting;
- overriding (`override=True`): its tenant's setting, then the global setting, then the
  request's own SLO.

An explicit `deadline` in the trace is left as it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvflow.request import SLO, Request


@dataclass(frozen=True, slots=True)
class SLOSettings:
    """SLOs to give requests on top of (or instead of) the trace's.

    Args:
        ttft_ms: the global TTFT objective in ms (None: none).
        tpot_ms: the global TPOT objective in ms (None: none).
        per_tenant: objectives by tenant name; a None field falls through to the global.
        override: impose these on every request instead of filling in missing ones.
    """

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    per_tenant: Mapping[str, SLO] = field(default_factory=dict)
    override: bool = False

    def __post_init__(self) -> None:
        SLO(self.ttft_ms, self.tpot_ms)  # the same checks, the same messages

    @property
    def is_empty(self) -> bool:
        """True when applying the settings changes nothing."""
        return self.ttft_ms is None and self.tpot_ms is None and not self.per_tenant

    def slo_for(self, request: Request) -> SLO:
        """The SLO `request` ends up with."""
        own = request.slo
        tenant = self.per_tenant.get(request.tenant, SLO())
        fields_ms: list[float | None] = []
        for name in ("ttft_ms", "tpot_ms"):
            given = (getattr(tenant, name), getattr(self, name))
            order = (*given, getattr(own, name)) if self.override else (getattr(own, name), *given)
            fields_ms.append(next((v for v in order if v is not None), None))
        return SLO(*fields_ms)

    def source(self, requests: Sequence[Request]) -> str:
        """Where the SLOs of `requests` (as read, before `apply`) end up coming from, for
        a report's title: ``none``, ``trace``, ``flags``, ``flags over trace`` (override)
        or ``trace, flags where unset``."""
        in_trace = any(
            r.slo.ttft_ms is not None or r.slo.tpot_ms is not None or r.deadline is not None
            for r in requests
        )
        if self.is_empty:
            return "trace" if in_trace else "none"
        if not in_trace:
            return "flags"
        return "flags over trace" if self.override else "trace, flags where unset"

    def apply(self, requests: Sequence[Request]) -> list[Request]:
        """The requests with their SLOs set as the settings say (order kept)."""
        if self.is_empty:
            return list(requests)
        out = []
        for request in requests:
            slo = self.slo_for(request)
            out.append(request if slo == request.slo else dataclasses.replace(request, slo=slo))
        return out

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON-ready data, for reports that must be reproducible."""
        return {
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "per_tenant": {
                name: {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}
                for name, slo in sorted(self.per_tenant.items())
            },
            "override": self.override,
        }


def parse_tenant_slo(text: str) -> tuple[str, SLO]:
    """``TENANT=TTFT_MS[,TPOT_MS]`` (either number may be left empty) as (tenant, SLO).

    Raises:
        ValueError: quoting the text, when it does not parse or a number is not positive.
    """
    tenant, sep, values = text.partition("=")
    parts = values.split(",")
    if not sep or not tenant or len(parts) > 2 or not any(p.strip() for p in parts):
        raise ValueError(f"expected TENANT=TTFT_MS[,TPOT_MS], got {text!r}")
    numbers: list[float | None] = []
    for part in (*parts, "")[:2]:
        if not part.strip():
            numbers.append(None)
            continue
        try:
            number = float(part)
        except ValueError:
            raise ValueError(f"expected TENANT=TTFT_MS[,TPOT_MS], got {text!r}") from None
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"SLOs must be positive numbers of milliseconds, got {text!r}")
        numbers.append(number)
    return tenant, SLO(*numbers)
