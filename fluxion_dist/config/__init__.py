"""Deployment configuration: schema (dataclasses) and loader (YAML, validation)."""

from fluxion_dist.config.loader import config_from_dict, config_to_dict, load_config, parse_size
from fluxion_dist.config.schema import (ClusterConfig, DecodeConfig, DeployConfig, KVStoreConfig, ModelConfig,
                                        PrefillConfig, ServerConfig, SparseConfig, TransportConfig)

__all__ = [
    "ClusterConfig", "DecodeConfig", "DeployConfig", "KVStoreConfig", "ModelConfig", "PrefillConfig",
    "ServerConfig", "SparseConfig", "TransportConfig", "config_from_dict", "config_to_dict", "load_config",
    "parse_size",
]
