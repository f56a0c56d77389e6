"""Decode-attention benchmark: the hybrid operator's policies against SDPA in HBM.

8B-shaped attention (32 layers, 32 query heads, 8 KV heads, d=128, bf16), KV in host
memory (pinned, read in place by the Cython path and through UVA by the GPU), contexts
32k/64k/128k, batch 1 and 4, 64+ consecutive decode steps whose queries drift step to
step (``attention.synthetic.drifted_queries``: the planted head profile holds, the exact
scores move). One table: torch SDPA full attention with all KV in HBM, each baseline
policy (full over host KV, quest_gpu, cpu_only, fixed_hybrid at budget 0.05) and Fluxion;
per-step time (the host's planning included), ratios, budget used, blocks per device, GPU
idle (1 - attention kernel time measured with CUDA events / step wall time; and the cost
model's prediction), and the CPU share's time per step, predicted by the split's cost model
(``cost_model.observe_cpu``) and measured. ``--rescore-factors 0 2`` runs fluxion once per factor (rows
``fluxion``, ``fluxion+rs2``: the rescoring stage's cost in the same table); ``--sparse
KEY=VALUE`` sets any other SparseConfig field for every policy. Memory pressure:
``--cache-fraction 0.25`` sizes the GPU block cache at a quarter of the step's selected
working set, and ``--topic-every N`` makes the queries switch topic every N steps so the
selections move (rows of issue 21: ``--contexts 131072 --batches 4 8 --cache-fraction 0.25``).

Every layer's KV lives in pages of its own (the block cache is partitioned by layer), so
the arena is layers x batch x context x 64 KiB / 16 tokens: 16 GiB per request at 128k and
32 layers. ``--layers`` runs fewer layers and scales the per-step numbers to 32.

    PYTHONPATH=. python scripts/bench_decode_attention.py [--contexts 32768 131072] [--batches 1 4]
    PYTHONPATH=. python scripts/bench_decode_attention.py --smoke     # CPU only, tiny, end to end

Needs a GPU except with ``--smoke`` (then every policy runs with the GPU share forced to
zero, and SDPA runs on the CPU: a check that the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
from fluxion_dist.cpu import omp_env  # noqa: E402

omp_env.apply()  # as the decode workers run, and before torch loads libgomp

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks, pack_kv_blocks, to_bf16_bits  # noqa: E402
from fluxion_dist.attention.synthetic import drifted_queries, make_synthetic_kv  # noqa: E402
from fluxion_dist.config.loader import config_from_dict, parse_overrides  # noqa: E402
from fluxion_dist.config.schema import SparseConfig  # noqa: E402
from fluxion_dist.hybrid import HybridAttention, HybridOptions, calibrate  # noqa: E402
from fluxion_dist.hybrid.operator import HostArena  # noqa: E402
from fluxion_dist.hybrid.paged_builder import BuiltSequence, block_boxes  # noqa: E402
from fluxion_dist.kernels.device import gpu_unavailable_reason  # noqa: E402

POLICIES = ("full", "quest_gpu", "cpu_only", "fixed_hybrid", "fluxion")
HEAD_MIX = ("sink_local", "sink_local", "sink_local", "needle", "needle", "needle", "uniform", "uniform")


@dataclass(frozen=True, slots=True)
class Shape:
    layers: int
    model_layers: int  # per-step numbers are scaled from ``layers`` to this
    q_heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True, slots=True)
class Row:
    method: str
    context: int
    batch: int
    ms_per_step: float  # scaled to the model's layers
    budget_used: float
    cpu_blocks: int  # per step, scaled
    gpu_blocks: int
    gpu_cached_blocks: int
    gpu_idle_measured: float | None
    gpu_idle_predicted: float | None
    cpu_ms_predicted: float = 0.0  # per step, scaled: the CPU share's time by the cost model the split used
    cpu_ms_measured: float = 0.0  # ... and as the team's calls took


def _heads(kv_heads: int) -> tuple[str, ...]:
    return tuple(HEAD_MIX[i % len(HEAD_MIX)] for i in range(kv_heads))


def build_arena(shape: Shape, context: int, batch: int, reserve: int, on_gpu: bool):
    """The arena (page-locked by the operator on a GPU machine); each (request, layer) gets its
    own shuffled pages."""
    nb = num_blocks(context + reserve)
    pages = shape.layers * batch * nb
    kv_shape = (pages, shape.kv_heads, 2, BLOCK_TOKENS, shape.head_dim)
    # Plain (transparent-huge-page eligible) memory, page-locked later by the operator
    # (cudaHostRegister): the CPU path reads it scattered, and 4 KiB pages cost TLB misses.
    kv_pages = np.empty(kv_shape, np.uint16)
    meta = (pages, shape.kv_heads, shape.head_dim)
    arena = HostArena(kv_pages, np.empty(meta, np.uint16), np.empty(meta, np.uint16))
    order = np.random.default_rng(0).permutation(pages)
    seqs, synth = [], []
    at = 0
    for b in range(batch):
        kv = make_synthetic_kv(context, _heads(shape.kv_heads), group_size=shape.q_heads // shape.kv_heads,
                               head_dim=shape.head_dim, seed=b)
        packed = pack_kv_blocks(kv.k, kv.v)  # the same content in every layer, in pages of its own
        kb = to_bf16_bits(kv.k).reshape(kv.k.shape)
        kf = (kb.astype(np.uint32) << 16).view(np.float32)
        lo, hi = block_boxes(kf)
        lo_bits, hi_bits = (lo.view(np.uint32) >> 16).astype(np.uint16), (hi.view(np.uint32) >> 16).astype(np.uint16)
        tables = []
        for _ in range(shape.layers):
            mine = order[at:at + nb]
            at += nb
            used = mine[:packed.shape[0]]
            arena.kv_pages[used] = packed
            arena.kmin[used] = lo_bits
            arena.kmax[used] = hi_bits
            tables.append([int(p) for p in mine])
        seqs.append(BuiltSequence(tables, context))
        synth.append(kv)
    return arena, seqs, synth


def sdpa_ms(shape: Shape, context: int, batch: int, steps: int, device: str) -> float:
    """Full attention with all KV resident (HBM on a GPU), per step of ``model_layers`` layers.

    Two distinct KV sets alternate so no layer finds the previous one's KV in L2."""
    g = torch.Generator(device="cpu").manual_seed(0)
    kvs = [(torch.randn(batch, shape.kv_heads, context, shape.head_dim, generator=g).to(device, torch.bfloat16),
            torch.randn(batch, shape.kv_heads, context, shape.head_dim, generator=g).to(device, torch.bfloat16))
           for _ in range(2)]
    q = torch.randn(batch, shape.q_heads, 1, shape.head_dim, generator=g).to(device, torch.bfloat16)

    def layer(i: int):
        k, v = kvs[i % 2]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    for i in range(4):
        layer(i)
    per_layer = []
    for s in range(steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(shape.layers):
                layer(i)
            end.record()
            end.synchronize()
            per_layer.append(start.elapsed_time(end) / shape.layers)
        else:
            t0 = time.perf_counter()
            for i in range(shape.layers):
                layer(i)
            per_layer.append((time.perf_counter() - t0) * 1e3 / shape.layers)
    kvs.clear()  # the KV goes back to the allocator before the policies run
    return statistics.median(per_layer) * shape.model_layers


def method_name(policy: str, rescore_factor: float) -> str:
    return f"{policy}+rs{rescore_factor:g}" if rescore_factor else policy


def cache_blocks(args, shape: Shape, batch: int, context: int) -> int:
    """The GPU block cache's (block, head) slots for the layers run: ``--cache-fraction`` of the
    step's selected working set (budget x blocks x KV heads x batch, per layer), or else a
    32-layer model's per-layer share of ``--cache-slots``."""
    if args.cache_fraction is not None:
        per_layer = args.budget * num_blocks(context) * shape.kv_heads * batch
        return max(1, math.ceil(args.cache_fraction * per_layer * shape.layers))
    return args.cache_slots * shape.layers // shape.model_layers


def run_policy(policy: str, shape: Shape, arena: HostArena, seqs, synth, cost, args, device: str,
               context: int, rescore_factor: float = 0.0) -> Row:
    batch = len(seqs)
    fields = dict(budget=args.budget, mass_target=args.mass_target, floor_fraction=args.floor_fraction,
                  head_predictor=args.head_predictor == "on", sink_tokens=args.sink_tokens,
                  recent_tokens=args.recent_tokens, cpu_threads=args.cpu_threads,
                  gpu_cache_blocks=cache_blocks(args, shape, batch, context))
    cfg = SparseConfig(policy=policy, **{**fields, **args.sparse_overrides, "rescore_factor": rescore_factor})
    op = HybridAttention(arena, cfg, cost, HybridOptions(shape.layers, cpu_threads=args.cpu_threads, device=device))
    total = args.warmup + args.steps
    queries = [[drifted_queries(kv, total, drift=args.drift, seed=1000 * layer + b, topic_every=args.topic_every,
                                topic_shift=args.topic_shift) for layer in range(shape.layers)]
               for b, kv in enumerate(synth)]
    rng = np.random.default_rng(1)
    # inputs live where the model's would: on the GPU when there is one (uploaded before timing)
    dev = "cuda" if device == "gpu" else "cpu"
    q_all = torch.from_numpy(np.stack([np.stack([np.stack([queries[b][layer][step] for b in range(batch)])
                                                 for layer in range(shape.layers)]) for step in range(total)])).to(dev)
    pick = rng.integers(0, context, size=(total, shape.layers, batch))

    def new_tokens(part: str) -> torch.Tensor:  # [steps, layers, B, Hkv, d] of synth's "k" or "v"
        return torch.from_numpy(np.stack([[np.stack([getattr(synth[b], part)[pick[t, layer, b]] for b in range(batch)])
                                           for layer in range(shape.layers)] for t in range(total)])).to(dev, torch.bfloat16)
    k_all, v_all = new_tokens("k"), new_tokens("v")
    del queries
    # each call's views made before timing, as SDPA's loop indexes nothing either
    inputs = [[(q_all[t, layer], k_all[t, layer], v_all[t, layer]) for layer in range(shape.layers)]
              for t in range(total)]
    for s in seqs:
        s.seq_len = context  # each policy decodes the same positions (overwriting the last one's tokens)
    times, host_times, reports = [], [], []
    built = 0
    try:
        for step in range(total):
            if step == args.warmup and device == "gpu":
                built = op.pipeline.states_built
            t0 = time.perf_counter()  # the step's planning (op.step) counts: a model pays it
            hook = op.step(seqs, [f"r{b}" for b in range(batch)])
            for layer, (q, k, v) in enumerate(inputs[step]):
                # the new token: a key/value like the context's (drawn from its tokens), bf16
                hook(layer, q, k, v)
            if step >= args.warmup:
                host_times.append(time.perf_counter() - t0)
            if dev == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            for s in seqs:
                s.seq_len += 1
            if step >= args.warmup:
                times.append(elapsed)
                reports.append((hook.report(), elapsed))
        if device == "gpu":
            built = op.pipeline.states_built - built
    finally:
        op.close()
    print(f"    host {statistics.median(host_times) * 1e3 * shape.model_layers / shape.layers:.3f} ms/step "
          f"(until the last layer is queued), layer states built after warm-up: {built}", flush=True)
    scale = shape.model_layers / shape.layers
    # GPU idle: the share of the step's wall time (planning included) with no attention work on the GPU
    busy = [r.gpu_busy_s for r, _ in reports]
    gpu_work = any(r.gpu_blocks for r, _ in reports) and all(b is not None for b in busy)
    steps = [r for r, _ in reports]
    return Row(method_name(policy, rescore_factor), context, batch, statistics.median(times) * 1e3 * scale,
               float(np.mean([r.budget_used for r in steps])),
               int(np.mean([r.cpu_blocks for r in steps]) * scale),
               int(np.mean([r.gpu_blocks for r in steps]) * scale),
               int(np.mean([r.gpu_cached_blocks for r in steps]) * scale),
               float(np.mean([max(0.0, 1 - b / wall) for b, (_, wall) in zip(busy, reports)])) if gpu_work else None,
               float(np.mean([r.predicted_gpu_idle_fraction for r in steps])) if gpu_work else None,
               float(np.mean([r.predicted_cpu_s for r in steps])) * 1e3 * scale,
               float(np.mean([r.measured_cpu_s for r in steps])) * 1e3 * scale)


def kernel_profile(run, run_args: tuple, calls: int) -> None:
    """Run ``run(*run_args)`` under the CUDA profiler (CUPTI sees the kernels inside CUDA graphs too) and
    print each GPU kernel's and copy's time: per launch (median, p90, max) and per layer call."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(*run_args)
    # The profiler replaces the file it is given rather than writing into it: a handle opened
    # before the export reads an empty file, so the trace is read back by path.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    durs: dict[str, list[float]] = {}
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            durs.setdefault(e["name"].split("(")[0][:40], []).append(float(e.get("dur", 0.0)))
    print(f"    {'GPU work (fluxion)':<40} {'launches':>8} {'median us':>9} {'p90 us':>8} {'max us':>8} {'us/layer':>8}")
    for name, d in sorted(durs.items(), key=lambda kv: -sum(kv[1])):
        d.sort()
        print(f"    {name:<40} {len(d):>8} {statistics.median(d):>9.1f} {d[int(0.9 * len(d))]:>8.1f} {d[-1]:>8.1f} "
              f"{sum(d) / calls:>8.1f}")


def print_table(rows: list[Row], sdpa: dict[tuple[int, int], float]) -> None:
    head = (f"{'context':>8} {'B':>2} {'method':<14} {'ms/step':>9} {'x SDPA':>7} {'fixed_hyb/x':>11} "
            f"{'budget':>7} {'cpu blk':>9} {'gpu blk':>9} {'cached':>9} {'idle meas':>9} {'idle pred':>9} "
            f"{'cpu ms pred':>11} {'cpu ms meas':>11}")
    print(head)
    print("-" * len(head))
    for (context, batch), base in sorted(sdpa.items()):
        print(f"{context:>8} {batch:>2} {'sdpa resident':<14} {base:>9.3f} {1.0:>7.2f}")
        mine = [r for r in rows if (r.context, r.batch) == (context, batch)]
        fixed = next((r.ms_per_step for r in mine if r.method == "fixed_hybrid"), math.nan)
        for r in mine:
            idle = lambda x: f"{x:>9.1%}" if x is not None else f"{'-':>9}"  # noqa: E731
            print(f"{context:>8} {batch:>2} {r.method:<14} {r.ms_per_step:>9.3f} {r.ms_per_step / base:>7.2f} "
                  f"{fixed / r.ms_per_step:>11.2f} {r.budget_used:>7.3f} {r.cpu_blocks:>9} {r.gpu_blocks:>9} "
                  f"{r.gpu_cached_blocks:>9} {idle(r.gpu_idle_measured)} {idle(r.gpu_idle_predicted)} "
                  f"{r.cpu_ms_predicted:>11.2f} {r.cpu_ms_measured:>11.2f}")


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU only: tiny shapes, a few steps, GPU share forced to zero")
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=32, help="layers run (per-step numbers scaled to 32)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--mass-target", type=float, default=0.95)
    p.add_argument("--floor-fraction", type=float, default=SparseConfig().floor_fraction,
                   help="fluxion: each head's floor, as a fraction of the budget")
    p.add_argument("--head-predictor", choices=("on", "off"), default="on" if SparseConfig().head_predictor else "off",
                   help="fluxion: local heads read only their sinks and window")
    p.add_argument("--rescore-factors", type=float, nargs="+", default=[SparseConfig().rescore_factor],
                   help="fluxion: sparse.rescore_factor values, one fluxion row each (0: off)")
    p.add_argument("--sparse", action="append", default=[], metavar="KEY=VALUE",
                   help="set any other SparseConfig field for every policy (repeatable)")
    p.add_argument("--sink-tokens", type=int, default=16)
    p.add_argument("--recent-tokens", type=int, default=128)
    p.add_argument("--drift", type=float, default=0.1, help="per-step logit drift of the queries")
    p.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-slots", type=int, default=1 << 21, help="GPU block-cache slots (8 KiB each at d=128)")
    p.add_argument("--cache-fraction", type=float, default=None,
                   help="size the cache as this fraction of the step's selected working set instead (memory "
                        "pressure: e.g. 0.25, 0.5)")
    p.add_argument("--topic-every", type=int, default=0,
                   help="every N steps the queries switch topic (0: never), so selections jump")
    p.add_argument("--topic-shift", type=float, default=1.0, help="logit std of a topic's persistent component")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--kernel-profile", action="store_true",
                   help="GPU: also profile fluxion's kernels per context and batch (one more, untimed run)")
    args = p.parse_args(argv)
    try:
        args.sparse_overrides = parse_overrides(args.sparse)
        if "rescore_factor" in args.sparse_overrides:
            raise ValueError("set the rescoring factor with --rescore-factors")
        for f in args.rescore_factors:
            config_from_dict({**args.sparse_overrides, "rescore_factor": f}, SparseConfig)  # validated up front
    except Exception as e:
        p.error(str(e))

    if args.smoke:
        shape = Shape(layers=2, model_layers=2, q_heads=8, kv_heads=2, head_dim=64)
        args.contexts, args.batches = [2048], [1, 2]
        args.steps, args.warmup = min(args.steps, 4), 1
        args.cpu_threads, args.cache_slots = min(args.cpu_threads, 2), 4096
        device, sdpa_device = "cpu", "cpu"
    else:
        reason = gpu_unavailable_reason()
        if reason is not None:
            print(f"bench_decode_attention needs a CUDA GPU (or --smoke for a CPU check): {reason}", file=sys.stderr)
            return 2
        shape = Shape(layers=args.layers, model_layers=32, q_heads=32, kv_heads=8, head_dim=128)
        device, sdpa_device = "gpu", "cuda"
        need = max(shape.layers * b * num_blocks(c + args.steps + args.warmup) * shape.kv_heads * 2 * BLOCK_TOKENS
                   * shape.head_dim * 2 for c in args.contexts for b in args.batches)
        if need > 0.8 * _ram_bytes():
            print(f"the largest arena needs {need / 2**30:.1f} GiB of pinned host memory; this machine has "
                  f"{_ram_bytes() / 2**30:.1f} GiB: pass fewer --layers (numbers are scaled to 32)", file=sys.stderr)
            return 2

    cost = calibrate(shape.head_dim, shape.kv_heads, shape.q_heads // shape.kv_heads,
                     num_threads=args.cpu_threads, gpu=device == "gpu", blocks_per_row=256 if args.smoke else 2048)
    print(f"cost model: {cost}")
    rows, sdpa = [], {}
    for context in args.contexts:
        for batch in args.batches:
            sdpa[(context, batch)] = sdpa_ms(shape, context, batch, max(args.steps // 4, 3), sdpa_device)
            arena, seqs, synth = build_arena(shape, context, batch, args.steps + args.warmup, device == "gpu")
            runs = [(pol, f) for pol in args.policies for f in (args.rescore_factors if pol == "fluxion" else [0.0])]
            for policy, factor in runs:
                gc.collect()  # the previous policy's garbage is not collected inside this one's timing
                row = run_policy(policy, shape, arena, seqs, synth, cost, args, device, context, factor)
                rows.append(row)
                print(f"  {context} x{batch} {row.method}: {row.ms_per_step:.3f} ms/step", flush=True)
                if policy == "fluxion" and args.kernel_profile and device == "gpu":
                    kernel_profile(run_policy, (policy, shape, arena, seqs, synth, cost, args, device, context, factor),
                                   calls=(args.warmup + args.steps) * shape.layers)
                if device == "gpu":
                    import cupy as cp

                    cp.get_default_memory_pool().free_all_blocks()
            del arena, seqs, synth
    print()
    cache = (f"{args.cache_fraction:g} of each row's selected working set" if args.cache_fraction is not None
             else f"{args.cache_slots} (block, head) slots per 32-layer model")
    topics = f", a topic switch every {args.topic_every} steps (shift {args.topic_shift:g})" if args.topic_every else ""
    print(f"GPU block cache: {cache}; query drift {args.drift:g}{topics}")
    print_table(rows, sdpa)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cost_model": asdict(cost), "sdpa_ms": {f"{c}x{b}": v for (c, b), v in sdpa.items()},
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
