"""Every knob, as frozen pydantic models.

Field docstrings become the CLI's help. Dotted keys (`scheduler.max_num_seqs`) address
fields for `--set` and for `KVFlowConfig.with_overrides`. Reading files and overrides,
and the one-line errors: `kvflow.config_files` (`ConfigError` is importable from here).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvflow.config_files import ConfigError as ConfigError
from kvflow.config_files import (
    describe_validation_error,
    fill_from_preset_file,
    read_config_file,
    set_dotted,
)
from kvflow.config_files import parse_assignment as parse_assignment
from kvflow.config_files import read_small_file as read_small_file


class _Frozen(BaseModel):
    # No number of the config is infinite or NaN (JSON's 1e999 parses as infinity).
    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False
    )


class SchedulerConfig(_Frozen):
    max_num_batched_tokens: int = Field(default=8192, ge=1)
    """Token budget of one step: decode tokens plus prefill chunk tokens."""
    max_num_seqs: int = Field(default=256, ge=1)
    """Most requests running at once (batch slots)."""
    long_prefill_threshold: int | None = Field(default=None, ge=1)
    """Largest prefill chunk one request may take in a step (None: only the budget caps it)."""
    max_model_len: int = Field(default=131072, ge=1)
    """Longest prompt + output a request may have; longer requests are rejected."""
    enable_prefix_caching: bool = True
    """Reuse cached blocks of earlier requests with the same prefix."""
    preemption_mode: Literal["auto", "swap", "recompute"] = "auto"
    """How a preempted request keeps its KV: swap (its blocks go down to the cpu tier and
    come back on resume), recompute (they are dropped), or whichever the copy model says
    is cheaper (auto). Swap needs a cpu tier."""
    enable_inbatch_prefix_sharing: bool = True
    """Hold back a waiting request whose next uncached block another running request is
    computing, so the shared prefix is computed once."""


class DeviceTierConfig(_Frozen):
    num_blocks: int = Field(default=4096, ge=1)
    """Capacity of the device tier in blocks (ignored when size_mib is set)."""
    size_mib: float | None = Field(default=None, gt=0)
    """Capacity in MiB instead of blocks (divided by the layout's bytes per block)."""


class CPUTierConfig(_Frozen):
    num_blocks: int = Field(default=0, ge=0)
    """Capacity of the CPU DRAM tier in blocks; 0 disables it."""
    size_mib: float | None = Field(default=None, ge=0)
    """Capacity in MiB instead of blocks."""


class DiskTierConfig(_Frozen):
    num_blocks: int = Field(default=0, ge=0)
    """Capacity of the local-disk tier in blocks; 0 disables it. Needs the cpu tier."""
    size_mib: float | None = Field(default=None, ge=0)
    """Capacity in MiB instead of blocks."""
    path: str | None = None
    """Slab file for the disk tier (default: a new file under ~/.cache/kvflow)."""
    fsync: bool = False
    """fsync after each batch of writes (durability; slower)."""
    persist: bool = False
    """Keep the slab across runs: each block is written with a record (key, checksum)
    and the next run at `path` rebuilds the tier from them (docs/disk.md). Needs `path`
    and `peer.model_id` (blocks of different models never mix); the slab is never
    removed. A real store only: the simulator writes no slab and refuses it."""
    verify_on_start: bool = True
    """With `persist`: read and checksum every recovered block at start (a full read of
    the slab), so only good blocks are indexed and announced to peers. Off, blocks are
    checked at their first read (every disk read is), and a bad one is a miss then."""

    @model_validator(mode="after")
    def _persist_needs_path(self) -> DiskTierConfig:
        if self.persist and self.path is None:
            raise ValueError(
                "kv.disk.persist=true needs kv.disk.path (a slab file you own, kept "
                "across runs); the default path is a fresh file each run"
            )
        return self


class KVLayoutConfig(_Frozen):
    """Shape of one block's KV: (num_layers, 2, block_size, num_kv_heads, head_dim)."""

    num_layers: int = Field(default=32, ge=1)
    """Transformer layers (Llama-3-8B: 32)."""
    num_kv_heads: int = Field(default=8, ge=1)
    """KV heads per layer (Llama-3-8B: 8)."""
    head_dim: int = Field(default=128, ge=1)
    """Head dimension (Llama-3-8B: 128)."""
    dtype: Literal["float16", "bfloat16", "float32", "float64"] = "bfloat16"
    """Element type of the KV cache."""

    def bytes_per_token(self) -> int:
        itemsize = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[self.dtype]
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


class TransferConfig(_Frozen):
    """Bandwidth and latency of copies between tiers (the simulator's copy model)."""

    device_to_cpu_gbps: float = Field(default=50.0, gt=0)
    """GB/s device to pinned host (PCIe 5 x16: ~50 GB/s achievable)."""
    cpu_to_device_gbps: float = Field(default=50.0, gt=0)
    """GB/s pinned host to device."""
    cpu_to_disk_gbps: float = Field(default=3.0, gt=0)
    """GB/s host to local NVMe (sequential write)."""
    disk_to_device_gbps: float = Field(default=6.0, gt=0)
    """GB/s local NVMe to device through a host bounce buffer (sequential read)."""
    pcie_latency_us: float = Field(default=10.0, ge=0)
    """Fixed cost of one device<->host copy batch."""
    disk_latency_us: float = Field(default=100.0, ge=0)
    """Fixed cost of one disk read or write batch."""
    peer_gbps: float = Field(default=12.0, gt=0)
    """GB/s of a pull from a peer into the cpu tier. The default is 100 Gb/s RDMA
    (~12 GB/s achievable); loopback TCP through the peer service measured 0.4-1.2 GB/s
    on this project's loaded 2-core VM (`benchmarks/p2p_bandwidth.py` fits the figure
    to put here)."""
    peer_latency_us: float = Field(default=10.0, ge=0)
    """Fixed cost of one pull from a peer (request, lease and reply). The default is
    RDMA's; loopback TCP through the peer service measured up to ~460 us on a loaded VM."""


class KVConfig(_Frozen):
    block_size: int = Field(default=16, ge=1, le=4096)
    """Tokens per KV block."""
    device: DeviceTierConfig = DeviceTierConfig()
    cpu: CPUTierConfig = CPUTierConfig()
    disk: DiskTierConfig = DiskTierConfig()
    layout: KVLayoutConfig = KVLayoutConfig()
    transfer: TransferConfig = TransferConfig()
    write_policy: Literal["write_back", "write_through", "write_through_selective"] = "write_back"
    """When a block is copied one tier down: write_back when it goes cold (its last user
    releases it); write_through as soon as it is computed (device) or lands (cpu);
    write_through_selective like write_through but only for blocks hit at least
    write_through_threshold times, other blocks are dropped on eviction."""
    write_through_threshold: int = Field(default=2, ge=1)
    """Hits before write_through_selective copies a block down."""
    load_policy: Literal["auto", "always", "never"] = "auto"
    """Whether a prefix hit below device is loaded (always), recomputed (never), or
    whichever the copy model says is faster than recomputing (auto)."""
    recompute_token_us: float = Field(default=32.0, ge=0)
    """Estimated cost of recomputing one prefill token, for load-vs-recompute and
    swap-vs-recompute decisions."""

    def bytes_per_block(self) -> int:
        return self.block_size * self.layout.bytes_per_token()

    def tier_blocks(self, tier: Literal["device", "cpu", "disk"]) -> int:
        """A tier's capacity in blocks, from num_blocks or size_mib."""
        section: DeviceTierConfig | CPUTierConfig | DiskTierConfig = getattr(self, tier)
        if section.size_mib is not None:
            return int(section.size_mib * 2**20 // self.bytes_per_block())
        return section.num_blocks

    @model_validator(mode="after")
    def _tiers_consistent(self) -> KVConfig:
        if self.tier_blocks("device") < 1:
            raise ValueError(
                f"kv.device.size_mib={self.device.size_mib!r} holds no block of "
                f"{self.bytes_per_block()} bytes"
            )
        if self.tier_blocks("disk") > 0 and self.tier_blocks("cpu") == 0:
            raise ValueError(
                f"kv.disk.num_blocks={self.disk.num_blocks!r} needs a cpu tier "
                "(kv.cpu.num_blocks > 0): blocks reach disk through cpu"
            )
        return self


class PeerConfig(_Frozen):
    """The peer service (one per instance) and its pulls; see docs/peer.md."""

    host: str = "127.0.0.1"
    """Address the peer service binds; anything but loopback needs `secret`."""
    port: int = Field(default=0, ge=0, le=65535)
    """TCP port of the peer service (0: any free port)."""
    secret: str | None = None
    """Shared secret of the fleet: both ends of a connection prove they know it (HMAC
    challenge-response). Required when `host` is not a loopback address."""
    model_id: str = ""
    """Identity of the weights (a path, name or digest) that goes into the model
    fingerprint with the KV layout: instances whose fingerprints differ exchange no
    blocks."""
    max_frame_bytes: int = Field(default=256 * 2**20, ge=4096)
    """Largest frame either side accepts (header excluded); a larger announced length
    closes the connection before its payload is read."""
    max_inflight_pulls: int = Field(default=16, ge=1)
    """Pulls one connection may have outstanding at once; more are answered with an
    ERROR frame."""
    max_connections: int = Field(default=64, ge=1)
    """Connections the service holds at once; more are closed on accept."""
    lease_ttl_s: float = Field(default=10.0, gt=0)
    """How long the owner pins the blocks of one pull; a transfer not done by then is
    abandoned (the connection closes) and the pins are released."""
    pull_timeout_s: float = Field(default=5.0, gt=0)
    """A pull not answered in full within this time fails and marks the peer down."""
    handshake_timeout_s: float = Field(default=5.0, gt=0)
    """Time allowed for the HELLO/CHALLENGE/AUTH exchange."""
    event_interval_s: float = Field(default=0.05, gt=0)
    """How often a service sends its batched block events to subscribed peers."""
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    """How often a service sends a heartbeat (with its last event number)."""
    heartbeat_timeout_s: float = Field(default=5.0, gt=0)
    """A peer not heard from for this long is marked down and its entries dropped."""
    handoff_lease_s: float = Field(default=30.0, gt=0)
    """Prefill/decode handoff, prefill side: how long a prompt's blocks stay pinned for
    the decode instance to pull (released sooner when it pulled them)."""
    handoff_wait_s: float = Field(default=2.0, gt=0)
    """Handoff, decode side: how long to wait for a connection to the prefill
    instance's peer service before giving up on the handoff and recomputing."""


class SimRunnerConfig(_Frozen):
    """Latency model of one step (see `kvflow.engine_adapters.simulated.LatencyModel`):
    fixed + prefill tokens * a + decode sequences * b + KV tokens attended * c, plus the
    terms a calibration fits (prefill attention, per-chunk, padded decode, engine)."""

    preset: str | None = "llama3-8b-h100"
    """Named latency preset (see kvflow.engine_adapters.simulated.PRESETS); fields set
    explicitly below override it."""
    preset_file: str | None = None
    """A preset JSON file written by `kvflow calibrate`; used instead of `preset` when
    set. Fields set explicitly below override it."""
    fixed_ms: float | None = Field(default=None, ge=0)
    """Fixed cost of a step in ms (weights read, launch overheads)."""
    prefill_token_us: float | None = Field(default=None, ge=0)
    """Cost per prefill token in microseconds."""
    decode_seq_us: float | None = Field(default=None, ge=0)
    """Cost per decoding sequence in microseconds."""
    kv_token_ns: float | None = Field(default=None, ge=0)
    """Cost per KV-cache token attended in nanoseconds (context length summed over the batch)."""
    prefill_attn_ns: float | None = Field(default=None, ge=0)
    """Cost per query x key pair of prefill attention in ns: a chunk of l tokens after
    `start` cached ones has l * (start + l). Presets without it: 0."""
    prefill_seq_us: float | None = Field(default=None, ge=0)
    """Cost per prefill chunk in a step in microseconds. Presets without it: 0."""
    decode_padded_kv_ns: float | None = Field(default=None, ge=0)
    """Cost per token of a padded decode batch in ns (decode sequences x the longest
    decode context). Presets without it: 0."""
    step_overhead_ms: float | None = Field(default=None, ge=0)
    """The engine's own time per step around the runner (thread hop, commit) in ms.
    Presets without it: 0."""
    seq_overhead_us: float | None = Field(default=None, ge=0)
    """The engine's own time per scheduled request per step (commit, streaming) in
    microseconds. Presets without it: 0."""
    overlap: bool = False
    """Model the async engine's overlapped scheduling in virtual-time replay: step N+1
    is planned when step N starts (so it misses requests arriving during step N) and
    runs after step N's commit, as `AsyncEngine` does by default."""


class LPMOptions(_Frozen):
    candidate_window: int = Field(default=128, ge=1)
    """Only the first N waiting requests (in arrival order) are ranked, bounding the cost
    of ordering a long queue; SGLang falls back to FCFS past a similar length."""
    max_wait_s: float = Field(default=5.0, gt=0)
    """Aging bound: a request waiting this long goes ahead of cache hits, so a cache miss
    is never passed over for longer."""
    cpu_weight: float = Field(default=0.9, ge=0, le=1)
    """Worth of a token cached in cpu relative to one on device (it must be loaded)."""
    disk_weight: float = Field(default=0.6, ge=0, le=1)
    """Worth of a token cached on disk (or at a peer) relative to one on device."""


class EDFOptions(_Frozen):
    hopeless: str = Field(default="deprioritize", pattern="^(keep|deprioritize|reject)$")
    """What to do with a request whose deadline can no longer be met: keep its place,
    deprioritize it behind feasible requests, or reject it."""
    prefill_token_s: float = Field(default=40e-6, ge=0)
    """Service-time estimate per uncached prompt token, for slack."""


class PriorityOptions(_Frozen):
    preempt: bool = False
    """Preempt a running request of lower priority when a more important one cannot
    otherwise be admitted."""


class FairOptions(_Frozen):
    input_weight: float = Field(default=1.0, ge=0)
    """Virtual-counter charge per prefill token."""
    output_weight: float = Field(default=2.0, ge=0)
    """Virtual-counter charge per decode token."""


class PoliciesConfig(_Frozen):
    lpm: LPMOptions = LPMOptions()
    edf: EDFOptions = EDFOptions()
    priority: PriorityOptions = PriorityOptions()
    fair: FairOptions = FairOptions()


class CacheAwareOptions(_Frozen):
    balance_abs_threshold: int = Field(default=65536, ge=0)
    """Loads (queued prefill tokens + running decodes) diverge when the most loaded
    instance exceeds the least loaded by more than this and by more than
    balance_rel_threshold times; then the least loaded instance gets the request (as
    SGLang's router switches to shortest-queue). Below that, the expected-TTFT cost
    already weighs queues against cache hits; this is the safety net (65536 tokens is
    ~2 s of prefill at 32 us a token)."""
    balance_rel_threshold: float = Field(default=4.0, ge=1)
    """See balance_abs_threshold: the ratio of the highest load to the lowest (+1)."""


class PowerOfTwoOptions(_Frozen):
    seed: int = 0
    """Seed of the two random choices per request (the same seed, the same choices)."""


class RouterConfig(_Frozen):
    """Which instance of a fleet serves each request (see kvflow.cluster.routers)."""

    name: str = "cache-aware"
    """Router used when none is named (built-in: round-robin, least-loaded, power-of-two,
    cache-aware; plugins register under the entry-point group kvflow.routers)."""
    cache_aware: CacheAwareOptions = CacheAwareOptions()
    power_of_two: PowerOfTwoOptions = PowerOfTwoOptions()


class KVFlowConfig(_Frozen):
    """The whole configuration of one kvflow instance."""

    scheduler: SchedulerConfig = SchedulerConfig()
    kv: KVConfig = KVConfig()
    sim: SimRunnerConfig = SimRunnerConfig()
    policies: PoliciesConfig = PoliciesConfig()
    peer: PeerConfig = PeerConfig()
    router: RouterConfig = RouterConfig()

    @model_validator(mode="after")
    def _consistent(self) -> KVFlowConfig:
        threshold = self.scheduler.long_prefill_threshold
        if threshold is not None and threshold > self.scheduler.max_num_batched_tokens:
            raise ValueError(
                f"scheduler.long_prefill_threshold={threshold!r} exceeds "
                f"scheduler.max_num_batched_tokens={self.scheduler.max_num_batched_tokens!r}"
            )
        return self

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
    ) -> KVFlowConfig:
        """Read a JSON or TOML file (or defaults when None), then apply dotted overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            data = read_config_file(Path(path))
        return cls.from_dict(data, overrides)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
    ) -> KVFlowConfig:
        try:
            merged = json.loads(json.dumps(dict(data)))  # deep copy of plain data
        except RecursionError:
            raise ConfigError("invalid config: values nest too deeply") from None
        for key, value in (overrides or {}).items():
            set_dotted(merged, key, value)
        fill_from_preset_file(merged)
        try:
            return cls.model_validate(merged)
        except ValidationError as err:
            raise ConfigError(describe_validation_error(err)) from None

    def with_overrides(self, overrides: Mapping[str, Any]) -> KVFlowConfig:
        # Only what was set: a preset file named in the overrides fills in the rest.
        return self.from_dict(self.model_dump(exclude_unset=True), overrides)
