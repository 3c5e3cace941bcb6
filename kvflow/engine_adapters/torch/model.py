"""A Llama-architecture decoder in plain torch, computing over kvflow's paged KV cache.

The module tree mirrors transformers' `LlamaForCausalLM`, so parameter names are the
Hugging Face ones (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`,
..., `lm_head.weight`) and a checkpoint loads with `load_state_dict`. The numerics
follow transformers' too: RMSNorm and the rotary tables are computed in float32 and cast
back, so float64 runs agree with transformers' float64 to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvflow.engine_adapters.eos import read_eos_token_ids
from kvflow.engine_adapters.torch.attention import (
    allocate_kv_cache,
    kv_cache_shape,
    paged_attention,
)
from kvflow.engine_adapters.torch.batch import BatchEntry, ForwardBatch, build_batch
from kvflow.engine_adapters.torch.spec import LlamaSpec, default_device, default_dtype


def _linear(size_in: int, size_out: int) -> nn.Linear:
    return nn.Linear(size_in, size_out, bias=False, device="meta")


class _Weight(nn.Module):
    """A module holding one uninitialised (meta) `weight` of `shape`: a norm's, or the
    token embedding's (looked up with `F.embedding`). Not `nn.Embedding`, whose random
    initialisation, even on the meta device, imports torch._dynamo (about a second)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape, device="meta"))


class _Attention(nn.Module):
    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        q_size = spec.num_heads * spec.head_dim
        kv_size = spec.num_kv_heads * spec.head_dim
        self.q_proj = _linear(spec.hidden_size, q_size)
        self.k_proj = _linear(spec.hidden_size, kv_size)
        self.v_proj = _linear(spec.hidden_size, kv_size)
        self.o_proj = _linear(q_size, spec.hidden_size)


class _MLP(nn.Module):
    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.gate_proj = _linear(spec.hidden_size, spec.intermediate_size)
        self.up_proj = _linear(spec.hidden_size, spec.intermediate_size)
        self.down_proj = _linear(spec.intermediate_size, spec.hidden_size)


class _DecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.input_layernorm = _Weight(spec.hidden_size)
        self.self_attn = _Attention(spec)
        self.post_attention_layernorm = _Weight(spec.hidden_size)
        self.mlp = _MLP(spec)


