"""The engine a server hosts: loaded in the background (the server answers /health with
503 meanwhile), run until shutdown, then drained or aborted."""

from __future__ import annotations

import contextlib
import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread
from prometheus_client import CollectorRegistry

from kvflow.config import KVFlowConfig
from kvflow.engine import AsyncEngine
from kvflow.engine_adapters.base import ModelRunner
from kvflow.engine_adapters.text import TextCodec
from kvflow.kv.store import KVStore
from kvflow.serve.metrics import EngineMetrics, ServerCollector
from kvflow.serve.serving import OpenAIServing, ServedModel

if TYPE_CHECKING:
    from kvflow.peer.node import PeerNode

logger = logging.getLogger("kvflow.serve")

ServeEngineName = Literal["sim", "torch", "hf"]

SIM_MODEL_NAME = "kvflow-sim"


class HostStatus(enum.StrEnum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What `kvflow serve` was asked to serve."""

    engine: ServeEngineName = "sim"
    model: str | None = None
    """Checkpoint directory (engines torch and hf)."""
    dtype: str | None = None
    policy: str = "fcfs"
    config_file: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    """Dotted config overrides (`--set`)."""
    served_model_name: str | None = None
    """The name clients send as `model` (default: the --model argument, or kvflow-sim)."""
    max_num_pending: int = 4096
    on_close: Literal["drain", "abort"] = "drain"
    seed: int = 0
    peers: tuple[str, ...] | None = None
    """Run a peer service and pull from these peers (`host:port`); None: no peer layer."""
    role: Literal["both", "prefill", "decode"] = "both"
    """Prefill/decode disaggregation role (reported on /health; see `kvflow serve --role`)."""

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model if self.model is not None else SIM_MODEL_NAME


@dataclass(frozen=True, slots=True)
class _Loaded:
    config: KVFlowConfig
    runner: ModelRunner
    store: KVStore | None
    codec: TextCodec
    vocab_size: int


def load(options: ServeOptions) -> _Loaded:
    """Build the runner, store and text codec (blocking: a model loads here).

    Raises:
        ConfigError, ValueError, OSError: bad settings or an unloadable model.
    """
    if options.engine == "sim":
        from kvflow.engine_adapters.realtime_sim import RealTimeSimRunner
        from kvflow.engine_adapters.text import PlaceholderCodec

        config = KVFlowConfig.load(options.config_file, options.settings)
        runner = RealTimeSimRunner.from_config(config.sim)
        # Any uint32 token id is a valid prompt: traces' ids run as they are.
        return _Loaded(config, runner, None, PlaceholderCodec(), 2**32)
    from kvflow.engine_adapters.factory import build_runner, load_model
    from kvflow.engine_adapters.text import HFTextCodec

    if options.model is None:
        raise ValueError(f"--engine {options.engine} needs --model DIR")
    try:
        codec = HFTextCodec.from_model_dir(options.model)
    except ValueError as err:
        raise ValueError(f"--model {err}") from None
    model = load_model(options.model, options.engine, options.dtype)
    settings = dict(options.settings)
    settings.setdefault("scheduler.max_model_len", model.max_position_embeddings)
    if options.peers is not None:
        # The model's identity defaults to the served name, for the peer fingerprint and
        # a persistent disk tier's alike (one identity: the slab's blocks are served).
        config = KVFlowConfig.load(options.config_file, {**model.layout, **settings})
        if not config.peer.model_id:
            settings["peer.model_id"] = options.model_name
    built = build_runner(model, settings, config_file=options.config_file, seed=options.seed)
    return _Loaded(built.config, built.runner, built.store, codec, model.vocab_size)


class EngineHost:
    """Loads and runs one `AsyncEngine` for a server; `metrics` reads it at scrape time."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.status = HostStatus.LOADING
        self.failure: str | None = None
        self.engine: AsyncEngine | None = None
        self.serving: OpenAIServing | None = None
        self.registry = CollectorRegistry()
        self.metrics = EngineMetrics(lambda: self.engine, options.model_name, self.registry)
        self.registry.register(ServerCollector(self._num_in_flight, options.model_name))
        self.peer_node: PeerNode | None = None
        if options.peers is not None:
            from kvflow.serve.peer_metrics import PeerCollector

            self.registry.register(PeerCollector(lambda: self.peer_node, options.model_name))
        self._stop = anyio.Event()
        self._stopped = anyio.Event()

    def _num_in_flight(self) -> int:
        return 0 if self.serving is None else len(self.serving.in_flight)

    async def run(self) -> None:
        """Load, serve until `stop`, then close the engine (drain or abort by
        `on_close`). A failure to load sets `failure` and returns."""
        store: KVStore | None = None
        try:
            try:
                loaded = await anyio.to_thread.run_sync(load, self.options)
                store = loaded.store
                # The engine builds the scheduler's store when the runner brings none
                # (--engine sim): a size the machine cannot hold fails here, as a load.
                engine = AsyncEngine(
                    loaded.config,
                    loaded.runner,
                    self.options.policy,
                    loaded.store,
                    max_num_pending=self.options.max_num_pending,
                    on_close=self.options.on_close,
                )
            except Exception as err:  # reported by the CLI, which exits 1
                self.failure = str(err) or type(err).__name__
                self.status = HostStatus.FAILED
                return
            try:
                await self._serve(engine, loaded)
            except Exception as err:  # the step loop failed (a runner error): stop serving
                from kvflow.peer.identity import PeerConfigError

                leaf = _first_leaf(err)
                if isinstance(leaf, PeerConfigError):  # the peer service could not start
                    self.failure = str(leaf)
                else:
                    self.failure = f"the engine failed: {type(leaf).__name__}: {leaf}"
                self.status = HostStatus.FAILED
        finally:
            if store is not None:
                store.close()
            self._stopped.set()

    async def _serve(self, engine: AsyncEngine, loaded: _Loaded) -> None:
        async with engine, contextlib.AsyncExitStack() as stack:
            if self.options.peers is not None:
                self.peer_node = await stack.enter_async_context(self._peer_node(engine, loaded))
            self.engine = engine
            served = ServedModel(
                name=self.options.model_name,
                engine_name=self.options.engine,
                codec=loaded.codec,
                engine=engine,
                max_model_len=loaded.config.scheduler.max_model_len,
                vocab_size=loaded.vocab_size,
                metrics=self.metrics.requests,
            )
            self.serving = OpenAIServing(served)
            if self.status is HostStatus.LOADING:
                self.status = HostStatus.SERVING
                logger.info("kvflow: serving %r", self.options.model_name)
            await self._stop.wait()
            if self.options.on_close == "abort":
                self.abort_all()

    def _peer_node(self, engine: AsyncEngine, loaded: _Loaded) -> PeerNode:
        """The peer layer beside the engine, on its loop; the model's identity defaults
        to the served model's name (`load` set it already for a store with bytes)."""
        from kvflow.peer.node import PeerAddress, PeerNode

        config = loaded.config.peer
        if not config.model_id:
            config = config.model_copy(update={"model_id": self.options.model_name})
        peers = [PeerAddress.parse(p) for p in self.options.peers or ()]
        node = PeerNode(engine.scheduler.store, config, peers)
        logger.info(
            "kvflow: peer service on %s (peers: %s)", config.host, ", ".join(map(str, peers))
        )
        return node

    def begin_draining(self) -> None:
        """Shutdown was asked for: /health answers 503, new requests are refused; with
        `on_close="abort"` the requests in flight are aborted now."""
        if self.status is not HostStatus.FAILED:
            self.status = HostStatus.DRAINING
        if self.options.on_close == "abort":
            self.abort_all()

    def abort_all(self) -> None:
        if self.engine is not None and self.serving is not None:
            for rid in list(self.serving.in_flight):
                self.engine.abort(rid)

    async def stop(self) -> None:
        """Close the engine and wait until it has."""
        self.begin_draining()
        self._stop.set()
        await self._stopped.wait()


def _first_leaf(err: BaseException) -> BaseException:
    """The first leaf of an exception group (task groups wrap what their tasks raise)."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return err


__all__ = ["EngineHost", "HostStatus", "ServeEngineName", "ServeOptions", "load"]
