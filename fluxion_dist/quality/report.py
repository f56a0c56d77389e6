"""Turn harness cells into the markdown table, the JSON record and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fluxion_dist.quality.harness import Cell

_SHORT = {"kv_retrieval": "kv", "passkey": "passkey", "var_tracking": "var track", "aggregation": "aggregation"}


def _summary(cells: list[Cell]) -> dict[str, float]:
    """Fidelity over every decode step of every task in ``cells`` (one context, one policy)."""
    recall = sum(c.stats.recall for c in cells)
    rel_err = sum(c.stats.rel_err for c in cells)
    budget = sum(c.stats.budget for c in cells)
    steps = np.maximum(sum(c.stats.steps for c in cells), 1)[:, None]
    head_recall = recall / steps
    return {"budget": float((budget / steps).mean()), "recall": float(head_recall.mean()),
            "worst_head_recall": float(head_recall.min()), "rel_err": float((rel_err / steps).mean())}


def markdown_table(cells: list[Cell]) -> str:
    tasks = list(dict.fromkeys(c.task for c in cells))
    policies = list(dict.fromkeys(c.policy for c in cells))
    contexts = sorted({c.context for c in cells})
    head = ["context", "policy"] + [_SHORT[t] for t in tasks] + [
        "avg budget", "mass recall", "worst-head recall", "output rel. err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ctx in contexts:
        for pol in policies:
            mine = [c for c in cells if c.context == ctx and c.policy == pol]
            acc = {c.task: c for c in mine}
            s = _summary(mine)
            row = [f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx), pol]
            row += [f"{100 * acc[t].accuracy:.1f} ({acc[t].correct}/{acc[t].total})" for t in tasks]
            row += [f"{s['budget']:.3f}", f"{s['recall']:.3f}", f"{s['worst_head_recall']:.3f}", f"{s['rel_err']:.3f}"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def to_json(cells: list[Cell], meta: dict) -> dict:
    out = {"meta": meta, "cells": []}
    for c in cells:
        m = c.stats.mean()
        out["cells"].append({
            "task": c.task, "context": c.context, "policy": c.policy, "correct": c.correct, "total": c.total,
            "accuracy": c.accuracy, "wrong_examples": c.examples,
            "per_head_recall": m["recall"].round(5).tolist(),  # [layer][query head]
            "per_head_rel_err": m["rel_err"].round(5).tolist(),
            "per_kv_head_budget": m["budget"].round(5).tolist(),  # [layer][kv head]
        })
    return out


def write_json(path: Path, cells: list[Cell], meta: dict) -> None:
    path.write_text(json.dumps(to_json(cells, meta), indent=1))


def plot(path: Path, cells: list[Cell]) -> bool:
    """Accuracy vs context per task, and per-head mass recall at the longest context.

    Returns False (and draws nothing) where matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(c.task for c in cells))
    policies = list(dict.fromkeys(c.policy for c in cells))
    contexts = sorted({c.context for c in cells})
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4 * (len(tasks) + 1), 3.6))
    for ax, task in zip(axes, tasks):
        for pol in policies:
            acc = [next(c.accuracy for c in cells if c.task == task and c.policy == pol and c.context == x)
                   for x in contexts]
            ax.plot(contexts, [100 * a for a in acc], marker="o", label=pol)
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{x // 1024}k" if x >= 1024 else str(x) for x in contexts])
        ax.set_ylim(-5, 105)
        ax.set_title(_SHORT[task])
        ax.set_xlabel("context")
    axes[0].set_ylabel("exact-match accuracy (%)")
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    longest = contexts[-1]
    for pol in policies:
        mine = [c for c in cells if c.policy == pol and c.context == longest]
        steps = np.maximum(sum(c.stats.steps for c in mine), 1)[:, None]
        ax.plot((sum(c.stats.recall for c in mine) / steps).ravel(), marker=".", label=pol)
    ax.set_title(f"mass recall per query head @ {longest // 1024}k")
    ax.set_xlabel("head (layer-major)")
    ax.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
