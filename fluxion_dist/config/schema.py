"""The deployment config: one frozen dataclass per subsystem, read from one YAML.

Each field carries its documentation and its allowed range in ``metadata`` (``doc``,
``ge``, ``gt``, ``le``); enumerations are ``Literal``; byte sizes are ``ByteSize`` and
accept ``"64GiB"``. The loader (``loader.py``) walks these types, so adding a field here
is all it takes to make it configurable and validated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NewType

ByteSize = NewType("ByteSize", int)
"""An integer number of bytes; YAML may write it as ``"512MiB"`` or ``"64GiB"``."""

SparsePolicy = Literal["full", "quest_gpu", "cpu_only", "fixed_hybrid", "fluxion"]


def doc(text: str, **limits: float) -> dict:
    return {"doc": text, **limits}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    path: str | None = field(default=None, metadata=doc(
        "HF-format checkpoint directory (config.json + *.safetensors); 'builtin:quality': the shipped "
        "long-context quality model; unset: the tiny seeded model"))
    seed: int = field(default=0, metadata=doc("seed of the tiny model's random weights", ge=0))
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata=doc("compute dtype"))
    max_model_len: int = field(default=32768, metadata=doc("longest prompt + output, in tokens", ge=16))
    load_format: Literal["auto", "dummy"] = field(default="auto", metadata=doc(
        "auto: the checkpoint's safetensors (or the tiny model when path is unset); dummy (vLLM's "
        "meaning): only path's config.json is read and the weights are seeded random ones, built "
        "directly on the device in dtype; path may name a directory, a config.json, or "
        "'builtin:llama-3.1-8b' / 'builtin:qwen3-8b'"))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=doc(
        "where a worker keeps the weights: cpu; cuda (the worker's GPU; an error where none is "
        "usable); auto: cuda where the process can use a GPU (a worker given decode.num_gpus or "
        "prefill.num_gpus > 0: Ray hides the GPUs from the others), else the CPU"))

    def __post_init__(self) -> None:
        from fluxion_dist.errors import ConfigError
        if self.load_format == "dummy" and self.path is None:
            raise ConfigError("model.load_format: 'dummy' needs model.path to name an HF config.json "
                              "(a directory, a config.json file, or 'builtin:llama-3.1-8b' / 'builtin:qwen3-8b')")


@dataclass(frozen=True, slots=True)
class KVStoreConfig:
    capacity: ByteSize = field(default=ByteSize(256 << 20), metadata=doc(
        "bytes of host memory for KV pages per store", ge=1 << 20))
    lease_ttl_s: float = field(default=60.0, metadata=doc(
        "seconds a request's pages live without a decoder claiming them", gt=0))
    pin_memory: Literal["auto", "on", "off"] = field(default="auto", metadata=doc(
        "page-lock and map the arena for GPU reads (auto: when a CUDA device is present)"))


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """The KV transfer prefill -> decode. The one transport config: ``kv_store`` runs on it."""

    backend: Literal["ucx", "fake"] = field(default="ucx", metadata=doc(
        "ucx: UCXX between processes; fake: in-process, for tests"))
    ucx_tls: str = field(default="sm,self,tcp", metadata=doc(
        "UCX_TLS for the transfer endpoints: 'sm,self' (or 'tcp,cma') within a host, 'tcp' or 'rc' "
        "across hosts"))
    ucx_net_devices: str = field(default="all", metadata=doc("UCX_NET_DEVICES, e.g. 'lo' or 'mlx5_0:1'"))
    ucx_error_handling: bool = field(default=False, metadata=doc(
        "UCX peer error handling; UCX refuses it with shared-memory endpoints, so it suits tcp/rc "
        "only (the heartbeat notices a dead peer either way)"))
    layers_in_flight: int = field(default=4, metadata=doc(
        "layers a prefill worker may have on the wire at once", ge=1, le=256))
    timeout_s: float = field(default=30.0, metadata=doc(
        "a transfer or peer with no progress for this long fails (its pages are freed)", gt=0))
    heartbeat_s: float = field(default=1.0, metadata=doc(
        "each side of a KV connection pings the other this often; under timeout_s / 2", gt=0))
    connect_timeout_s: float = field(default=10.0, metadata=doc(
        "a prefill worker's handshake with a decode worker's KV server fails after this long", gt=0))
    offer_deadline_s: float = field(default=30.0, metadata=doc(
        "an admitted request whose KV offer has not reached the decode worker by then is forgotten "
        "and its reserved pages freed", gt=0))
    bulk_tags: bool = field(default=False, metadata=doc(
        "tag each layer's bulk KV bytes (HMAC-SHA256 under the deployment's secret) and commit a request "
        "only if they match, so a payload corrupted or injected in transit fails its request; costs one "
        "hash pass over the KV on each side (about 1 GB/s per core: well under UCX's line rate), on "
        "threads beside the wire. Off by default: hellos and offers are authenticated, so only the "
        "deployment's workers push, and the bulk bytes are trusted to the network between them, as "
        "UCX itself trusts it; turn it on where that network is not trusted (every worker of a "
        "deployment must agree)"))

    def __post_init__(self) -> None:
        from fluxion_dist.errors import ConfigError
        if not self.ucx_tls or any(not part.strip() for part in self.ucx_tls.split(",")):
            raise ConfigError(f"transport.ucx_tls: {self.ucx_tls!r} is not a comma list of UCX transports")
        for name in ("layers_in_flight", "timeout_s", "heartbeat_s", "connect_timeout_s", "offer_deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"transport.{name}: {getattr(self, name)!r} is out of range; must be > 0")
        if not self.timeout_s > 2 * self.heartbeat_s:
            raise ConfigError(f"transport.timeout_s ({self.timeout_s}) must exceed twice transport.heartbeat_s "
                              f"({self.heartbeat_s}), or live peers are declared dead")

    def ucx_env(self) -> dict[str, str]:
        """UCX variables for the process that will use UCX (a Ray actor's runtime_env env_vars)."""
        return {"UCX_TLS": self.ucx_tls, "UCX_NET_DEVICES": self.ucx_net_devices,
                "UCX_WARN_UNUSED_ENV_VARS": "n"}


@dataclass(frozen=True, slots=True)
class SparseConfig:
    policy: SparsePolicy = field(default="full", metadata=doc(
        "decode attention: full | quest_gpu | cpu_only | fixed_hybrid | fluxion"))
    budget: float = field(default=0.05, metadata=doc(
        "fraction of the KV a step reads, averaged over all layers and KV heads of a request: the "
        "fixed policies give every head this share; fluxion pools it across the layers and heads and "
        "grants it by measured demand (the same total, spent where the output needs it)", gt=0, le=1))
    mass_target: float = field(default=0.95, metadata=doc(
        "fluxion: estimated softmax mass each head's demand must reach", gt=0, le=1))
    floor_fraction: float = field(default=1.0, metadata=doc(
        "fluxion: every head keeps at least this fraction of the budget (never less than its sinks and "
        "window) before the rest of the pool is granted by measured demand; 1.0: every head at least "
        "Quest's share (the default: lower floors lost accuracy on the quality model at 4k tokens with "
        "the bound-softmax demand)", ge=0, le=1))
    head_predictor: bool = field(default=False, metadata=doc(
        "fluxion: heads whose measured demand lies inside the sinks and window (local heads) get only "
        "those blocks, giving their floor back to the pool (off by default: it did not pay on the "
        "quality model at 4k tokens)"))
    rescore_factor: float = field(default=0.0, metadata=doc(
        "fluxion: a second selection stage; 0: off. Of the top ceil(rescore_factor x k) blocks of "
        "each head by Quest bound (k: its planned blocks, sinks and window included), keep the k "
        "with the most exact softmax mass, each candidate's key-block read and scored exactly "
        "(per query head the log-sum-exp of its 16 tokens' q.k). Trades the candidates' K reads "
        "(rescore_factor x the budget, again over PCIe on a GPU where they are not cached) for "
        "blocks ranked by true mass instead of an upper bound; >= 1 when on (off by default: on the "
        "quality model at 8k tokens it cut the output error 0.79 -> 0.67 at an equal budget, its GPU cost "
        "is not measured yet)", ge=0))
    token_refine_factor: float = field(default=0.0, metadata=doc(
        "fluxion on the CPU path (operator device cpu): block -> token refinement (AsyncTLS); 0: off. "
        "Of the top ceil(token_refine_factor x k) blocks of each head by Quest bound, score every "
        "token exactly (the max over the group's query heads of q.k) and attend only the best k x 16 "
        "of them (sinks and window whole), so the budget buys tokens instead of blocks; >= 1 when on, "
        "not with rescore_factor; rejected on the GPU pipeline, which selects whole blocks (off by default: "
        "on the quality model it raised the output error and slowed the CPU step, docs/benchmarks.md)", ge=0))
    max_output_error: float = field(default=0.0, metadata=doc(
        "fluxion: a quality target instead of a fixed average budget; 0: off. Each row reads its sinks and "
        "window plus the blocks its demand pass finds holding 1 - max_output_error of the estimated softmax "
        "mass (the output's error is about the missing mass times the spread of the values), at least its "
        "floor (floor_fraction of budget), the request's average capped at max_request_budget; budget is "
        "also the share of a request whose demand is not measured yet. Overrides mass_target", ge=0, le=0.5))
    max_request_budget: float = field(default=0.25, metadata=doc(
        "largest budget a request's own sparse.budget may ask for", gt=0, le=1))
    sink_tokens: int = field(default=16, metadata=doc("leading tokens always attended", ge=0))
    recent_tokens: int = field(default=128, metadata=doc("trailing tokens always attended", ge=0))
    cpu_threads: int = field(default=0, metadata=doc(
        "threads of the CPU attention path; 0: all cores of the worker", ge=0))
    gpu_cache_blocks: int = field(default=4096, metadata=doc(
        "16-token (block, head) slots in the GPU block cache", ge=0))
    cache_admission: Literal["every_miss", "reused"] = field(default="every_miss", metadata=doc(
        "which cache misses the GPU copies into the block cache: every_miss, or reused (only blocks the "
        "layer also selected within its last cache_reuse_window steps: where selections move, most misses "
        "are read once and their copies share PCIe with the UVA reads)"))
    cache_reuse_window: int = field(default=16, metadata=doc(
        "cache_admission reused: how many steps back an earlier selection of a block still counts", ge=1))

    def __post_init__(self) -> None:
        from fluxion_dist.errors import ConfigError
        for name in ("rescore_factor", "token_refine_factor"):
            value = getattr(self, name)
            if 0.0 < value < 1.0:
                raise ConfigError(f"sparse.{name}: {value!r} is out of range; must be 0 (off) "
                                  f"or >= 1 (candidates per planned block)")
        if self.rescore_factor > 0 and self.token_refine_factor > 0:
            raise ConfigError("sparse.token_refine_factor: cannot be on together with sparse.rescore_factor "
                              "(both re-rank the same candidates); set one of them to 0")


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    num_workers: int = field(default=1, metadata=doc("prefill actors", ge=1))
    num_cpus: float = field(default=1.0, metadata=doc("CPUs reserved per prefill actor", ge=0))
    num_gpus: float = field(default=0.0, metadata=doc("GPUs per prefill actor (0: runs on CPU)", ge=0))
    max_restarts: int = field(default=-1, metadata=doc(
        "Ray restarts of a dead actor; -1: for as long as the deployment lives", ge=-1))
    node_resource: str | None = field(default=None, metadata=doc(
        "custom Ray resource that marks prefill nodes (see cluster_configs/ray_*.yaml); unset: any node"))
    chunk_tokens: int = field(default=8192, metadata=doc(
        "GPU prefill: prompt tokens per forward chunk (bounds the activation memory, so prompts up "
        "to model.max_model_len fit)", ge=16))


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    num_workers: int = field(default=1, metadata=doc("decode actors", ge=1))
    num_cpus: float = field(default=1.0, metadata=doc("CPUs reserved per decode actor", ge=0))
    num_gpus: float = field(default=0.0, metadata=doc("GPUs per decode actor (0: runs on CPU)", ge=0))
    node_resource: str | None = field(default=None, metadata=doc(
        "custom Ray resource that marks decode nodes (see cluster_configs/ray_*.yaml); unset: any node"))
    max_batch_size: int = field(default=16, metadata=doc("sequences decoded together per step", ge=1))
    max_restarts: int = field(default=-1, metadata=doc(
        "Ray restarts of a dead actor; -1: for as long as the deployment lives", ge=-1))
    enforce_eager: bool = field(default=False, metadata=doc(
        "GPU decode: launch every kernel eagerly instead of replaying CUDA graphs (the dense step as "
        "one graph per padded batch size; a hybrid step as graphs of 8 layers, the operator's work and "
        "its CPU share inside) (debugging; the CPU always runs eagerly)"))
    sparse: SparseConfig = field(default_factory=SparseConfig, metadata=doc("decode attention policy"))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=doc("address the HTTP API binds"))
    port: int = field(default=8000, metadata=doc("port the HTTP API binds (0: any free port)", ge=0, le=65535))
    api_key: str | None = field(default=None, metadata=doc("bearer token required by the API; unset: open"))
    max_prompt_tokens: int = field(default=8192, metadata=doc("longer prompts get HTTP 400", ge=1))
    max_tokens: int = field(default=1024, metadata=doc("largest max_tokens a request may ask", ge=1))
    served_model_name: str = field(default="fluxion-tiny", metadata=doc("the model id /v1/models lists"))
    worker_timeout_s: float = field(default=10.0, metadata=doc(
        "seconds a worker has to answer a router call (admit, abort, load) and to stream each next token; "
        "past it the request fails with HTTP 503 (a hung worker holds no request longer)", gt=0))
    prefill_timeout_s: float = field(default=300.0, metadata=doc(
        "seconds a prefill (prompt compute + KV push) may take before its request fails with HTTP 503", gt=0))
    health_interval_s: float = field(default=1.0, metadata=doc(
        "seconds between the router's background health probes of each worker; /health answers from "
        "the latest ones without waiting on any worker", gt=0))
    health_timeout_s: float = field(default=2.0, metadata=doc(
        "a worker that leaves a health probe unanswered this long is reported hung (/health: 503 degraded) "
        "and gets no new requests", gt=0))
    restart_hung_after_s: float = field(default=30.0, metadata=doc(
        "a worker hung this long is killed so Ray restarts it (0: never)", ge=0))
    restart_backoff_s: float = field(default=1.0, metadata=doc(
        "seconds an actor (worker or router) that Ray restarts waits before starting again, doubled for "
        "each further restart within restart_backoff_reset_s of its last start, up to "
        "restart_backoff_max_s: one that dies while starting does not restart in a hot loop (0: at once)",
        ge=0))
    restart_backoff_max_s: float = field(default=30.0, metadata=doc(
        "longest wait before a restart (>= restart_backoff_s)", ge=0))
    restart_backoff_reset_s: float = field(default=60.0, metadata=doc(
        "an actor that ran this long since its last start restarts after restart_backoff_s again", gt=0))

    def __post_init__(self) -> None:
        from fluxion_dist.errors import ConfigError
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise ConfigError(f"server.restart_backoff_max_s: {self.restart_backoff_max_s!r} is below "
                              f"server.restart_backoff_s ({self.restart_backoff_s!r}); it must be >= it")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    address: str = field(default="local", metadata=doc(
        "'local': start a Ray cluster in-process; 'auto' or host:port: join a running one"))
    namespace: str = field(default="fluxion", metadata=doc("Ray namespace of the named actors"))
    num_cpus: int | None = field(default=None, metadata=doc(
        "CPUs a local cluster offers; unset: all of the machine's", ge=1))


@dataclass(frozen=True, slots=True)
class DeployConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata=doc("the model served"))
    prefill: PrefillConfig = field(default_factory=PrefillConfig, metadata=doc("prefill workers"))
    decode: DecodeConfig = field(default_factory=DecodeConfig, metadata=doc("decode workers"))
    kv_store: KVStoreConfig = field(default_factory=KVStoreConfig, metadata=doc("host KV stores"))
    transport: TransportConfig = field(default_factory=TransportConfig, metadata=doc("prefill -> decode KV"))
    server: ServerConfig = field(default_factory=ServerConfig, metadata=doc("the HTTP API"))
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata=doc("the Ray cluster"))
