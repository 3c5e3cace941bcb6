"""kvflow: cache-aware LLM request scheduling, tiered KV caching and trace replay."""

from kvflow.config import ConfigError, KVFlowConfig
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

__version__ = "0.1.0"

__all__ = [
    "SLO",
    "ConfigError",
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
