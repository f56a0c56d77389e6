"""2P2D on two local Ray nodes: prefill workers on one node, decode workers on the other
(placed by the nodes' role resources, as cluster_configs/deploy_xpyd.yaml does across
machines), KV over UCX between them, requests spread over the workers by the router."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import secrets
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from fluxion_dist.config import load_config  # noqa: E402
from fluxion_dist.server import deploy, ray_cluster  # noqa: E402
from fluxion_dist.server.ray_cluster import connect  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 8


@pytest.fixture(scope="module")
def xpyd(tmp_path_factory):
    # Both nodes run with Ray's token authentication (conftest.py turns it on), as the product's
    # local clusters do: a token of this cluster's own, before the first node starts.
    token = tmp_path_factory.mktemp("token") / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    ray_cluster._use_token(token)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"prefill": 2}})
    cluster.add_node(num_cpus=2, resources={"decode": 2})
    cfg = load_config(ROOT / "cluster_configs/deploy_cpu_demo.yaml")
    cfg = dataclasses.replace(
        cfg,
        prefill=dataclasses.replace(cfg.prefill, num_workers=2, num_cpus=0.25, node_resource="prefill"),
        decode=dataclasses.replace(cfg.decode, num_workers=2, num_cpus=0.25, node_resource="decode"),
        server=dataclasses.replace(cfg.server, port=0, max_prompt_tokens=1024, max_tokens=64),
        kv_store=dataclasses.replace(cfg.kv_store, capacity=1 << 22),
        cluster=dataclasses.replace(cfg.cluster, address=cluster.address, namespace="fluxion-xpyd"))
    connect(cfg.cluster)
    deployment = deploy.deploy(cfg, detached=False)
    client = httpx.Client(base_url=deployment.endpoint, timeout=180)
    try:
        yield cfg, client
    finally:
        client.close()
        deploy.shutdown(cfg)
        ray.shutdown()
        cluster.shutdown()


def _actors(cfg, names):
    return [ray.get_actor(n, namespace=cfg.cluster.namespace) for n in names]


def test_workers_sit_on_their_role_nodes_and_share_the_load(xpyd):
    cfg, client = xpyd
    prefill_names, decode_names, _ = deploy.actor_names(cfg)
    nodes = {a.name: a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.name}
    assert len({nodes[n] for n in prefill_names}) == 1 and len({nodes[n] for n in decode_names}) == 1
    assert nodes[prefill_names[0]] != nodes[decode_names[0]], "prefill and decode share a node"

    def complete(i: int) -> httpx.Response:
        return client.post("/v1/completions", json={
            "model": cfg.server.served_model_name, "prompt": f"request {i}: " + "the quick brown fox " * (20 + i),
            "max_tokens": 48, "temperature": 0, "ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        answers = list(pool.map(complete, range(REQUESTS)))
    assert [r.status_code for r in answers] == [200] * REQUESTS, [r.text for r in answers if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in answers)

    # every worker took part: concurrent arrivals were spread, not sent to the first worker
    prefill_served = [h["served"] for h in ray.get([w.health.remote() for w in _actors(cfg, prefill_names)])]
    decode_steps = [h["steps"] for h in ray.get([w.health.remote() for w in _actors(cfg, decode_names)])]
    assert all(n > 0 for n in prefill_served), prefill_served
    assert all(n > 0 for n in decode_steps), decode_steps

    deadline = time.monotonic() + 15
    while True:
        loads = ray.get([w.load.remote() for w in _actors(cfg, decode_names)])
        if all(ld["used_pages"] == 0 and ld["active"] == 0 for ld in loads) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(ld["used_pages"] == 0 and ld["active"] == 0 for ld in loads), loads
