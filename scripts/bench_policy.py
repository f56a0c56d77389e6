"""Cost of the sparse policy's decisions for one 8B-shaped layer (CPU, NumPy).

Per (request, layer) and decode step: Quest scoring at the base granularity (on the
GPU in the real operator, timed here for scale), the estimated mass, the head
predictor (features + EMA + labels), the granularity-budget selector, the fixed
baseline's selection, and the whole ``decide`` for ``fluxion`` and ``fixed_hybrid``.
Heads are synthetic with a planted mix (2 local, 2 retrieval, 2 dense, 2 sink+needle
mixtures by default). Prints one markdown table of milliseconds (median and minimum).

    python scripts/bench_policy.py --tokens 131072 --q-heads 32 --kv-heads 8 --head-dim 128
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fluxion_dist.attention.layout import num_blocks
from fluxion_dist.attention.synthetic import HeadMix, drifted_queries, make_synthetic_kv
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.sparse import (decide, estimated_mass, forced_blocks, predict_heads, pyramid_from_kv,
                                 quest_scores, select_budgets, select_fixed, unit_tokens)


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
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.q_heads % args.kv_heads:
        ap.error("--q-heads must be a multiple of --kv-heads")

    mix = HeadMix(sink=0.3, needle=0.6, spread=0.1)
    patterns = ["sink_local", "needle", "uniform", mix] * (args.kv_heads // 4 + 1)
    t0 = time.perf_counter()
    kv = make_synthetic_kv(args.tokens, patterns[:args.kv_heads], group_size=args.q_heads // args.kv_heads,
                           head_dim=args.head_dim, seed=args.seed)
    pyramid = pyramid_from_kv(kv.k)
    print(f"synthetic KV + metadata pyramid: {time.perf_counter() - t0:.1f} s")
    cfg_f = SparseConfig(policy="fluxion")
    cfg_x = SparseConfig(policy="fixed_hybrid")
    t, hkv = args.tokens, args.kv_heads
    q = kv.q
    forced = forced_blocks(t, cfg_f.sink_tokens, cfg_f.recent_tokens)
    scores = quest_scores(q, pyramid.kmin[0], pyramid.kmax[0], kv.scale)
    mass = estimated_mass(scores, unit_tokens(t, 1), hkv)
    # the predictor's state after a few steps of drifting queries, as in a running decode
    state = None
    for qq in drifted_queries(kv, 4, 0.3, args.seed):
        state = decide(qq, pyramid, cfg_f, state=state, scale=kv.scale).state
    pred = predict_heads(mass, forced, state)

    rows = [
        ("Quest scores, base 16-token blocks (GPU's job in the operator)",
         lambda: quest_scores(q, pyramid.kmin[0], pyramid.kmax[0], kv.scale)),
        ("estimated mass from scores", lambda: estimated_mass(scores, unit_tokens(t, 1), hkv)),
        ("head predictor: features + EMA + labels", lambda: predict_heads(mass, forced, state)),
        ("granularity-budget selector (given mass, labels)",
         lambda: select_budgets(q, pyramid, cfg_f, pred.kinds, base_mass=mass, scale=kv.scale)),
        ("fixed 0.05 selection (given scores)", lambda: select_fixed(scores, t, hkv, cfg_x)),
        ("decide(): fluxion, end to end", lambda: decide(q, pyramid, cfg_f, state=state, scale=kv.scale)),
        ("decide(): fixed_hybrid, end to end", lambda: decide(q, pyramid, cfg_x, scale=kv.scale)),
    ]
    print(f"\none layer: T={t} ({num_blocks(t)} blocks), {args.q_heads} q heads, {hkv} KV heads, "
          f"d={args.head_dim}; {args.repeats} runs\n")
    print("| step | median ms | min ms |\n|---|---|---|")
    for name, fn in rows:
        med, best = _times_ms(fn, args.repeats)
        print(f"| {name} | {med:.2f} | {best:.2f} |")
    d = decide(q, pyramid, cfg_f, state=state, scale=kv.scale)
    print(f"\nlabels {d.kinds.tolist()} (planted {list(kv.kinds)}); granularity {d.granularity.tolist()}; "
          f"budget used {np.round(d.budget_used, 3).tolist()} (mean {d.budget_used.mean():.4f}); "
          f"mass kept {np.round(d.mass_kept, 3).tolist()}")


if __name__ == "__main__":
    main()
