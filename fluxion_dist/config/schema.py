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
    backend: Literal["ucx", "fake"] = field(default="ucx", metadata=doc(
        "ucx: UCXX between processes; fake: in-process, for tests"))
    ucx_tls: str = field(default="sm,self,tcp", metadata=doc("UCX_TLS for the transfer endpoints"))
    ucx_net_devices: str = field(default="all", metadata=doc("UCX_NET_DEVICES, e.g. 'lo' or 'mlx5_0:1'"))
    layers_in_flight: int = field(default=4, metadata=doc(
        "layers a prefill worker may have on the wire at once", ge=1, le=256))
    timeout_s: float = field(default=30.0, metadata=doc(
        "a transfer with no progress for this long fails its request", gt=0))


@dataclass(frozen=True, slots=True)
class SparseConfig:
    policy: SparsePolicy = field(default="full", metadata=doc(
        "decode attention: full | quest_gpu | cpu_only | fixed_hybrid | fluxion"))
    budget: float = field(default=0.05, metadata=doc(
        "fraction of the KV the fixed-budget policies read; the cap for fluxion", gt=0, le=1))
    mass_target: float = field(default=0.95, metadata=doc(
        "fluxion: estimated softmax mass each head must keep", gt=0, le=1))
    sink_tokens: int = field(default=16, metadata=doc("leading tokens always attended", ge=0))
    recent_tokens: int = field(default=128, metadata=doc("trailing tokens always attended", ge=0))
    cpu_threads: int = field(default=0, metadata=doc(
        "threads of the CPU attention path; 0: all cores of the worker", ge=0))
    gpu_cache_blocks: int = field(default=4096, metadata=doc(
        "16-token (block, head) slots in the GPU block cache", ge=0))


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    num_workers: int = field(default=1, metadata=doc("prefill actors", ge=1))
    num_cpus: float = field(default=1.0, metadata=doc("CPUs reserved per prefill actor", ge=0))
    num_gpus: float = field(default=0.0, metadata=doc("GPUs per prefill actor (0: runs on CPU)", ge=0))
    max_restarts: int = field(default=3, metadata=doc("Ray restarts of a dead actor", ge=0))
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
    max_restarts: int = field(default=3, metadata=doc("Ray restarts of a dead actor", ge=0))
    enforce_eager: bool = field(default=False, metadata=doc(
        "GPU decode: launch each step's kernels eagerly instead of replaying a CUDA graph per padded "
        "batch size (debugging; the CPU always runs eagerly)"))
    sparse: SparseConfig = field(default_factory=SparseConfig, metadata=doc("decode attention policy"))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=doc("address the HTTP API binds"))
    port: int = field(default=8000, metadata=doc("port the HTTP API binds (0: any free port)", ge=0, le=65535))
    api_key: str | None = field(default=None, metadata=doc("bearer token required by the API; unset: open"))
    max_prompt_tokens: int = field(default=8192, metadata=doc("longer prompts get HTTP 400", ge=1))
    max_tokens: int = field(default=1024, metadata=doc("largest max_tokens a request may ask", ge=1))
    served_model_name: str = field(default="fluxion-tiny", metadata=doc("the model id /v1/models lists"))


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
