"""Deploy a config as named Ray actors, check on them, take them down.

Names are ``<namespace>-prefill-<i>``, ``<namespace>-decode-<i>`` and ``<namespace>-router`` in
the config's Ray namespace, so ``status`` and ``shutdown`` find them from any driver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from fluxion_dist.config import DeployConfig, config_to_dict
from fluxion_dist.errors import FluxionError
from fluxion_dist import restart_backoff
from fluxion_dist.server.ray_cluster import worker_env
from kv_store import new_secret


class DeployError(FluxionError):
    """The deployment did not come up healthy; the message names the worker and why."""


def actor_names(cfg: DeployConfig) -> tuple[list[str], list[str], str]:
    ns = cfg.cluster.namespace
    return ([f"{ns}-prefill-{i}" for i in range(cfg.prefill.num_workers)],
            [f"{ns}-decode-{i}" for i in range(cfg.decode.num_workers)], f"{ns}-router")


@dataclass(frozen=True)
class Deployment:
    """A running deployment. Holding it keeps non-detached actors alive: Ray reclaims an actor
    once the last handle to it is gone, names or not."""

    endpoint: str
    actors: dict[str, ray.actor.ActorHandle]


def deploy(cfg: DeployConfig, *, detached: bool, timeout_s: float = 120.0) -> Deployment:
    """Create every actor, wait until all are healthy, start the HTTP API."""
    from decode_worker.actor import DecodeWorker
    from fluxion_dist.server.router_actor import Router
    from prefill_worker.actor import PrefillWorker

    prefill_names, decode_names, router_name = actor_names(cfg)
    existing = [n for n in [*prefill_names, *decode_names, router_name] if _get(n, cfg) is not None]
    if existing:
        raise DeployError(f"actors {existing} already exist in namespace {cfg.cluster.namespace!r}; "
                          "run `fluxion-dist shutdown` first")
    as_dict = config_to_dict(cfg)
    # The KV channel's secret: made here, handed to the workers as an actor argument (Ray keeps
    # it for restarts), never part of the config, so never in a log or `validate`'s output.
    kv_secret = new_secret()
    env = {"env_vars": worker_env(cfg.transport)}
    common = {"namespace": cfg.cluster.namespace, "lifetime": "detached" if detached else None,
              "runtime_env": env}

    def placement(node_resource: str | None) -> dict:
        # One slot of the role's resource, as the cluster YAMLs count them: pins the actor to such nodes.
        return {"resources": {node_resource: 1}} if node_resource else {}

    actors: dict[str, ray.actor.ActorHandle] = {}
    try:
        for name in prefill_names:
            actors[name] = ray.remote(PrefillWorker).options(
                name=name, num_cpus=cfg.prefill.num_cpus, num_gpus=cfg.prefill.num_gpus,
                max_restarts=cfg.prefill.max_restarts, max_task_retries=0,
                **placement(cfg.prefill.node_resource), **common).remote(as_dict, name, kv_secret)
        for name in decode_names:
            actors[name] = ray.remote(DecodeWorker).options(
                name=name, num_cpus=cfg.decode.num_cpus, num_gpus=cfg.decode.num_gpus,
                max_restarts=cfg.decode.max_restarts, max_task_retries=0, max_concurrency=1000,
                **placement(cfg.decode.node_resource), **common).remote(as_dict, name, kv_secret)
        _wait_healthy(actors, timeout_s)
        # The front door is restarted like the workers (router_actor.py: how it comes back).
        router = ray.remote(Router).options(name=router_name, num_cpus=0, max_restarts=-1, max_task_retries=0,
                                            max_concurrency=1000, **common).remote(as_dict, prefill_names,
                                                                                   decode_names)
        actors[router_name] = router
        try:
            endpoint = ray.get(router.start.remote(), timeout=timeout_s)
        except ray.exceptions.RayError as e:
            raise DeployError(f"router {router_name} did not start on "
                              f"{cfg.server.host}:{cfg.server.port}: {str(e).splitlines()[-1]}") from None
    except BaseException:
        for actor in actors.values():  # leave no half-deployment behind (detached actors outlive us)
            ray.kill(actor, no_restart=True)
        raise
    return Deployment(endpoint, actors)


def _wait_healthy(actors: dict[str, ray.actor.ActorHandle], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for name, actor in actors.items():
        try:
            state = ray.get(actor.health.remote(), timeout=max(deadline - time.monotonic(), 1))
        except ray.exceptions.GetTimeoutError:
            raise DeployError(f"{name} was not healthy within {timeout_s:.0f}s "
                              "(not enough CPUs/GPUs in the cluster for the requested resources?)") from None
        except ray.exceptions.RayError as e:
            raise DeployError(f"{name} failed to start: {str(e).splitlines()[-1]}") from None
        if not state.get("healthy"):
            raise DeployError(f"{name} reports unhealthy: {state}")


def _get(name: str, cfg: DeployConfig):
    try:
        return ray.get_actor(name, namespace=cfg.cluster.namespace)
    except ValueError:
        return None


def status(cfg: DeployConfig) -> dict:
    prefill_names, decode_names, router_name = actor_names(cfg)
    out = {}
    for name in [*prefill_names, *decode_names, router_name]:
        actor = _get(name, cfg)
        if actor is None:
            out[name] = {"healthy": False, "error": "not running"}
            continue
        try:
            out[name] = ray.get(actor.health.remote(), timeout=10)
        except ray.exceptions.RayError as e:
            out[name] = {"healthy": False, "error": str(e).splitlines()[0]}
    return out


def shutdown(cfg: DeployConfig) -> list[str]:
    prefill_names, decode_names, router_name = actor_names(cfg)
    killed = []
    for name in [router_name, *prefill_names, *decode_names]:
        actor = _get(name, cfg)
        if actor is not None:
            ray.kill(actor, no_restart=True)
            restart_backoff.forget(actor._actor_id.hex())
            killed.append(name)
    return killed
