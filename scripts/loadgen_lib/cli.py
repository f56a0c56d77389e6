"""Command line of scripts/loadgen.py: one run, or a sweep over request rates."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import aiohttp

from . import plot
from .arrivals import arrival_offsets
from .client import first_model
from .metrics import PERCENTILE_METRICS, parse_goodput, summarize
from .runner import RunConfig, RunOutcome, run
from .target import TargetError, check_target, completions_url
from .workload import LengthSpec, PromptMaker, WorkloadError, jsonl_requests, synthetic_requests

MAX_PROMPTS = 1_000_000
# Per-request lists stay out of the sweep summary; each rate's own file has them.
_LIST_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times",
              "queue_times", "generated_texts", "errors")


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 or inf, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadgen.py", description=(
        "Load an OpenAI-compatible /v1/completions endpoint with streamed requests and report "
        "TTFT/TPOT/ITL/E2E latency and throughput under the key names of `vllm bench serve`."))
    t = p.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000")
    t.add_argument("--endpoint", default="/v1/completions")
    t.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    t.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    t.add_argument("--header", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--allow-remote", action="store_true",
                   help="allow a base URL that is not a loopback address")
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--input-len", type=LengthSpec.parse, default=LengthSpec(128, 128),
                   help="prompt length: N or LOW:HIGH (uniform); unit set by --tokenizer")
    w.add_argument("--output-len", type=LengthSpec.parse, default=LengthSpec(128, 128),
                   help="max_tokens per request: N or LOW:HIGH (uniform)")
    w.add_argument("--dataset", type=Path, help="JSONL of {'prompt': ..., 'output_len': ...} (cycled)")
    w.add_argument("--tokenizer", default="words", help="prompt length unit: words, bytes or a tokenizer.json")
    w.add_argument("--ignore-eos", action="store_true", help="ask the server to generate max_tokens exactly")
    w.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("arrivals")
    a.add_argument("--request-rate", type=_rate, default=math.inf, help="req/s, Poisson by default (inf: all at once)")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson, <1 burstier")
    a.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    a.add_argument("--sweep", help="comma-separated request rates, e.g. 1,2,4,inf: one run each")
    a.add_argument("--num-warmups", type=int, default=1, help="unmeasured requests sent first")
    a.add_argument("--max-duration", type=float, default=600.0, help="seconds; nothing is sent after it")
    a.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    o = p.add_argument_group("results")
    o.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50")
    o.add_argument("--percentile-metrics", default=",".join(PERCENTILE_METRICS))
    o.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    o.add_argument("--result-dir", type=Path, default=Path("."))
    o.add_argument("--result-filename", help="JSON file name for a single run (default: derived)")
    o.add_argument("--label", default="fluxion")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    return p


def _check(args: argparse.Namespace) -> tuple[dict[str, float], list[float], tuple[str, ...], list[float]]:
    if not 1 <= args.num_prompts <= MAX_PROMPTS:
        raise ValueError(f"--num-prompts must be in 1..{MAX_PROMPTS}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if not args.burstiness > 0:
        raise ValueError("--burstiness must be > 0")
    for name in ("max_duration", "request_timeout"):
        if not 0 < getattr(args, name) < math.inf:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.num_warmups < 0:
        raise ValueError("--num-warmups must be >= 0")
    metrics = tuple(m for m in args.percentile_metrics.split(",") if m)
    unknown = set(metrics) - set(PERCENTILE_METRICS)
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown {sorted(unknown)}; allowed {PERCENTILE_METRICS}")
    percentiles = [float(x) for x in args.metric_percentiles.split(",") if x]
    if not all(0 <= q <= 100 for q in percentiles):
        raise ValueError("--metric-percentiles must be within 0..100")
    rates = [_rate(x) for x in args.sweep.split(",")] if args.sweep else [args.request_rate]
    return parse_goodput(args.goodput), percentiles, metrics, rates


def _headers(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    headers = []
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--header {item!r}: expected KEY=VALUE")
        headers.append((key, value))
    if args.api_key:
        headers.append(("Authorization", f"Bearer {args.api_key}"))
    return tuple(headers)


async def _resolve_model(args: argparse.Namespace, headers) -> str:
    if args.model:
        return args.model
    timeout = aiohttp.ClientTimeout(total=min(args.request_timeout, 30.0))
    async with aiohttp.ClientSession(timeout=timeout, headers=dict(headers)) as session:
        return await first_model(session, args.base_url)


def _print_summary(result: dict) -> None:
    print(f"{' Serving Benchmark Result ':=^60}")
    rate = result["request_rate"]
    rows = [("Successful requests", result["completed"]), ("Failed requests", result["failed"]),
            ("Request rate configured (RPS)", rate), ("Benchmark duration (s)", result["duration"]),
            ("Total input tokens", result["total_input_tokens"]),
            ("Total generated tokens", result["total_output_tokens"]),
            ("Request throughput (req/s)", result["request_throughput"]),
            ("Request goodput (req/s)", result["request_goodput"]),
            ("Output token throughput (tok/s)", result["output_throughput"]),
            ("Total token throughput (tok/s)", result["total_token_throughput"])]
    for key, value in result.items():
        if key.endswith("_ms"):  # mean_ttft_ms -> Mean TTFT (ms), p99_itl_ms -> P99 ITL (ms)
            stat, metric, _ = key.rsplit("_", 2)
            rows.append((f"{stat.capitalize()} {metric.upper()} (ms)", value))
    for name, value in rows:
        if value is not None:
            print(f"{name:<44} {value:.2f}" if isinstance(value, float) else f"{name:<44} {value}")
    print("=" * 60)


def _one_rate(args, cfg: RunConfig, specs, rate: float, goodput, percentiles, metrics, out: Path) -> dict:
    offsets = arrival_offsets(len(specs), rate, args.burstiness, args.seed)
    outcome: RunOutcome = asyncio.run(run(cfg, specs, offsets))
    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai",
        "endpoint": cfg.url,
        "model_id": cfg.model,
        "num_prompts": len(specs),
        "request_rate": rate if not math.isinf(rate) else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "not_sent": outcome.not_sent,
        "warmup_failures": outcome.warmup_failures,
        **summarize(outcome.results, outcome.duration_s, goodput=goodput,
                    percentiles=percentiles, metrics=metrics),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _print_summary(result)
    print(f"results: {out}")
    if not args.no_plot:
        try:
            png = plot.plot_run(outcome.results, outcome.duration_s, f"{args.label} @ {result['request_rate']} req/s",
                                out.with_suffix(".png"))
            print(f"plot: {png}")
        except ImportError:
            print("plot skipped: matplotlib is not installed", file=sys.stderr)
    return result


def _result_path(args, rate: float, single: bool) -> Path:
    if single and args.result_filename:
        return args.result_dir / args.result_filename
    conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    return args.result_dir / f"{args.label}-{'inf' if math.isinf(rate) else f'{rate:g}'}qps{conc}.json"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        goodput, percentiles, metrics, rates = _check(args)
        check_target(args.base_url, allow_remote=args.allow_remote)
        headers = _headers(args)
        maker = PromptMaker(args.tokenizer)
        if args.dataset:
            specs = jsonl_requests(args.dataset, args.num_prompts, args.output_len, maker, args.seed)
        else:
            specs = synthetic_requests(args.num_prompts, args.input_len, args.output_len, maker, args.seed)
    except (ValueError, TargetError, WorkloadError, OSError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    try:
        model = asyncio.run(_resolve_model(args, headers))
    except (RuntimeError, aiohttp.ClientError, TimeoutError) as e:
        print(f"loadgen: cannot pick a model: {e}", file=sys.stderr)
        return 2
    cfg = RunConfig(url=completions_url(args.base_url, args.endpoint), model=model,
                    max_concurrency=args.max_concurrency, num_warmups=args.num_warmups,
                    max_duration_s=args.max_duration, request_timeout_s=args.request_timeout,
                    ignore_eos=args.ignore_eos, headers=headers, progress=not args.no_progress)
    summaries = []
    for rate in rates:
        t0 = time.monotonic()
        result = _one_rate(args, cfg, specs, rate, goodput, percentiles, metrics,
                           _result_path(args, rate, single=len(rates) == 1))
        summaries.append({k: v for k, v in result.items() if k not in _LIST_KEYS})
        print(f"rate {result['request_rate']}: {time.monotonic() - t0:.1f} s wall")
    if args.sweep:
        stem = args.result_dir / f"{args.label}-sweep"
        stem.with_suffix(".json").write_text(json.dumps(summaries, indent=1))
        print(f"sweep summary: {stem.with_suffix('.json')}")
        if not args.no_plot:
            try:
                as_float = [{**s, "request_rate": float(s["request_rate"])} for s in summaries]
                print(f"sweep plot: {plot.plot_sweep(as_float, stem.with_suffix('.png'))}")
            except ImportError:
                print("sweep plot skipped: matplotlib is not installed", file=sys.stderr)
    return 0 if any(s["completed"] for s in summaries) else 1
