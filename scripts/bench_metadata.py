"""Quest scoring + selection per layer from the bf16 metadata and from its int8 mirror.

For an 8B-shaped layer (32 query heads, 8 KV heads, d=128) at each context and batch:
the metadata bytes in HBM of each format, the median GPU time of scoring alone and of
scoring + top-k selection (5% of the blocks) per layer for each, and how much of the
bf16 selection the mirror's selection keeps (the mirror's bound is looser, so the top-k
can differ where bounds are close).

Timing as in bench_gpu_attention.py: CUDA-graph replays over SETS input sets (different
q and metadata copies, so L2 holds no set from the last), medians.

    PYTHONPATH=. python scripts/bench_metadata.py [--contexts 32768 131072] [--batch 1 4]
"""

from __future__ import annotations

import argparse
import math

import cupy as cp
import numpy as np

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from fluxion_dist.kernels.compact_metadata import quantize  # noqa: E402
from fluxion_dist.kernels.scoring import quest_scores, quest_scores_compact  # noqa: E402
from fluxion_dist.kernels.selection import select_topk  # noqa: E402
from scripts.bench_gpu_attention import SETS, quest_metadata, random_arena, time_graph


def keys_metadata(nb: int, hkv: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """bf16 min/max of 16 N(0, 1) keys per block, with a few outlier channels as real K has."""
    kmin, kmax = quest_metadata(random_arena(nb, hkv, d))
    lo = (kmin.astype(cp.uint32) << 16).view(cp.float32)
    hi = (kmax.astype(cp.uint32) << 16).view(cp.float32)
    gain = cp.ones(d, cp.float32)
    gain[:: d // 4] = 8.0  # outlier channels widen every block's range on them
    to_bits = lambda x: (x.view(cp.uint32) >> 16).astype(cp.uint16)  # noqa: E731 (x2^3: exact)
    return cp.asnumpy(to_bits(lo * gain)), cp.asnumpy(to_bits(hi * gain))


def bench(stream, tokens: int, batch: int, hq: int, hkv: int, d: int, budget: float, reps: int) -> dict:
    nb = tokens // 16
    k_blocks = math.ceil(budget * nb)
    scale = 1.0 / math.sqrt(d)
    kmin_h, kmax_h = keys_metadata(nb * batch, hkv, d)
    mirror = quantize(kmin_h, kmax_h)
    with stream:
        tables = cp.arange(nb * batch, dtype=cp.int32).reshape(batch, nb)
        lens = cp.full((batch,), tokens, dtype=cp.int32)
        qs = [cp.random.standard_normal((batch, hq, d), dtype=cp.float32) for _ in range(SETS)]
        bf16 = [(cp.asarray(kmin_h), cp.asarray(kmax_h)) for _ in range(SETS)]
        compact = [(cp.asarray(mirror.values), cp.asarray(mirror.scales)) for _ in range(SETS)]
        outs = [(None, cp.empty((batch, hkv, nb), cp.float32)) for _ in range(SETS)]
        stream.synchronize()

    def score(fn, metas):
        return lambda i: fn(qs[i], *metas[i], tables, lens, scale=scale, query_scores=False, out=outs[i])

    def score_select(fn, metas):
        return lambda i: select_topk(score(fn, metas)(i)[1], lens, k_blocks)

    res = {"tokens": tokens, "batch": batch,
           "bf16_bytes": sum(a.nbytes for a in bf16[0]), "compact_bytes": sum(a.nbytes for a in compact[0])}
    for name, fn, metas in (("bf16", quest_scores, bf16), ("compact", quest_scores_compact, compact)):
        res[f"{name}_score_us"] = time_graph(stream, score(fn, metas), reps)
        res[f"{name}_score_select_us"] = time_graph(stream, score_select(fn, metas), reps)
    kept = []
    with stream:
        for i in range(SETS):
            a, b = score_select(quest_scores, bf16)(i), score_select(quest_scores_compact, compact)(i)
            ia, ba, ib, bb = (cp.asnumpy(x) for x in (a.indptr, a.blocks, b.indptr, b.blocks))
            for r in range(ia.size - 1):
                sa, sb = set(ba[ia[r]:ia[r + 1]].tolist()), set(bb[ib[r]:ib[r + 1]].tolist())
                kept.append(len(sa & sb) / max(len(sa), 1))
    res["selection_kept"] = float(np.mean(kept))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    device = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    stream = cp.cuda.Stream(non_blocking=True)
    rows = [bench(stream, t, b, args.hq, args.hkv, args.head_dim, args.budget, args.reps)
            for t in args.contexts for b in args.batch]
    print(f"device: {device}; layer: {args.hq} q heads, {args.hkv} KV heads, d={args.head_dim}; "
          f"top-k {args.budget:.0%} of the 16-token blocks; medians of {args.reps} graph replays of {SETS} layers")
    print("| context | batch | bf16 MiB | compact MiB | bytes ratio | bf16 score us | compact score us "
          "| bf16 score+select us | compact score+select us | selection kept |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens'] // 1024}k | {r['batch']} | {r['bf16_bytes'] / 2**20:.2f} | "
              f"{r['compact_bytes'] / 2**20:.2f} | {r['compact_bytes'] / r['bf16_bytes']:.3f} | "
              f"{r['bf16_score_us']:.1f} | {r['compact_score_us']:.1f} | {r['bf16_score_select_us']:.1f} | "
              f"{r['compact_score_select_us']:.1f} | {r['selection_kept']:.3f} |")


if __name__ == "__main__":
    main()
