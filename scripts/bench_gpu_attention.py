"""Benchmark of the GPU decode-attention kernels for one 8B-shaped layer.

Prints, per context length: torch SDPA full attention with all KV in HBM (the baseline);
our sparse partial attention at a fixed budget (5%) with every selected block in the GPU
block cache, and the same with every selected block read from pinned host memory through
UVA (cold); the measured pinned host-to-device memcpy bandwidth; and Quest scoring +
top-k selection per layer. Then the ratios against the issue's targets.

"sc+sel@64" scores 64-token blocks (factor 4) and takes the top 5% of those. "select
(forced)" is the top-k over scores with a sink and a recent window forced in, as the hybrid
operator runs it.

Timing: CUDA events around CUDA-graph replays of N consecutive layers, each on a different
input set (different selections, metadata copies), so neither the host's launch overhead
nor a warm L2 flatters the numbers; warm-up first, median of the replays. "eager" rows
launch from Python in a loop instead, for comparison.

    PYTHONPATH=. python scripts/bench_gpu_attention.py [--contexts 32768 131072] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import pstats
import statistics
import time
from typing import Callable

import cupy as cp
import numpy as np
import torch
import torch.nn.functional as F

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from fluxion_dist.attention.layout import BLOCK_TOKENS  # noqa: E402
from fluxion_dist.kernels.attention import sparse_partial_attention  # noqa: E402
from fluxion_dist.kernels.block_table import force_blocks  # noqa: E402
from fluxion_dist.kernels.scoring import quest_scores  # noqa: E402
from fluxion_dist.kernels.selection import select_topk  # noqa: E402
from fluxion_dist.kernels.uva import pinned_empty  # noqa: E402

SETS = 16  # input sets rotated through one graph: >= 100 MB touched per replay


def time_graph(stream: cp.cuda.Stream, step: Callable[[int], object], reps: int) -> float:
    """Median microseconds per step, from replays of a graph of SETS steps (eager launches
    if the capture fails, with a warning: then the number includes host launch gaps)."""
    with stream:
        for i in range(SETS):  # warm-up: compile, allocate, fill the pool's free lists
            step(i)
        stream.synchronize()
        try:
            stream.begin_capture(mode=cp.cuda.runtime.streamCaptureModeRelaxed)
            keep = [step(i) for i in range(SETS)]
            graph = stream.end_capture()
        except Exception as err:  # any capture failure: report it and time eagerly instead
            print(f"WARNING: graph capture failed ({type(err).__name__}: {err}); timing eagerly")
            if stream.is_capturing():
                stream.end_capture()
            return time_eager(stream, step, reps)
    return _median_us(stream, lambda: graph.launch(stream), reps, keep) / SETS


def time_eager(stream: cp.cuda.Stream, step: Callable[[int], object], reps: int) -> float:
    def run():
        with stream:
            for i in range(SETS):
                step(i)
    run()
    return _median_us(stream, run, reps, None) / SETS


def _median_us(stream, launch, reps, keep) -> float:
    start, end = cp.cuda.Event(), cp.cuda.Event()
    launch()
    stream.synchronize()
    times = []
    for _ in range(reps):
        start.record(stream)
        launch()
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) * 1e3)
    del keep
    return statistics.median(times)


def host_us(stream: cp.cuda.Stream, step: Callable[[int], object], calls: int = 200) -> float:
    """Host time per launcher call (checks, allocations, launch), GPU work left queued."""
    with stream:
        step(0)
        stream.synchronize()
        t0 = time.perf_counter()
        for i in range(calls):
            step(i % SETS)
        t1 = time.perf_counter()
        stream.synchronize()
    return (t1 - t0) / calls * 1e6


def pinned_memcpy_gbps(stream: cp.cuda.Stream, nbytes: int = 256 << 20, reps: int = 20) -> float:
    host, _ = pinned_empty((nbytes,), np.uint8)
    host[:] = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dev = cp.empty(nbytes, cp.uint8)
    copy = lambda: cp.cuda.runtime.memcpyAsync(dev.data.ptr, host.ctypes.data, nbytes, 1, stream.ptr)  # noqa: E731
    return nbytes / _median_us(stream, copy, reps, None) / 1e3


def sdpa_us(tokens: int, hq: int, hkv: int, d: int, reps: int) -> float:
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, tokens, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, tokens, d, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def random_arena(nb: int, hkv: int, d: int) -> cp.ndarray:
    """bf16 bits of N(0, 1) values in the arena layout [nb, Hkv, 2, 16, d]."""
    x = cp.random.standard_normal((nb, hkv, 2, BLOCK_TOKENS, d), dtype=cp.float32)
    return (x.view(cp.uint32) >> 16).astype(cp.uint16)


def quest_metadata(arena: cp.ndarray) -> tuple[cp.ndarray, cp.ndarray]:
    k = (arena[:, :, 0].astype(cp.uint32) << 16).view(cp.float32)  # [nb, Hkv, 16, d]
    to_bits = lambda x: (x.view(cp.uint32) >> 16).astype(cp.uint16)  # noqa: E731 (exact: bf16 values)
    return to_bits(k.min(axis=2)), to_bits(k.max(axis=2))


def bench_context(stream, tokens: int, hq: int, hkv: int, d: int, budget: float, reps: int,
                  sweep: bool, profile_host: bool) -> dict:
    nb = tokens // BLOCK_TOKENS
    k_blocks = math.ceil(budget * nb)
    scale = 1.0 / math.sqrt(d)
    res: dict = {"tokens": tokens, "blocks_per_head": k_blocks}
    res["sdpa_us"] = sdpa_us(tokens, hq, hkv, d, reps)
    torch.cuda.empty_cache()

    with stream:
        arena = random_arena(nb, hkv, d)
        kmin, kmax = quest_metadata(arena)
        tables = cp.arange(nb, dtype=cp.int32)[None]
        lens = cp.asarray([tokens], dtype=cp.int32)
        qs = [cp.random.standard_normal((1, hq, d), dtype=cp.float32) for _ in range(SETS)]
        metas = [(kmin.copy(), kmax.copy()) for _ in range(SETS)]
        scores = [(None, cp.empty((1, hkv, nb), cp.float32)) for _ in range(SETS)]
        scores64 = [(None, cp.empty((1, hkv, nb // 4), cp.float32)) for _ in range(SETS)]

        # Real selections (different q per set), and each block's slot if the whole KV were
        # cached: the pool is the arena seen as [nb * Hkv] (block, head) runs.
        sels, slots = [], []
        for i in range(SETS):
            _, kv = quest_scores(qs[i], kmin, kmax, tables, lens, scale=scale, query_scores=False,
                                 out=scores[i])
            sel = select_topk(kv, lens, k_blocks)
            indptr, blocks = cp.asnumpy(sel.indptr), cp.asnumpy(sel.blocks)
            head = np.repeat(np.arange(hkv), np.diff(indptr))
            slot = np.full(blocks.shape, -1, np.int32)
            slot[: indptr[-1]] = blocks[: indptr[-1]] * hkv + head
            sels.append(sel)
            slots.append(cp.asarray(slot))
        nnz = int(cp.asnumpy(sels[0].indptr)[-1])
        pool = arena.reshape(nb * hkv, 2, BLOCK_TOKENS, d)
        host, host_dev = pinned_empty(arena.shape, np.uint16)
        arena.get(out=host)
        stream.synchronize()

    def attend(i: int, *, cached: bool, chunk: int | None = None):
        sel = sels[i]
        extra = dict(sel_slot=slots[i], cache_pool=pool) if cached else {}
        return sparse_partial_attention(qs[i], host_dev, tables, lens, sel.indptr, sel.blocks,
                                        scale=scale, max_row_blocks=sel.max_row_blocks,
                                        chunk=chunk, **extra)

    def score_select(i: int):
        _, kv = quest_scores(qs[i], *metas[i], tables, lens, scale=scale, query_scores=False, out=scores[i])
        return select_topk(kv, lens, k_blocks)

    def score_select64(i: int):  # 64-token blocks: the same metadata bytes, a 4x shorter top-k
        _, kv = quest_scores(qs[i], *metas[i], tables, lens, scale=scale, factor=4, query_scores=False,
                             out=scores64[i])
        return select_topk(kv, lens, -(-k_blocks // 4), factor=4)

    def score_only(i: int):
        return quest_scores(qs[i], *metas[i], tables, lens, scale=scale, query_scores=False, out=scores[i])

    def select_only(i: int):
        return select_topk(scores[i][1], lens, k_blocks)

    # as the hybrid operator selects: a sink and a recent window forced in (force_blocks)
    with stream:
        forced = [s[1].copy() for s in scores]
        for f in forced:
            force_blocks(f, lens, sink_blocks=1, recent_blocks=4)

    res["cached_us"] = time_graph(stream, lambda i: attend(i, cached=True), reps)
    res["cached_eager_us"] = time_eager(stream, lambda i: attend(i, cached=True), reps)
    res["uva_us"] = time_graph(stream, lambda i: attend(i, cached=False), max(5, reps // 5))
    res["uva_gbps"] = nnz * 2 * BLOCK_TOKENS * d * 2 / res["uva_us"] / 1e3
    res["score_us"] = time_graph(stream, score_only, reps)
    res["select_us"] = time_graph(stream, select_only, reps)
    res["select_forced_us"] = time_graph(stream, lambda i: select_topk(forced[i], lens, k_blocks), reps)
    res["score_select_us"] = time_graph(stream, score_select, reps)
    res["score_select_eager_us"] = time_eager(stream, score_select, reps)
    res["score_select64_us"] = time_graph(stream, score_select64, reps)
    res["host_us"] = {name: host_us(stream, fn) for name, fn in
                      (("attention", lambda i: attend(i, cached=True)), ("quest_scores", score_only),
                       ("select_topk", select_only))}
    if profile_host:  # where the launchers' host time goes
        prof = cProfile.Profile()
        with stream:
            prof.enable()
            for i in range(100):
                attend(i % SETS, cached=True)
                score_select(i % SETS)
            prof.disable()
            stream.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
        print(f"host profile at {tokens} tokens (100 x attention + scoring + selection):")
        print("\n".join(out.getvalue().splitlines()[4:26]))
    if sweep:  # list entries per CTA: the split-K trade-off, for tuning chunk_size()
        for chunk in (4, 8, 16, 32, 64):
            res[f"cached_us_chunk{chunk}"] = time_graph(stream, lambda i: attend(i, cached=True, chunk=chunk), reps)
            res[f"uva_us_chunk{chunk}"] = time_graph(stream, lambda i: attend(i, cached=False, chunk=chunk),
                                                     max(5, reps // 5))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    ap.add_argument("--sweep", action="store_true", help="also time fixed split-K chunk sizes")
    ap.add_argument("--profile-host", action="store_true", help="print a cProfile of the launchers")
    args = ap.parse_args()

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    device = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    stream = cp.cuda.Stream(non_blocking=True)
    memcpy = pinned_memcpy_gbps(stream)
    results = [bench_context(stream, t, args.hq, args.hkv, args.head_dim, args.budget, args.reps,
                             args.sweep, args.profile_host) for t in args.contexts]

    print(f"\ndevice: {device} ({props['multiProcessorCount']} SMs); layer: {args.hq} q heads, "
          f"{args.hkv} KV heads, d={args.head_dim}, bf16, batch 1; budget {args.budget:.0%}")
    print(f"pinned H2D memcpy: {memcpy:.1f} GB/s")
    head = f"{'context':>8} {'SDPA us':>9} {'cached us':>10} {'(eager)':>8} {'UVA us':>8} {'UVA GB/s':>9} " \
           f"{'score us':>9} {'select us':>10} {'(forced)':>9} {'sc+sel us':>10} {'(eager)':>8} {'sc+sel@64':>10}"
    print(head)
    for r in results:
        print(f"{r['tokens']:>8} {r['sdpa_us']:>9.1f} {r['cached_us']:>10.1f} {r['cached_eager_us']:>8.1f} "
              f"{r['uva_us']:>8.1f} {r['uva_gbps']:>9.1f} {r['score_us']:>9.1f} {r['select_us']:>10.1f} "
              f"{r['select_forced_us']:>9.1f} "
              f"{r['score_select_us']:>10.1f} {r['score_select_eager_us']:>8.1f} {r['score_select64_us']:>10.1f}")
    print("host time per launcher call, us: " + "; ".join(
        f"{r['tokens']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["host_us"].items()) for r in results))
    print("ratios (target):")
    for r in results:
        print(f"  {r['tokens']:>7}: cached/SDPA {r['cached_us'] / r['sdpa_us']:.3f} (<= 0.15)   "
              f"UVA/memcpy {r['uva_gbps'] / memcpy:.3f} (>= 0.8)   "
              f"score+select {r['score_select_us']:.1f} us (<= 20 at 128k)")
    if args.sweep:
        print("split-K sweep, us (cached / UVA) by list entries per CTA:")
        for r in results:
            cells = "  ".join(f"{c}: {r[f'cached_us_chunk{c}']:.1f}/{r[f'uva_us_chunk{c}']:.0f}" for c in (4, 8, 16, 32, 64))
            print(f"  {r['tokens']:>7}: {cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "memcpy_gbps": memcpy, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
