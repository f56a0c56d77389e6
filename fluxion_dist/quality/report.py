"""Turn harness cells into the markdown tables, the JSON record and the plot.

The accuracy table has one row per (context, policy), the policies of a context side by
side, so fluxion, quest_gpu and full read against each other at a glance; every sparse
policy's cell also says how many points it is from full attention, and every cell its sample
count. The per-layer table shows where a policy loses mass or output accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fluxion_dist.quality.harness import Cell
from fluxion_dist.quality.policies import label

_SHORT = {"kv_retrieval": "kv", "passkey": "passkey", "var_tracking": "var track", "aggregation": "aggregation"}


def _short(task: str) -> str:
    return _SHORT.get(task, task)


def _ctx(ctx: int) -> str:
    return f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx)


def _order(cells: list[Cell]) -> tuple[list[str], list[str], list[int]]:
    return (list(dict.fromkeys(c.task for c in cells)), list(dict.fromkeys(c.policy for c in cells)),
            sorted({c.context for c in cells}))


def _sums(cells: list[Cell]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Recall, rel_err [L, Hq], budget [L, Hkv] summed over ``cells``' steps, and the steps [L]."""
    return (sum(c.stats.recall for c in cells), sum(c.stats.rel_err for c in cells),
            sum(c.stats.budget for c in cells), sum(c.stats.steps for c in cells))


def summary(cells: list[Cell]) -> dict:
    """Fidelity over every decode step of every cell in ``cells`` (one context, one policy):
    overall and per layer."""
    recall, rel_err, budget, steps = _sums(cells)
    n = np.maximum(steps, 1)[:, None]
    head_recall = recall / n
    tokens = sum(c.tokens for c in cells)
    return {
        "budget": float((budget / n).mean()), "recall": float(head_recall.mean()),
        "worst_head_recall": float(head_recall.min()), "rel_err": float((rel_err / n).mean()),
        "layer_recall": head_recall.mean(1).tolist(), "layer_rel_err": (rel_err / n).mean(1).tolist(),
        "layer_budget": (budget / n).mean(1).tolist(),
        "ms_per_token": 1e3 * sum(c.seconds for c in cells) / tokens if tokens else float("nan"),
    }


def markdown_table(cells: list[Cell]) -> str:
    tasks, policies, contexts = _order(cells)
    head = ["context", "policy"] + [_short(t) for t in tasks] + [
        "avg budget", "mass recall", "worst-head recall", "output rel. err", "ms/token"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ctx in contexts:
        full = {c.task: c for c in cells if c.context == ctx and c.policy == "full"}
        for pol in policies:
            mine = [c for c in cells if c.context == ctx and c.policy == pol]
            acc = {c.task: c for c in mine}
            s = summary(mine)
            row = [_ctx(ctx), label(pol)]
            for t in tasks:
                c = acc[t]
                text = f"{100 * c.accuracy:.1f} ({c.correct}/{c.total}"
                if pol != "full" and t in full:
                    text += f", {100 * (c.accuracy - full[t].accuracy):+.1f}"
                row.append(text + ")")
            row += [f"{s['budget']:.3f}", f"{s['recall']:.3f}", f"{s['worst_head_recall']:.3f}",
                    f"{s['rel_err']:.3f}", f"{s['ms_per_token']:.1f}"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def layer_table(cells: list[Cell]) -> str:
    """Per (context, policy): each layer's mass recall / output relative error / budget read."""
    _, policies, contexts = _order(cells)
    layers = cells[0].stats.steps.size
    head = ["context", "policy"] + [f"L{i} recall / err / budget" for i in range(layers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ctx in contexts:
        for pol in policies:
            s = summary([c for c in cells if c.context == ctx and c.policy == pol])
            row = [_ctx(ctx), label(pol)] + [
                f"{r:.3f} / {e:.3f} / {b:.3f}" for r, e, b in zip(s["layer_recall"], s["layer_rel_err"],
                                                                  s["layer_budget"])]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def to_json(cells: list[Cell], meta: dict) -> dict:
    out = {"meta": meta, "cells": [], "summary": []}
    for c in cells:
        m = c.stats.mean()
        out["cells"].append({
            "task": c.task, "context": c.context, "policy": c.policy, "oracle": label(c.policy) != c.policy,
            "correct": c.correct, "total": c.total, "accuracy": c.accuracy, "wrong_examples": c.examples,
            "decode_seconds": round(c.seconds, 3), "answer_tokens": c.tokens,
            "budget_used": float(m["budget"].mean()),  # fraction of the KV read, over layers and heads
            "per_layer_recall": m["recall"].mean(1).round(5).tolist(),
            "per_layer_rel_err": m["rel_err"].mean(1).round(5).tolist(),
            "per_layer_budget": m["budget"].mean(1).round(5).tolist(),
            "per_head_recall": m["recall"].round(5).tolist(),  # [layer][query head]
            "per_head_rel_err": m["rel_err"].round(5).tolist(),
            "per_kv_head_budget": m["budget"].round(5).tolist(),  # [layer][kv head]
        })
    _, policies, contexts = _order(cells)
    for ctx in contexts:
        for pol in policies:
            s = summary([c for c in cells if c.context == ctx and c.policy == pol])
            out["summary"].append({"context": ctx, "policy": pol, "oracle": label(pol) != pol,
                                   **{k: np.round(v, 5).tolist() for k, v in s.items()}})
    return out


def write_json(path: Path, cells: list[Cell], meta: dict) -> None:
    path.write_text(json.dumps(to_json(cells, meta), indent=1))


def plot(path: Path, cells: list[Cell]) -> bool:
    """Accuracy vs context per task, and per-layer mass recall and output error at the longest
    context. Returns False (and draws nothing) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, policies, contexts = _order(cells)
    fig, axes = plt.subplots(1, len(tasks) + 2, figsize=(4 * (len(tasks) + 2), 3.6))
    for ax, task in zip(axes, tasks):
        for pol in policies:
            acc = [next(c.accuracy for c in cells if c.task == task and c.policy == pol and c.context == x)
                   for x in contexts]
            ax.plot(contexts, [100 * a for a in acc], marker="o", label=label(pol))
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [_ctx(x) for x in contexts])
        ax.set_ylim(-5, 105)
        ax.set_title(_short(task))
        ax.set_xlabel("context")
    axes[0].set_ylabel("exact-match accuracy (%)")
    axes[0].legend(fontsize=8)
    longest = contexts[-1]
    rec_ax, err_ax = axes[-2], axes[-1]
    for pol in policies:
        s = summary([c for c in cells if c.policy == pol and c.context == longest])
        rec_ax.plot(s["layer_recall"], marker="o", label=label(pol))
        err_ax.plot(s["layer_rel_err"], marker="o", label=label(pol))
    rec_ax.set_title(f"mass recall per layer @ {_ctx(longest)}")
    rec_ax.set_ylim(0, 1.02)
    err_ax.set_title(f"output rel. error per layer @ {_ctx(longest)}")
    err_ax.set_yscale("symlog", linthresh=1e-3)
    for ax in (rec_ax, err_ax):
        ax.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
