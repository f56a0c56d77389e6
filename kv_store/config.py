"""Config of the KV store and of its transport: one slotted dataclass per concern.

The project config (``fluxion_dist.config``) owns the YAML; it builds ``StoreConfig``, and its
``transport`` section is the one ``TransportConfig`` the transfer runs on (re-exported here).
Validation names the bad field and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.config.schema import TransportConfig

BF16_BYTES = 2

__all__ = ["BF16_BYTES", "KVGeometry", "PIN_MODES", "PinMode", "StoreConfig", "TransportConfig"]

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
