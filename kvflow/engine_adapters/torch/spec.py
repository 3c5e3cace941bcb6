"""The shape of a Llama-architecture model, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Compute dtypes a model may run in, by name."""

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
"""`model_type`s in `config.json` whose architecture `TorchLlama` implements exactly."""


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> str:
    """bfloat16 on CUDA, float32 on CPU."""
    return "bfloat16" if device.type == "cuda" else "float32"


@dataclass(frozen=True, slots=True)
class LlamaSpec:
    """Hyperparameters of a Llama-architecture decoder.

    `dtype` is the compute dtype by name (a key of `DTYPES`): float32 or float64 on CPU,
    bfloat16 or float16 on CUDA. RMSNorm and the rotary tables are computed in float32
    whatever the dtype, as transformers' Llama does, so float64 logits match
    transformers' float64 logits to rounding.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaSpec.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaSpec.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaSpec.head_dim must be even for rotary, got {self.head_dim}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(
                f"LlamaSpec.rope_theta={self.rope_theta!r} and rms_norm_eps="
                f"{self.rms_norm_eps!r} must be positive"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"LlamaSpec.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch dtype."""
        return DTYPES[self.dtype]

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], dtype: str | None = None) -> LlamaSpec:
        """A spec from the keys of a Llama-family `config.json`.

        Args:
            config: the parsed `config.json`.
            dtype: the compute dtype; defaults to float32 (callers on CUDA pass bfloat16).

        Raises:
            ValueError: the config is not a plain Llama architecture (another
                `model_type`, rope scaling, a sliding window, another activation).
        """
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported by the torch runner; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (use the hf runner for other models)"
            )
        rope = dict(config.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if config.get("rope_scaling") or rope_type != "default":
            raise ValueError(
                f"rope scaling ({config.get('rope_scaling') or rope!r}) is not supported by "
                "the torch runner; use the hf runner for this model"
            )
        if config.get("sliding_window") is not None:
            raise ValueError(
                f"sliding_window={config['sliding_window']!r} is not supported by the torch runner"
            )
        for key in ("attention_bias", "mlp_bias"):
            if config.get(key):
                raise ValueError(f"{key}=true is not supported by the torch runner")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only silu)")
        hidden = _positive_int(config, "hidden_size")
        heads = _positive_int(config, "num_attention_heads")
        head_dim = _positive_int(config, "head_dim", hidden // heads)
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        return cls(
            vocab_size=_positive_int(config, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_positive_int(config, "intermediate_size"),
            num_layers=_positive_int(config, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_positive_int(config, "num_key_value_heads", heads),
            head_dim=head_dim,
            rope_theta=_positive_float("rope_theta", theta),
            rms_norm_eps=_positive_float("rms_norm_eps", config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=_positive_int(config, "max_position_embeddings", 4096),
            dtype=dtype or "float32",
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str | None = None) -> LlamaSpec:
        """Read `model_dir/config.json` (see `from_hf_config`)."""
        path = Path(model_dir) / "config.json"
        try:
            config = json.loads(path.read_text())
        except OSError as err:
            raise ValueError(f"cannot read {str(path)!r}: {err.strerror}") from None
        except ValueError as err:
            raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{str(path)!r} must hold a JSON object, got {config!r:.200}")
        try:
            return cls.from_hf_config(config, dtype)
        except ValueError as err:
            raise ValueError(f"{str(path)!r}: {err}") from None


def _positive_int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    """`config[key]`, a positive integer (`default` when the key is absent or null).

    Raises:
        ValueError: naming the key and quoting the value.
    """
    value = config.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"{key!r} is missing (required)")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r}: expected a positive integer")
    return value


def _positive_float(key: str, value: Any) -> float:
    """`value` of `key`, a finite positive number."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{key}={value!r}: expected a positive number")
    return float(value)
