"""Aggregate a run into the result dict of ``vllm bench serve`` (same key names, same formulas).

Per-request lists (``ttfts``, ``itls``, ``latencies``, ...) keep one entry
per sent request, failures included with zeros, as vLLM writes them. Summary
statistics use successful requests only; times in the lists are seconds and
in the ``*_ms`` keys milliseconds. TPOT is (latency - TTFT) / (output tokens - 1)
for requests with more than one output token. A request is "good" when it
meets every SLO given with ``--goodput`` (``ttft``, ``tpot``, ``e2el``, in ms).
"""

from __future__ import annotations

import math

import numpy as np

from .client import RequestResult

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(pairs: list[str]) -> dict[str, float]:
    slos = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if not sep or name not in GOODPUT_METRICS or not ms >= 0:
            raise ValueError(f"--goodput {pair!r}: expected NAME:MS with NAME in {GOODPUT_METRICS} and MS >= 0")
        slos[name] = ms
    return slos


def _tpot(r: RequestResult) -> float:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    arr = np.asarray(values_s or [0.0], dtype=float) * 1000.0
    out = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
           f"std_{name}_ms": float(arr.std())}
    for p in percentiles:
        word = str(int(p)) if float(p).is_integer() else str(p)
        out[f"p{word}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def token_times(results: list[RequestResult]) -> list[float]:
    """Arrival time of every output chunk, in seconds after the run started."""
    times = []
    for r in results:
        if r.success:
            t = r.start_time + r.ttft
            times.append(t)
            for gap in r.itl:
                t += gap
                times.append(t)
    return times


def timeseries(results: list[RequestResult], duration_s: float, bin_s: float) -> dict[str, list[float]]:
    """Output chunks per second and requests in flight, per bin of ``bin_s`` seconds."""
    n_bins = max(1, math.ceil(duration_s / bin_s))
    edges = np.arange(n_bins + 1) * bin_s
    tokens, _ = np.histogram(token_times(results), bins=edges)
    inflight = np.zeros(n_bins)
    for r in results:
        if r.success:
            first, last = np.searchsorted(edges, [r.start_time, r.start_time + r.latency], side="right") - 1
            inflight[max(first, 0):min(last, n_bins - 1) + 1] += 1
    return {"time_s": edges[:-1].tolist(), "output_tokens_per_s": (tokens / bin_s).tolist(),
            "requests_in_flight": inflight.tolist()}


def peak_in_flight(results: list[RequestResult]) -> int:
    """Most successful requests open at one instant (vLLM's max_concurrent_requests counts per second)."""
    events = sorted((t, delta) for r in results if r.success
                    for t, delta in ((r.start_time, 1), (r.start_time + r.latency, -1)))
    peak = current = 0
    for _, delta in events:  # at equal times the -1 sorts first: back-to-back is not overlap
        current += delta
        peak = max(peak, current)
    return peak


def summarize(results: list[RequestResult], duration_s: float, *, goodput: dict[str, float],
              percentiles: list[float], metrics: tuple[str, ...] = PERCENTILE_METRICS) -> dict:
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    output_lens = [r.output_tokens if r.success else 0 for r in results]
    total_output = sum(output_lens)
    dur = max(duration_s, 1e-9)
    per_request = {
        "ttft": [r.ttft for r in ok],
        "tpot": [_tpot(r) for r in ok if r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    good = 0
    if goodput:
        for r in ok:
            observed = {"ttft": r.ttft, "tpot": _tpot(r), "e2el": r.latency}
            good += all(observed[k] * 1000.0 <= slo for k, slo in goodput.items())
    peak = timeseries(results, duration_s, 1.0)
    result = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / dur,
        "request_goodput": good / dur if goodput else None,
        "output_throughput": total_output / dur,
        "total_token_throughput": (total_input + total_output) / dur,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": output_lens,
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "queue_times": [r.queue_time for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
        "max_output_tokens_per_s": max(peak["output_tokens_per_s"], default=0.0),
        "max_concurrent_requests": int(max(peak["requests_in_flight"], default=0)),
        "peak_requests_in_flight": peak_in_flight(results),
    }
    for name in metrics:
        result.update(_stats(name, per_request[name], percentiles))
    return result
