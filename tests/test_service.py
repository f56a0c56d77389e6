"""The whole service on a local Ray cluster: HTTP -> router -> prefill -> UCX -> decode -> stream.

One cluster and one deployment for the module (Ray takes seconds to start); every test ends
with the decode KV stores empty.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

ray = pytest.importorskip("ray")

from fluxion_dist.config import load_config  # noqa: E402
from fluxion_dist.model.generate import greedy_generate  # noqa: E402
from fluxion_dist.model.loader import load_from_config  # noqa: E402
from fluxion_dist.server import deploy  # noqa: E402
from fluxion_dist.server.ray_cluster import connect  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    cfg = load_config(ROOT / "cluster_configs/deploy_cpu_demo.yaml")
    cfg = dataclasses.replace(
        cfg,
        server=dataclasses.replace(cfg.server, port=0, max_prompt_tokens=2048, max_tokens=200),
        kv_store=dataclasses.replace(cfg.kv_store, capacity=1 << 20),
        # A dead prefill peer is noticed after this long, and its half-received pages freed.
        transport=dataclasses.replace(cfg.transport, timeout_s=4.0),
        cluster=dataclasses.replace(cfg.cluster, namespace="fluxion-test"))
    tmp = tmp_path_factory.mktemp("ray")
    connect(cfg.cluster, temp_dir=str(tmp), state_dir=tmp / "state")
    deployment = deploy.deploy(cfg, detached=False)
    client = httpx.Client(base_url=deployment.endpoint, timeout=120)
    yield cfg, deployment.endpoint, client
    client.close()
    deploy.shutdown(cfg)
    ray.shutdown()


def _decode_workers(cfg):
    _, decode_names, _ = deploy.actor_names(cfg)
    return [ray.get_actor(n, namespace=cfg.cluster.namespace) for n in decode_names]


def _assert_kv_empty(cfg, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        loads = ray.get([w.load.remote() for w in _decode_workers(cfg)])
        if all(ld["used_pages"] == 0 and ld["active"] == 0 for ld in loads) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(ld["used_pages"] == 0 and ld["active"] == 0 for ld in loads), loads


def _assert_serving_again(client, cfg, timeout=60.0):
    """Ray restarts a killed worker; within the timeout a request must succeed again, and /health
    (the router's background probes, a probe interval behind) say healthy again."""
    deadline = time.monotonic() + timeout
    while True:
        r = _complete(client, cfg, "after the restart", max_tokens=5)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    while (health := client.get("/health")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health.status_code == 200 and health.json()["healthy"], health.text


def _complete(client, cfg, prompt, **kw):
    body = {"model": cfg.server.served_model_name, "prompt": prompt, "temperature": 0, **kw}
    return client.post("/v1/completions", json=body)


@pytest.mark.parametrize("prompt_len", [1, 15, 17, 100])
def test_greedy_output_equals_single_process_model(service, prompt_len):
    cfg, _, client = service
    model, tok = load_from_config(cfg.model)
    prompt = [(i * 37 + prompt_len) % 256 for i in range(prompt_len)]
    want = greedy_generate(model, prompt, 40, tok.eos_token_id, kv_dtype=__import__("torch").bfloat16)
    r = _complete(client, cfg, prompt, max_tokens=40, return_token_ids=True)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == want
    _assert_kv_empty(cfg)


def test_logprobs_match_the_single_process_models_log_softmax(service):
    cfg, _, client = service
    model, tok = load_from_config(cfg.model)
    prompt = [32 + (i * 53 + 11) % 95 for i in range(37)]
    r = _complete(client, cfg, [prompt], max_tokens=9, logprobs=3, echo=True, ignore_eos=True,
                  return_token_ids=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    generated = choice["token_ids"]
    with torch.inference_mode():
        logits = model.prefill(torch.tensor(prompt + generated[:-1])).logits
    want = torch.log_softmax(logits.float(), dim=-1)
    got = choice["logprobs"]
    assert len(got["token_logprobs"]) == len(prompt) + len(generated) and got["token_logprobs"][0] is None
    for pos in range(1, len(prompt) + len(generated)):
        token = (prompt + generated)[pos]
        # the prompt's from the prefill's float32 logits; the generated ones decoded over bf16 KV
        tol = 1e-4 if pos < len(prompt) else 3e-2
        assert got["token_logprobs"][pos] == pytest.approx(float(want[pos - 1, token]), abs=tol), pos
        # keyed by text, byte tokens that decode alike share a key (the likelier stays): the best survives
        assert max(got["top_logprobs"][pos].values()) == pytest.approx(float(want[pos - 1].max()), abs=tol), pos
    # greedy: each generated token is the likeliest, so its logprob is the top one
    for pos in range(len(prompt), len(prompt) + len(generated)):
        assert got["token_logprobs"][pos] == max(got["top_logprobs"][pos].values())
    _assert_kv_empty(cfg)


def test_openai_client_streaming_and_not(service):
    openai = pytest.importorskip("openai")
    cfg, endpoint, _ = service
    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [cfg.server.served_model_name]
    plain = client.completions.create(model=cfg.server.served_model_name, prompt="Hello host KV",
                                      max_tokens=12, temperature=0)
    assert plain.usage.completion_tokens == 12 and plain.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=cfg.server.served_model_name, prompt="Hello host KV",
                                            max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    _assert_kv_empty(cfg)


def test_sixteen_concurrent_requests_all_complete(service):
    cfg, _, client = service
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_complete, client, cfg, f"request {i} " * (1 + i % 5), max_tokens=10 + i,
                               ignore_eos=True) for i in range(16)]
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * 16
    assert [r.json()["usage"]["completion_tokens"] for r in results] == [10 + i for i in range(16)]
    _assert_kv_empty(cfg)


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "JSON"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "fluxion-tiny"}, 400, "prompt"),
    ({"model": "fluxion-tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "fluxion-tiny", "prompt": "x", "max_tokens": 100000}, 400, "exceeds the limit"),
    ({"model": "fluxion-tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "fluxion-tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "fluxion-tiny", "prompt": ""}, 400, "prompt must not be empty"),
    ({"model": "fluxion-tiny", "prompt": [999999]}, 400, "token ids"),
    ({"model": "fluxion-tiny", "prompt": "y" * 3000}, 400, "the limit is 2048"),
    ({"model": "other", "prompt": "x"}, 404, "does not exist"),
])
def test_bad_requests_get_4xx_with_a_message(service, body, status, needle):
    cfg, _, client = service
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert client.get("/health").json()["healthy"]


