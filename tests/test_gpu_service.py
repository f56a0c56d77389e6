"""The GPU service end to end, as a user deploys it: ``deploy_1p1d_gpu.yaml`` (the quality model,
chunked GPU prefill, the decode model runner over the hybrid operator, policy fluxion) on a
local Ray cluster, 16k-token retrieval questions over HTTP.

- Under ``sparse: {policy: full}`` every greedy token is the single-process GPU model's argmax
  after the same tokens (a dense prefill of prompt + answer, teacher-forced).
- Under the deployment's fluxion the answers equal full's on nearly every question.
- The decode worker ran the model on its GPU (its runner's device and CUDA memory), and the
  KV stores are empty afterwards.

Needs a GPU, Ray and UCXX; skipped with the reason otherwise.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests import gpu_util

gpu_util.skip_unless_gpu()
ray = pytest.importorskip("ray")
pytest.importorskip("ucxx")

from fluxion_dist.config import load_config  # noqa: E402
from fluxion_dist.model.loader import load_from_config, to_device  # noqa: E402
from fluxion_dist.quality.harness import dense_prefill  # noqa: E402
from fluxion_dist.quality.tasks import SHIPPED_SUITE  # noqa: E402
from fluxion_dist.server import deploy  # noqa: E402
from fluxion_dist.server.ray_cluster import connect  # noqa: E402

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 16384
QUESTIONS = 12


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    cfg = load_config(ROOT / "cluster_configs/deploy_1p1d_gpu.yaml")
    assert cfg.decode.sparse.policy == "fluxion" and cfg.decode.num_gpus > 0 and cfg.prefill.num_gpus > 0
    cfg = dataclasses.replace(
        cfg,
        server=dataclasses.replace(cfg.server, port=0),
        kv_store=dataclasses.replace(cfg.kv_store, capacity=4 << 30),
        cluster=dataclasses.replace(cfg.cluster, namespace="fluxion-gpu-test"))
    tmp = tmp_path_factory.mktemp("ray")
    connect(cfg.cluster, temp_dir=str(tmp), state_dir=tmp / "state")
    deployment = deploy.deploy(cfg, detached=False)
    client = httpx.Client(base_url=deployment.endpoint, timeout=300)
    yield cfg, client
    client.close()
    deploy.shutdown(cfg)
    ray.shutdown()


@pytest.fixture(scope="module")
def model(service):
    cfg, _ = service
    m, _ = load_from_config(cfg.model, "cuda")
    return to_device(m, torch.device("cuda"), torch.bfloat16)


def _questions():
    tasks = SHIPPED_SUITE.retrieval
    rng = np.random.default_rng([16, CONTEXT])
    return [SHIPPED_SUITE.make_sample(tasks[i % len(tasks)], rng, CONTEXT) for i in range(QUESTIONS)]


def _answer(cfg, client, prompt: list[int], n: int, sparse: dict | None) -> list[int]:
    body = {"model": cfg.server.served_model_name, "prompt": prompt, "temperature": 0, "max_tokens": n,
            "ignore_eos": True, "return_token_ids": True}
    if sparse is not None:
        body["sparse"] = sparse
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _decode_load(cfg) -> dict:
    _, names, _ = deploy.actor_names(cfg)
    return ray.get(ray.get_actor(names[0], namespace=cfg.cluster.namespace).load.remote())


def _assert_kv_empty(cfg, timeout=20.0):
    deadline = time.monotonic() + timeout
    while (load := _decode_load(cfg))["used_pages"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert load["used_pages"] == 0 and load["active"] == 0, load


def test_full_equals_the_gpu_model_and_fluxion_equals_full(service, model):
    cfg, client = service
    same, total = 0, 0
    for s in _questions():
        prompt = s.prompt().tolist()
        n = len(s.answer()) + 1
        full = _answer(cfg, client, prompt, n, {"policy": "full"})
        with torch.inference_mode():
            tokens = torch.tensor(prompt + full[:-1], device="cuda")
            want = dense_prefill(model, tokens).logits.argmax(-1)[len(prompt) - 1:].tolist()
        assert full == want, (s.task, full, want)
        flux = _answer(cfg, client, prompt, n, None)
        same += flux[:n - 1] == full[:n - 1]
        total += 1
    print(f"fluxion answers equal to full on {same}/{total} questions at {CONTEXT} tokens")
    assert same >= total - 1, f"fluxion equals full on only {same}/{total}"
    load = _decode_load(cfg)
    assert load["device"].startswith("cuda") and load["cuda_memory_bytes"] > 0, load
    _assert_kv_empty(cfg)
