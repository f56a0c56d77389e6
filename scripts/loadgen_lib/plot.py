"""PNG plots: one run (latency CDFs, throughput over time) and a sweep summary.

matplotlib is imported here only, with the Agg backend, so runs without a
display (CI, ssh) work and a missing matplotlib costs only the plots.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .client import RequestResult
from .metrics import timeseries


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values_s: list[float], label: str) -> None:
    if not values_s:
        return
    x = np.sort(np.asarray(values_s) * 1000.0)
    ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=f"{label} (n={len(x)})")


def plot_run(results: list[RequestResult], duration_s: float, title: str, path: Path) -> Path:
    plt = _pyplot()
    ok = [r for r in results if r.success]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (ax_ttft, ax_tok), (ax_e2e, ax_time) = axes

    _cdf(ax_ttft, [r.ttft for r in ok], "TTFT")
    ax_ttft.set(title="Time to first token", xlabel="ms", ylabel="fraction of requests")

    _cdf(ax_tok, [g for r in ok for g in r.itl], "ITL")
    _cdf(ax_tok, [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1], "TPOT")
    ax_tok.set(title="Per-token latency", xlabel="ms", ylabel="fraction")

    _cdf(ax_e2e, [r.latency for r in ok], "E2E latency")
    ax_e2e.set(title="End-to-end latency", xlabel="ms", ylabel="fraction of requests")

    # About 60 bins whatever the run length, but never finer than 50 ms.
    series = timeseries(results, duration_s, max(duration_s / 60.0, 0.05))
    width = series["time_s"][1] - series["time_s"][0] if len(series["time_s"]) > 1 else duration_s
    ax_time.bar(series["time_s"], series["output_tokens_per_s"], width=width, align="edge",
                alpha=0.6, label="output tokens/s")
    ax_time.set(title="Throughput over time", xlabel="s since start", ylabel="output tokens/s")
    ax_inflight = ax_time.twinx()
    ax_inflight.step(series["time_s"], series["requests_in_flight"], where="post", color="tab:red",
                     label="requests in flight")
    ax_inflight.set_ylabel("requests in flight")

    for ax in (ax_ttft, ax_tok, ax_e2e):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    handles = ax_time.get_legend_handles_labels()[0] + ax_inflight.get_legend_handles_labels()[0]
    if handles:
        ax_time.legend(handles=handles, loc="upper right")
    failed = len(results) - len(ok)
    fig.suptitle(f"{title}: {len(ok)} ok, {failed} failed, {duration_s:.1f} s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(summaries: list[dict], path: Path) -> Path:
    """Latency percentiles and throughput against the offered request rate."""
    plt = _pyplot()
    rates = [s["request_rate"] for s in summaries]
    finite = [r for r in rates if not math.isinf(r)]
    # An infinite rate is drawn one step past the largest finite one.
    inf_x = (max(finite) * 2 if finite else 1.0)
    x = [inf_x if math.isinf(r) else r for r in rates]
    fig, (ax_ttft, ax_tpot, ax_tp) = plt.subplots(1, 3, figsize=(15, 4.5))
    for key, ax, label in (("ttft", ax_ttft, "TTFT"), ("tpot", ax_tpot, "TPOT")):
        for stat in ("median", "p99"):
            name = f"{stat}_{key}_ms"
            if all(name in s for s in summaries):
                ax.plot(x, [s[name] for s in summaries], marker="o", label=f"{stat} {label}")
        ax.set(title=label, xlabel="offered request rate (req/s)", ylabel="ms")
    ax_tp.plot(x, [s["output_throughput"] for s in summaries], marker="o", label="output tokens/s")
    ax_tp.set(title="Throughput", xlabel="offered request rate (req/s)", ylabel="output tokens/s")
    ax_req = ax_tp.twinx()
    ax_req.plot(x, [s["request_throughput"] for s in summaries], marker="s", color="tab:green",
                label="completed req/s")
    ax_req.set_ylabel("req/s")
    for ax in (ax_ttft, ax_tpot, ax_tp):
        ax.grid(alpha=0.3)
        if any(math.isinf(r) for r in rates):
            ax.set_xticks(x, [("inf" if math.isinf(r) else f"{r:g}") for r in rates])
        extra = ax_req.get_legend_handles_labels()[0] if ax is ax_tp else []
        ax.legend(handles=ax.get_legend_handles_labels()[0] + extra, loc="upper left")
    fig.suptitle("Request-rate sweep")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
