"""Runners that execute plans: simulated now; torch and Hugging Face adapters later."""

from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.simulated import PRESETS, LatencyModel, SimulatedRunner

__all__ = ["PRESETS", "LatencyModel", "ModelRunner", "SimulatedRunner"]
