"""The ``fluxion-dist`` command line: validate a deployment YAML, run the demo."""

from __future__ import annotations

import argparse
import sys
import time

import yaml

from fluxion_dist.config import config_to_dict, load_config
from fluxion_dist.errors import FluxionError

DEMO_PROMPTS = (
    "The KV cache of a long prompt lives in host memory;",
    "Sparse attention reads only the blocks that matter:",
    "Prefill and decode run on different workers,",
)


def _validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Prefill + greedy decode of a few prompts in one process, on the deployment's model."""
    from fluxion_dist.model.generate import greedy_generate
    from fluxion_dist.model.loader import load_from_config

    cfg = load_config(args.config)
    model, tok = load_from_config(cfg.model)
    for prompt in DEMO_PROMPTS:
        t0 = time.perf_counter()
        ids = greedy_generate(model, tok.encode(prompt), args.max_tokens, tok.eos_token_id)
        dt = time.perf_counter() - t0
        print(f"prompt: {prompt!r}\n  -> {len(ids)} tokens in {dt * 1e3:.0f} ms: {tok.decode(ids)!r}  ids={ids[:12]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxion-dist", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a deployment YAML; print the resolved config or the error")
    v.add_argument("config")
    v.set_defaults(func=_validate)
    d = sub.add_parser("demo", help="run the deployment's model on a few prompts and print the output")
    d.add_argument("config")
    d.add_argument("--max-tokens", type=int, default=24)
    d.set_defaults(func=_demo)
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
