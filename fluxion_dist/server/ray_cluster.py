"""Joining or starting the Ray cluster a deployment runs on, and the environment every process gets."""

from __future__ import annotations

import os

import ray

from fluxion_dist.config.schema import ClusterConfig, TransportConfig

# Ray replaces 127.0.0.1 with the machine's external address unless told not to.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def worker_env(transport: TransportConfig) -> dict[str, str]:
    """Environment of prefill/decode actors: UCX must see its settings before it initialises."""
    return {**RAY_ENV, "UCX_TLS": transport.ucx_tls, "UCX_NET_DEVICES": transport.ucx_net_devices,
            "UCX_WARN_UNUSED_ENV_VARS": "n"}


def connect(cluster: ClusterConfig, *, temp_dir: str | None = None) -> bool:
    """Join ``cluster.address`` or start a local cluster; returns True if this process started it."""
    os.environ.update(RAY_ENV)
    if ray.is_initialized():
        return False
    if cluster.address == "local":
        ray.init(num_cpus=cluster.num_cpus, namespace=cluster.namespace, include_dashboard=False,
                 _temp_dir=temp_dir, log_to_driver=False, runtime_env={"env_vars": RAY_ENV})
        return True
    ray.init(address=cluster.address, namespace=cluster.namespace, log_to_driver=False)
    return False
