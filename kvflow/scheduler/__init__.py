"""The step planner (pure, synchronous) and the data it exchanges with runners."""

from kvflow.scheduler.core import Scheduler
from kvflow.scheduler.plan import ModelInfo, StepPlan, StepResult
from kvflow.scheduler.stats import SchedulerStats

__all__ = ["ModelInfo", "Scheduler", "SchedulerStats", "StepPlan", "StepResult"]
