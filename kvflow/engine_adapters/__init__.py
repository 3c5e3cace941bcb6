"""Runners that execute plans: simulated (latency model), torch (paged-attention Llama,
in `kvflow.engine_adapters.torch`) and Hugging Face transformers (`kvflow.engine_adapters.hf`).
The torch-based ones import only when used."""

from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.simulated import PRESETS, LatencyModel, SimulatedRunner

__all__ = ["PRESETS", "LatencyModel", "ModelRunner", "SimulatedRunner"]
