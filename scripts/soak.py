#!/usr/bin/env python
"""Soak the CPU demo deployment: mixed-length streaming load for a bounded time with faults
injected (the decode worker SIGSTOPped past the router's deadline a quarter of the way, then
resumed; killed half-way; one client in eight hanging up after its first chunk), then the
books are checked.

Passes when every request ended in a full response or a clean error (an HTTP error with a
JSON body, or an SSE error event), none was lost (hung, cut off, or a transport error), the
service answered again after the kill, the decode KV stores are empty at the end, and no
process the run started outlives it. Only 127.0.0.1 is ever targeted.

    python scripts/soak.py --duration 180            # default: a few minutes
    python scripts/soak.py --duration 20 --concurrency 4   # the CI version
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

# The soak's local cluster runs with Ray token authentication, which Ray reads once, on import.
os.environ["RAY_AUTH_MODE"] = "token"
import ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STOP_S = 4.0  # how long the decode worker is SIGSTOPped: past the router's per-token deadline

from fluxion_dist.config import load_config  # noqa: E402
from fluxion_dist.server import deploy  # noqa: E402
from fluxion_dist.server.ray_cluster import connect  # noqa: E402


async def one_request(client: httpx.AsyncClient, model: str, rng: random.Random, timeout_s: float) -> str:
    """Returns 'ok', 'clean_error', 'hung_up' (the client left after its first chunk) or 'lost:<why>'."""
    hang_up = rng.random() < 1 / 8
    body = {"model": model, "prompt": "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(8, 600))),
            "max_tokens": rng.randint(4, 48), "temperature": 0, "stream": True, "ignore_eos": True}
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    payload = json.loads(await r.aread())
                    return "clean_error" if "error" in payload else f"lost:http {r.status_code} without error body"
                saw_done, saw_error, tokens = False, False, 0
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        saw_done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        saw_error |= "error" in event
                        if hang_up:
                            return "hung_up"
                        tokens += "choices" in event and bool(event["choices"]) and bool(event["choices"][0]["text"])
                if not saw_done:
                    return "lost:stream cut off before [DONE]"
                return "clean_error" if saw_error else "ok"
    except TimeoutError:
        return f"lost:no answer within {timeout_s:.0f}s"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return f"lost:{type(e).__name__}: {e}"


async def drive(endpoint: str, model: str, args, stop, kill) -> tuple[Counter, int]:
    rng = random.Random(args.seed)
    outcomes: Counter = Counter()
    ok_after_kill = 0
    killed_at: float | None = None
    start = time.monotonic()
    sent = 0
    async with httpx.AsyncClient(base_url=endpoint, timeout=None) as client:
        async def worker() -> None:
            nonlocal sent, ok_after_kill
            while time.monotonic() - start < args.duration and sent < args.max_requests:
                sent += 1
                t_sent = time.monotonic()
                outcome = await one_request(client, model, rng, args.request_timeout)
                outcomes[outcome] += 1
                if outcome == "ok" and killed_at is not None and t_sent > killed_at:
                    ok_after_kill += 1

        async def killer() -> None:
            nonlocal killed_at
            await asyncio.sleep(args.duration / 4)
            t_stop = time.monotonic() - start
            await asyncio.to_thread(stop)
            print(f"[soak] decode worker stopped at t={t_stop:.1f}s, resumed at t={time.monotonic() - start:.1f}s",
                  flush=True)
            await asyncio.sleep(max(args.duration / 2 - (time.monotonic() - start), 0))
            killed_at = time.monotonic()
            await asyncio.to_thread(kill)
            print(f"[soak] killed a decode worker at t={killed_at - start:.1f}s", flush=True)

        await asyncio.gather(killer(), *(worker() for _ in range(args.concurrency)))
    return outcomes, ok_after_kill


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "cluster_configs/deploy_cpu_demo.yaml"))
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load (bounded)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=5000, help="hard cap on requests sent")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    cfg = load_config(args.config)
    cfg = dataclasses.replace(
        cfg,
        cluster=dataclasses.replace(cfg.cluster, address="local", namespace="fluxion-soak"),
        # short deadlines, so the stop below outlasts one within the run
        server=dataclasses.replace(cfg.server, host="127.0.0.1", port=0, worker_timeout_s=STOP_S - 1,
                                   health_timeout_s=1.0, health_interval_s=0.5),
        transport=dataclasses.replace(cfg.transport, timeout_s=min(cfg.transport.timeout_s, 5.0)))
    temp = tempfile.mkdtemp(prefix="fluxion-soak-ray-")
    before = {p.pid for p in psutil.process_iter()}
    connect(cfg.cluster, temp_dir=temp, state_dir=Path(temp) / "state")
    deployment = deploy.deploy(cfg, detached=False)
    _, decode_names, _ = deploy.actor_names(cfg)
    print(f"[soak] {deployment.endpoint}: {args.concurrency} streams for {args.duration:.0f}s", flush=True)

    def kill() -> None:
        ray.kill(deployment.actors[decode_names[0]], no_restart=False)

    def stop() -> None:  # a hung worker: its requests must fail by the deadline, and it must come back
        pid = ray.get(deployment.actors[decode_names[0]].__ray_call__.remote(lambda self: os.getpid()), timeout=30)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(STOP_S)
        finally:
            os.kill(pid, signal.SIGCONT)

    t0 = time.monotonic()
    outcomes, ok_after_kill = asyncio.run(drive(deployment.endpoint, cfg.server.served_model_name, args, stop, kill))
    elapsed = time.monotonic() - t0

    # Half-received transfers are reclaimed after the peer timeout; the killed worker may still be
    # restarting (a loaded machine takes tens of seconds to bring one up).
    deadline = time.monotonic() + 60
    empty = [{"used_pages": -1, "active": -1}]
    while True:
        try:
            loads = ray.get([deployment.actors[n].load.remote() for n in decode_names], timeout=10)
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            loads = empty  # not answering yet: counts as not empty
        if all(ld["used_pages"] == 0 and ld["active"] == 0 for ld in loads) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    deploy.shutdown(cfg)
    ray.shutdown()
    time.sleep(2)
    leaked = [f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in psutil.process_iter()
              if p.pid not in before and temp in " ".join(_cmdline(p))]

    lost = {k: v for k, v in outcomes.items() if k.startswith("lost")}
    total = sum(outcomes.values())
    print(f"[soak] {total} requests in {elapsed:.0f}s: {outcomes['ok']} ok, {outcomes['clean_error']} clean errors, "
          f"{outcomes['hung_up']} hung up by the client, {sum(lost.values())} lost; {ok_after_kill} ok after the kill")
    print(f"[soak] decode KV at the end: {[(ld['used_pages'], ld['active']) for ld in loads]} (pages, active)")
    checks = {
        "no request lost": not lost,
        "service answered after the kill": ok_after_kill > 0,
        "KV stores empty": all(ld["used_pages"] == 0 and ld["active"] == 0 for ld in loads),
        "no leaked processes": not leaked,
    }
    for name, passed in checks.items():
        print(f"[soak] {'PASS' if passed else 'FAIL'}: {name}")
    for k, v in lost.items():
        print(f"[soak]   {v} x {k}")
    for line in leaked:
        print(f"[soak]   leaked: {line}")
    return 0 if all(checks.values()) else 1


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


if __name__ == "__main__":
    sys.exit(main())
