"""Config of the KV store and of its transport: one slotted dataclass per concern.

The project config (``fluxion_dist.config``) owns the YAML; it builds these.
Validation names the bad field and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fluxion_dist.attention.layout import BLOCK_TOKENS

BF16_BYTES = 2

PinMode = Literal["auto", "off", "required"]
PIN_MODES: tuple[str, ...] = ("auto", "off", "required")


def _positive(owner: str, name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{owner}.{name} must be > 0; got {value!r}")


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """Shape of one request's KV as the model produces it (bf16, 16-token blocks)."""

    num_layers: int
    """Decoder layers; each gets its own block table."""
    num_kv_heads: int
    """KV heads per layer (GQA groups); one page holds all of them."""
    head_dim: int
    """Channels per head."""

    def __post_init__(self) -> None:
        fields = (("num_layers", self.num_layers), ("num_kv_heads", self.num_kv_heads),
                  ("head_dim", self.head_dim))
        for name, value in fields:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVGeometry.{name} must be a positive int; got {value!r}")

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        """One page: ``[Hkv, 2, 16, d]`` (K and V of one 16-token block, all KV heads)."""
        return (self.num_kv_heads, 2, BLOCK_TOKENS, self.head_dim)

    @property
    def meta_shape(self) -> tuple[int, int]:
        """Metadata of one page, for each of kmin and kmax: ``[Hkv, d]``."""
        return (self.num_kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        return self.num_kv_heads * 2 * BLOCK_TOKENS * self.head_dim * BF16_BYTES

    @property
    def meta_page_bytes(self) -> int:
        """kmin plus kmax of one page."""
        return 2 * self.num_kv_heads * self.head_dim * BF16_BYTES

    def blocks_for(self, num_tokens: int) -> int:
        """Pages per layer for ``num_tokens`` tokens."""
        return -(-num_tokens // BLOCK_TOKENS)

    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes of K and V of a whole request, all layers (padding of the last block included)."""
        return self.num_layers * self.blocks_for(num_tokens) * self.page_bytes

    def meta_bytes(self, num_tokens: int) -> int:
        return self.num_layers * self.blocks_for(num_tokens) * self.meta_page_bytes


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """One host-memory KV store (one per prefill or decode node)."""

    geometry: KVGeometry
    capacity_bytes: int
    """Arena size: KV pages plus their kmin/kmax metadata."""
    pin: PinMode = "auto"
    """'auto': page-lock and map for the GPU when a CUDA device is present; 'off': never;
    'required': fail when it cannot be done."""
    prefault: bool = True
    """Touch every page at start, so the first transfer does not pay the page faults."""
    max_runs_per_layer: int = 32
    """A request-layer spread over more free extents than this is refused as fragmented:
    each run costs three messages on the wire and a line in the accept frame."""
    ready_ttl_s: float = 300.0
    """Lease of a committed request until a decoder claims it; then its pages are reclaimed."""

    def __post_init__(self) -> None:
        if self.pin not in PIN_MODES:
            raise ValueError(f"StoreConfig.pin must be one of {PIN_MODES}; got {self.pin!r}")
        _positive("StoreConfig", "max_runs_per_layer", self.max_runs_per_layer)
        _positive("StoreConfig", "ready_ttl_s", self.ready_ttl_s)
        per_page = self.geometry.page_bytes + self.geometry.meta_page_bytes
        if self.capacity_bytes < per_page:
            raise ValueError(
                f"StoreConfig.capacity_bytes ({self.capacity_bytes}) is below one page "
                f"({per_page} bytes with metadata)")

    @property
    def num_pages(self) -> int:
        return self.capacity_bytes // (self.geometry.page_bytes + self.geometry.meta_page_bytes)


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """The KV transfer between a prefill and a decode store."""

    tls: str = "sm,self"
    """UCX_TLS. 'sm,self' (or 'tcp,cma') runs ~5.5 GB/s between processes of one host;
    across hosts use 'tcp' or 'rc' (plus 'sm,self' for the local case)."""
    net_devices: str | None = None
    """UCX_NET_DEVICES, e.g. 'lo' or 'mlx5_0:1'; None leaves UCX to choose."""
    error_handling: bool = False
    """UCX peer error handling. UCX refuses it with shared-memory endpoints ('Destination is
    unreachable'), so it only suits tcp/rc; the heartbeat below notices a dead peer either way."""
    max_inflight_layers: int = 4
    """Layers whose bulk sends may be outstanding at once on one connection."""
    heartbeat_s: float = 1.0
    """Each side pings the other this often."""
    peer_timeout_s: float = 10.0
    """A peer silent (no frame, no data) this long is dead: its transfers fail, pages are freed."""
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.tls or any(not part.strip() for part in self.tls.split(",")):
            raise ValueError(f"TransportConfig.tls must be a comma list of UCX transports; got {self.tls!r}")
        _positive("TransportConfig", "max_inflight_layers", self.max_inflight_layers)
        _positive("TransportConfig", "heartbeat_s", self.heartbeat_s)
        _positive("TransportConfig", "connect_timeout_s", self.connect_timeout_s)
        if not self.peer_timeout_s > 2 * self.heartbeat_s:
            raise ValueError(
                f"TransportConfig.peer_timeout_s ({self.peer_timeout_s}) must exceed twice "
                f"heartbeat_s ({self.heartbeat_s}), or live peers are declared dead")

    def ucx_env(self) -> dict[str, str]:
        """UCX variables for the process that will use UCX (a Ray actor's runtime_env env_vars)."""
        env = {"UCX_TLS": self.tls, "UCX_WARN_UNUSED_ENV_VARS": "n"}
        if self.net_devices is not None:
            env["UCX_NET_DEVICES"] = self.net_devices
        return env
