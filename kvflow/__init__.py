"""kvflow: cache-aware LLM request scheduling, tiered KV caching and trace replay."""

from typing import TYPE_CHECKING

from kvflow.config import ConfigError, KVFlowConfig
from kvflow.engine import AsyncEngine, EngineStatistics
from kvflow.kv.location import PrefixLocation
from kvflow.policies.base import Policy, SchedulerView
from kvflow.request import (
    SLO,
    FinishReason,
    Request,
    RequestOutput,
    RequestState,
    RequestStatus,
    SamplingParams,
)
from kvflow.scheduler import Scheduler, StepPlan, StepResult

if TYPE_CHECKING:  # typed as what they are; imported lazily at run time (torch-heavy)
    from kvflow.llm import LLM, CompletionOutput


def __getattr__(name: str) -> object:
    if name in ("LLM", "CompletionOutput"):  # torch-heavy adapters load on first use
        from kvflow import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'kvflow' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "LLM",
    "SLO",
    "AsyncEngine",
    "CompletionOutput",
    "ConfigError",
    "EngineStatistics",
    "FinishReason",
    "KVFlowConfig",
    "Policy",
    "PrefixLocation",
    "Request",
    "RequestOutput",
    "RequestState",
    "RequestStatus",
    "SamplingParams",
    "Scheduler",
    "SchedulerView",
    "StepPlan",
    "StepResult",
    "__version__",
]
