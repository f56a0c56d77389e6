"""Cost of the policy's host decisions for an 8B-shaped step (CPU: what the CPU path runs).

Per layer and decode step of the CPU path: Quest scoring at 16-token blocks (Cython), the
kv-head max, the top-p demand pass (Cython) and its far-demand count, forcing the kept
blocks, top-k at the planned counts (Cython); per step: the pooled budgets over every
(layer, request, KV head) row. Heads are synthetic with a planted mix (local, needle, dense
and a sink+needle mixture); the table ends with each planted head's demand and granted
blocks, with the head predictor on and off. Prints markdown tables of milliseconds
(median and minimum).

    python scripts/bench_policy.py --tokens 131072 --q-heads 32 --kv-heads 8 --head-dim 128
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fluxion_dist.attention.layout import num_blocks, to_bf16_bits
from fluxion_dist.attention.synthetic import HeadMix, make_synthetic_kv
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.cpu import selection as cpu_sel
from fluxion_dist.hybrid.paged_builder import block_boxes
from fluxion_dist.hybrid.step_plan import KeptBlocks
from fluxion_dist.policy import select as twin
from fluxion_dist.policy.budget import pooled_row_budgets


def _times_ms(fn, repeats: int) -> tuple[float, float]:
    """Median and minimum: on a shared machine the minimum is the cost, the median the experience."""
    fn()  # warm caches and allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), 1e3 * float(np.min(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32, help="layers of the step the pooled budget plans")
    ap.add_argument("--batch", type=int, default=16, help="requests of the step the pooled budget plans")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--floor-fraction", type=float, default=0.5,
                    help="sparse.floor_fraction of the plan (below 1 so demand moves blocks)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.q_heads % args.kv_heads:
        ap.error("--q-heads must be a multiple of --kv-heads")

    mix = HeadMix(sink=0.3, needle=0.6, spread=0.1)
    patterns = (["sink_local", "needle", "uniform", mix] * (args.kv_heads // 4 + 1))[:args.kv_heads]
    t0 = time.perf_counter()
    kv = make_synthetic_kv(args.tokens, patterns, group_size=args.q_heads // args.kv_heads,
                           head_dim=args.head_dim, seed=args.seed)
    kf = (to_bf16_bits(kv.k).reshape(kv.k.shape).astype(np.uint32) << 16).view(np.float32)
    lo, hi = block_boxes(kf)
    kmin, kmax = (np.ascontiguousarray((x.view(np.uint32) >> 16).astype(np.uint16)) for x in (lo, hi))
    print(f"synthetic KV + block boxes: {time.perf_counter() - t0:.1f} s")
    cfg = SparseConfig(policy="fluxion", floor_fraction=args.floor_fraction)
    kept = KeptBlocks.from_config(cfg)
    t, hkv, thr = args.tokens, args.kv_heads, args.threads
    nb = num_blocks(t)
    q = np.ascontiguousarray(kv.q[None], dtype=np.float32)
    table = np.arange(nb, dtype=np.int32)[None]
    lens = np.array([t], np.int32)
    row_lens = np.full(hkv, nb, np.int32)

    def scores():
        return np.ascontiguousarray(cpu_sel.kv_head_max(
            cpu_sel.quest_scores_paged(q, kmin, kmax, table, lens, kv.scale, num_threads=thr), hkv))

    kvs = scores()
    rows = kvs.reshape(hkv, nb)
    top = cpu_sel.select_topp(rows, cfg.mass_target, num_threads=thr, row_lens=row_lens)
    far = twin.far_demand(top.indptr, top.ids, lens, hkv, sink_blocks=kept.sink_blocks,
                          recent_blocks=kept.recent_blocks)[0]
    rng = np.random.default_rng(args.seed)
    # the step's demand: this layer's heads in every (layer, request), jittered (local heads stay local)
    jitter = rng.integers(-2, 3, (args.layers, args.batch, hkv))
    demand = np.where(far[None, None] == 0, 0, np.maximum(far[None, None] + jitter, 1))
    nbs = np.full(args.batch, nb)

    def plan(predictor: bool):
        return pooled_row_budgets(demand, nbs, cfg.budget, sink_blocks=kept.sink_blocks,
                                  recent_blocks=kept.recent_blocks, floor_fraction=cfg.floor_fraction,
                                  head_predictor=predictor)

    k_rows = plan(True)[0, 0]
    forced = twin.force_kept(kvs.copy(), lens, sink_blocks=kept.sink_blocks, recent_blocks=kept.recent_blocks)
    steps = [
        ("Quest scores + kv-head max (Cython)", scores),
        ("top-p demand pass (Cython) + far demand",
         lambda: twin.far_demand(*cpu_sel.select_topp(rows, cfg.mass_target, num_threads=thr, row_lens=row_lens),
                                 lens, hkv, sink_blocks=kept.sink_blocks, recent_blocks=kept.recent_blocks)),
        ("force kept blocks", lambda: twin.force_kept(kvs.copy(), lens, sink_blocks=kept.sink_blocks,
                                                      recent_blocks=kept.recent_blocks)),
        ("top-k at the planned counts (Cython)",
         lambda: cpu_sel.select_topk(forced.reshape(hkv, nb), k_rows, num_threads=thr, row_lens=row_lens)),
        (f"pooled budgets, one step ({args.layers} x {args.batch} x {hkv} rows)", lambda: plan(True)),
    ]
    print(f"\none layer: T={t} ({nb} blocks), {args.q_heads} q heads, {hkv} KV heads, d={args.head_dim}; "
          f"{args.repeats} runs, {thr} thread(s)\n")
    print("| step | median ms | min ms |\n|---|---|---|")
    for name, fn in steps:
        med, best = _times_ms(fn, args.repeats)
        print(f"| {name} | {med:.3f} | {best:.3f} |")
    on, off = plan(True)[0, 0], plan(False)[0, 0]
    print(f"\nbudget {cfg.budget}: {int(np.ceil(cfg.budget * nb))} blocks per row on average; kept "
          f"{kept.sink_blocks} + {kept.recent_blocks}; floor fraction {cfg.floor_fraction}\n")
    print("| KV head | planted | far demand | blocks, predictor on | blocks, predictor off |\n|---|---|---|---|---|")
    for h in range(hkv):
        print(f"| {h} | {kv.kinds[h]} | {int(far[h])} | {int(on[h])} | {int(off[h])} |")


if __name__ == "__main__":
    main()
