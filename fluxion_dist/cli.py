"""The ``fluxion-dist`` command line: validate, serve, status, shutdown, demo."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import time

import yaml

from fluxion_dist.config import DeployConfig, config_to_dict, load_config
from fluxion_dist.errors import FluxionError

DEMO_PROMPTS = (
    "The KV cache of a long prompt lives in host memory;",
    "Sparse attention reads only the blocks that matter:",
    "Prefill and decode run on different workers,",
)


def _validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    resolved = config_to_dict(cfg)
    if resolved["server"].get("api_key"):
        resolved["server"]["api_key"] = "<set, not shown>"
    print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def _load(args: argparse.Namespace) -> DeployConfig:
    cfg = load_config(args.config)
    if args.address:
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, address=args.address))
    if args.port is not None:
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, port=args.port))
    return cfg


def _serve(args: argparse.Namespace) -> int:
    from fluxion_dist.server import ray_cluster

    cfg = _load(args)
    ray_cluster.prepare(cfg.cluster)  # before Ray is imported: it reads its auth mode once
    from fluxion_dist.server import deploy

    started_here = ray_cluster.connect(cfg.cluster)
    try:
        deployment = deploy.deploy(cfg, detached=not started_here)
        print(f"fluxion-dist is serving {cfg.server.served_model_name} at {deployment.endpoint}/v1", flush=True)
        if not started_here:
            return 0
        # This process owns the local Ray cluster: serve until interrupted, then take it down.
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        deploy.shutdown(cfg)
    finally:
        ray_cluster.forget(cfg.cluster)
    return 0


def _connect_running(args: argparse.Namespace) -> tuple[DeployConfig, int | None]:
    """The config, joined to the cluster its deployment runs on (never a new, empty local one),
    and the PID of the `serve` process that owns that cluster when it is a local one."""
    from fluxion_dist.server import ray_cluster

    cfg = _load(args)
    ray_cluster.prepare(cfg.cluster)
    return cfg, ray_cluster.connect_running(cfg.cluster)


def _status(args: argparse.Namespace) -> int:
    cfg, _ = _connect_running(args)
    from fluxion_dist.server import deploy

    state = deploy.status(cfg)
    print(yaml.safe_dump(state, sort_keys=False), end="")
    return 0 if all(s.get("healthy") for s in state.values()) else 1


def _shutdown(args: argparse.Namespace) -> int:
    cfg, owner = _connect_running(args)
    from fluxion_dist.server import deploy

    killed = deploy.shutdown(cfg)
    print(f"stopped {len(killed)} actor(s): {', '.join(killed) or 'none were running'}")
    if owner is not None:  # the `serve` process holding the local cluster ends too, and the cluster with it
        os.kill(owner, signal.SIGTERM)
        print(f"stopped the local cluster's process {owner}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Start a local cluster, deploy the YAML, send a few requests over HTTP, print the replies."""
    from fluxion_dist.server import ray_cluster

    cfg = _load(args)
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, address="local"))
    ray_cluster.prepare(cfg.cluster)
    from fluxion_dist.model.loader import BUILTIN_QUALITY
    from fluxion_dist.server import deploy
    from fluxion_dist.server.demo_client import run_demo_requests

    t0 = time.perf_counter()
    ray_cluster.connect(cfg.cluster)
    deployment = deploy.deploy(cfg, detached=False)
    print(f"deployed {cfg.prefill.num_workers} prefill + {cfg.decode.num_workers} decode worker(s) "
          f"in {time.perf_counter() - t0:.1f}s; API at {deployment.endpoint}/v1", flush=True)
    if cfg.model.path == BUILTIN_QUALITY:
        from fluxion_dist.quality.demo_prompts import demo_questions

        prompts = [(q.prompt, q.answer) for q in demo_questions()]
    else:
        prompts = [(p, None) for p in DEMO_PROMPTS]
    try:
        run_demo_requests(deployment.endpoint, cfg.server, prompts, args.max_tokens)
    finally:
        deploy.shutdown(cfg)
        ray_cluster.forget(cfg.cluster)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxion-dist", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, text in (
            ("validate", _validate, "check a deployment YAML; print the resolved config or the error"),
            ("serve", _serve, "deploy the YAML on a Ray cluster and serve the OpenAI-compatible API"),
            ("status", _status, "health of every actor of the deployment (a local one: the cluster "
                                "`serve` started on this machine, found by its state file)"),
            ("shutdown", _shutdown, "stop every actor of the deployment (found as status finds it)"),
            ("demo", _demo, "local cluster + deployment + a few requests, printed; then shut down")):
        c = sub.add_parser(name, help=text)
        c.add_argument("config")
        c.add_argument("--address", help="override cluster.address ('auto' joins the running cluster)")
        c.add_argument("--port", type=int, help="override server.port (0: any free port)")
        c.set_defaults(func=func)
        if name == "demo":
            c.add_argument("--max-tokens", type=int, default=24)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FluxionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