class _Body(nn.Module):
    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.embed_tokens = _Weight(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(_DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = _Weight(spec.hidden_size)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in float32, cast back to `x`'s dtype, then scaled (as transformers does)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotary_tables(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin, [num_tokens, 1, head_dim], computed in float32 and cast to `dtype`."""
    freqs = positions[:, None].to(torch.float32) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half rotary embedding of x [num_tokens, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TorchLlama(nn.Module):
    """A Llama-architecture causal LM whose forward reads and writes a paged KV cache.

    Build one with `TorchLlama.from_pretrained(dir)` (a Hugging Face checkpoint
    directory: `config.json` + `*.safetensors`) or `TorchLlama.random(spec, seed)`.
    """

    def __init__(self, spec: LlamaSpec, device: torch.device | str | None = None) -> None:
        """A model with uninitialised (meta) weights; use the constructors above."""
        super().__init__()
        self.spec = spec
        self.eos_token_ids: tuple[int, ...] = ()
        """End-of-sequence tokens (from the checkpoint's generation config or config)."""
        self.device = torch.device(device) if device is not None else default_device()
        self.model = _Body(spec)
        self.lm_head = _linear(spec.hidden_size, spec.vocab_size)
        self._layers: list[_DecoderLayer] = [
            layer for layer in self.model.layers if isinstance(layer, _DecoderLayer)
        ]
        dim = spec.head_dim
        # Exactly transformers' float32 computation of the inverse frequencies.
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=self.device) / dim
        self.inv_freq: Tensor = 1.0 / (spec.rope_theta**exponents)
        self._fused: list[tuple[Tensor, Tensor]] = []
        """Per layer: the q/k/v weights stacked, and the gate/up weights stacked."""

    # -- construction ------------------------------------------------------------
    @classmethod
    def random(
        cls,
        spec: LlamaSpec,
        seed: int = 0,
        device: torch.device | str | None = None,
        init_std: float = 0.02,
    ) -> TorchLlama:
        """A model with weights drawn from N(0, init_std²) (norm weights 1), reproducibly
        from `seed` (the draws are made on the CPU, then moved)."""
        model = cls(spec, device)
        gen = torch.Generator().manual_seed(seed)
        state: dict[str, Tensor] = {}
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                state[name] = torch.ones(param.shape, dtype=torch.float64)
            else:
                state[name] = torch.randn(param.shape, generator=gen, dtype=torch.float64)
                state[name] *= init_std
        model.load_weights(state)
        return model

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        dtype: str | None = None,
        device: torch.device | str | None = None,
    ) -> TorchLlama:
        """Load a Llama-family checkpoint directory (`config.json` + `*.safetensors`).

        Args:
            model_dir: the directory `save_pretrained` wrote.
            dtype: compute dtype (a `LlamaSpec` dtype name); defaults to bfloat16 on CUDA
                and float32 on CPU.
            device: defaults to CUDA when available, else CPU.

        Raises:
            ValueError: unsupported architecture, no weights, or weights that do not fit.
        """
        from safetensors.torch import load_file

        dev = torch.device(device) if device is not None else default_device()
        spec = LlamaSpec.from_pretrained(model_dir, dtype or default_dtype(dev))
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {str(model_dir)!r}")
        state: dict[str, Tensor] = {}
        for file in files:
            state.update(load_file(str(file), device="cpu"))
        model = cls(spec, dev)
        model.load_weights(state)
        model.eos_token_ids = read_eos_token_ids(model_dir)
        return model

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Take weights by Hugging Face name, cast to the spec's dtype on this device.
        With tied embeddings `lm_head.weight` may be absent (it is the embedding).

        Raises:
            ValueError: names missing or unexpected, or shapes that do not match.
        """
        state = dict(state)
        if self.spec.tie_word_embeddings:
            state.pop("lm_head.weight", None)
            if "model.embed_tokens.weight" in state:
                state["lm_head.weight"] = state["model.embed_tokens.weight"]
        state.pop("model.rotary_emb.inv_freq", None)  # written by some old checkpoints
        dtype = self.spec.torch_dtype
        converted = {k: v.to(device=self.device, dtype=dtype) for k, v in state.items()}
        try:
            self.load_state_dict(converted, strict=True, assign=True)
        except RuntimeError as err:
            raise ValueError(f"weights do not fit {self.spec}: {err}") from None
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.requires_grad_(False)
        self._fuse_projections()

    def _fuse_projections(self) -> None:
        """Concatenate q/k/v and gate/up weights so each takes one matmul; the named
        parameters become views of the fused tensors (no extra memory)."""
        self._fused = []
        for layer in self._layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            start = 0
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                rows = proj.weight.shape[0]
                proj.weight = nn.Parameter(qkv[start : start + rows], requires_grad=False)
                start += rows
            rows = mlp.gate_proj.weight.shape[0]
            mlp.gate_proj.weight = nn.Parameter(gate_up[:rows], requires_grad=False)
            mlp.up_proj.weight = nn.Parameter(gate_up[rows:], requires_grad=False)
            self._fused.append((qkv, gate_up))

    # -- compute ------------------------------------------------------------------
    def kv_cache_shape(
        self, num_blocks: int, block_size: int
    ) -> tuple[int, int, int, int, int, int]:
        """`[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`."""
        spec = self.spec
        return kv_cache_shape(
            num_blocks, spec.num_layers, block_size, spec.num_kv_heads, spec.head_dim
        )

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> Tensor:
        """A zeroed KV cache for this model, in its dtype, on its device."""
        shape = self.kv_cache_shape(num_blocks, block_size)
        return allocate_kv_cache(shape, self.spec.torch_dtype, self.device)

    def forward(self, batch: ForwardBatch, kv_cache: Tensor) -> Tensor:
        """Run one mixed batch; write its KV into `kv_cache`.

        Returns:
            Logits [len(batch.logits_indices) or num_tokens, vocab_size] in the model dtype.
        """
        spec = self.spec
        num_tokens = batch.num_tokens
        dtype = spec.torch_dtype
        h = F.embedding(batch.input_ids, self.model.embed_tokens.weight)
        cos, sin = rotary_tables(batch.positions, self.inv_freq, dtype)
        eps = spec.rms_norm_eps
        q_size = spec.num_heads * spec.head_dim
        kv_size = spec.num_kv_heads * spec.head_dim
        for index, (layer, (qkv_weight, gate_up_weight)) in enumerate(
            zip(self._layers, self._fused, strict=True)
        ):
            x = rms_norm(h, layer.input_layernorm.weight, eps)
            qkv = F.linear(x, qkv_weight)
            q, k, v = qkv[:, :q_size], qkv[:, q_size : q_size + kv_size], qkv[:, q_size + kv_size :]
            q = apply_rotary(q.view(num_tokens, spec.num_heads, spec.head_dim), cos, sin)
            k = apply_rotary(k.view(num_tokens, spec.num_kv_heads, spec.head_dim), cos, sin)
            v = v.reshape(num_tokens, spec.num_kv_heads, spec.head_dim)
            attn_out = paged_attention(q, k, v, kv_cache, index, batch)
            h = h + F.linear(attn_out, layer.self_attn.o_proj.weight)
            x = rms_norm(h, layer.post_attention_layernorm.weight, eps)
            gate, up = F.linear(x, gate_up_weight).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer.mlp.down_proj.weight)
        if batch.logits_indices is not None:
            h = h[batch.logits_indices]
        return F.linear(rms_norm(h, self.model.norm.weight, eps), self.lm_head.weight)

    @torch.inference_mode()
    def prompt_logits(self, token_ids: Sequence[int], block_size: int = 16) -> Tensor:
        """Logits at every position of `token_ids`, computed in one prefill over a
        scratch cache: [len(token_ids), vocab_size]."""
        num_blocks = -(-len(token_ids) // block_size)
        cache = self.allocate_kv_cache(num_blocks, block_size)
        entry = BatchEntry(list(token_ids), 0, list(range(num_blocks)), True)
        batch = build_batch([entry], block_size, self.device, all_logits=True)
        return self.forward(batch, cache)