def test_full_kv_store_gets_429_and_the_service_stays_up(service):
    cfg, _, client = service
    r = _complete(client, cfg, "z" * 1999, max_tokens=200)  # more than the 1 MiB test store holds
    assert r.status_code == 429, r.text
    assert "full" in r.json()["error"]["message"]
    assert _complete(client, cfg, "ok", max_tokens=4).status_code == 200
    _assert_kv_empty(cfg)


def _stream_events(client, cfg, prompt, max_tokens):
    body = {"model": cfg.server.served_model_name, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def test_decode_worker_killed_mid_request(service):
    cfg, _, client = service
    events = _stream_events(client, cfg, "kill the decoder", 200)
    first = next(events)
    assert first["choices"][0]["text"] is not None
    ray.kill(_decode_workers(cfg)[0], no_restart=False)
    rest = list(events)
    assert "error" in rest[-1] and "decode worker" in rest[-1]["error"]["message"]
    _assert_serving_again(client, cfg)
    _assert_kv_empty(cfg)


def test_prefill_worker_killed_mid_request(service):
    cfg, _, client = service
    prefill_names, _, _ = deploy.actor_names(cfg)
    prefill = ray.get_actor(prefill_names[0], namespace=cfg.cluster.namespace)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_complete, client, cfg, "p" * 1000, max_tokens=5)
        time.sleep(0.3)
        ray.kill(prefill, no_restart=False)
        r = fut.result()
    assert r.status_code in (200, 503), r.text  # the kill may land after the prefill finished
    if r.status_code == 503:
        assert "prefill worker" in r.json()["error"]["message"]
    _assert_serving_again(client, cfg)
    _assert_kv_empty(cfg)


def test_metrics_and_health(service):
    cfg, _, client = service
    _complete(client, cfg, "metrics", max_tokens=3)
    text = client.get("/metrics").text
    for name in ("fluxion_ttft_seconds_bucket", "fluxion_tpot_seconds_bucket", "fluxion_queue_seconds_bucket",
                 "fluxion_requests_total", "fluxion_kv_transferred_bytes_total", "fluxion_kv_transfer_seconds_bucket",
                 "fluxion_kv_occupancy_ratio", "fluxion_sparse_budget_used_ratio",
                 "fluxion_e2e_latency_seconds_bucket", "fluxion_itl_seconds_bucket", "fluxion_prompt_tokens_total",
                 "fluxion_generation_tokens_total", "fluxion_requests_running", "fluxion_requests_waiting"):
        assert name in text, name
    assert "fluxion_kv_transferred_bytes_total 0.0" not in text
    assert "fluxion_requests_running 0.0" in text and 'outcome="rejected_429"' in text
    assert "fluxion_requests_swapped 0.0" in text  # documented as always 0: nothing is ever preempted
    deadline = time.monotonic() + 10  # the gauge is refreshed right after the free, beside the request
    while not all(line.endswith(" 0.0") for line in text.splitlines()
                  if line.startswith("fluxion_kv_occupancy_ratio{")) and time.monotonic() < deadline:
        time.sleep(0.2)
        text = client.get("/metrics").text
    assert all(line.endswith(" 0.0") for line in text.splitlines() if line.startswith("fluxion_kv_occupancy_ratio{"))
    health = client.get("/health").json()
    assert health["healthy"] and len(health["workers"]) == 2, health


def test_second_deploy_is_refused_and_a_failed_one_leaves_nothing(service):
    cfg, endpoint, client = service
    with pytest.raises(deploy.DeployError, match="already exist"):
        deploy.deploy(cfg, detached=False)
    assert client.get("/health").json()["healthy"]  # the running deployment is untouched
    port = int(endpoint.rsplit(":", 1)[1])
    taken = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, namespace="fluxion-test-2"),
                                server=dataclasses.replace(cfg.server, port=port),
                                prefill=dataclasses.replace(cfg.prefill, num_cpus=0),
                                decode=dataclasses.replace(cfg.decode, num_cpus=0))
    with pytest.raises(deploy.DeployError, match=f"did not start on 127.0.0.1:{port}"):
        deploy.deploy(taken, detached=False)
    assert all(not s["healthy"] for s in deploy.status(taken).values())  # every actor it made is gone
    assert client.get("/health").json()["healthy"]
