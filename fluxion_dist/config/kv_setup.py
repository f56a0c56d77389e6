"""The deployment config's view of the KV store and its transport, for both kinds of worker.

``cfg.transport`` is itself the transport's config (one ``TransportConfig``, defined in the
schema and used by ``kv_store`` as it is); the store's is built here from the model's shape.
"""

from __future__ import annotations

from fluxion_dist.config import DeployConfig
from fluxion_dist.errors import ConfigError
from fluxion_dist.model.arch import ModelArch
from kv_store import KVGeometry, StoreConfig
from kv_store.transport_base import Fabric

_PIN = {"auto": "auto", "on": "required", "off": "off"}


def store_config(cfg: DeployConfig, arch: ModelArch) -> StoreConfig:
    geometry = KVGeometry(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim)
    return StoreConfig(geometry, cfg.kv_store.capacity, pin=_PIN[cfg.kv_store.pin_memory],
                       ready_ttl_s=cfg.kv_store.lease_ttl_s)


def fabric(cfg: DeployConfig) -> Fabric:
    """This process's UCX worker (started on first use, inside the actor that uses it)."""
    if cfg.transport.backend != "ucx":
        raise ConfigError(f"transport.backend {cfg.transport.backend!r} works inside one process only; "
                          "workers in separate processes need 'ucx'")
    from kv_store.ucx_transport import ucx_fabric

    return ucx_fabric(cfg.transport)
