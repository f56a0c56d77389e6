#!/usr/bin/env python3
"""End-to-end decode and prefill on one machine: what a user gets per token.

TPOT (median, p99) of the decode engine's whole step (embedding -> every layer -> logits ->
greedy token) for (a) the dense all-HBM baseline (the model runner over ``DenseHBMKV``, flash
decoding, one CUDA graph per step), (b) fluxion over host KV (``HybridAttention`` on the GPU,
the arena in pinned host memory filled with random bf16 K/V and their exact Quest min/max) and
(c) quest_gpu and fixed_hybrid over the same arena; each row beside its physical floor. TTFT of
GPU prefill alone vs prefill + pinned D2H + host-store write, and vs the same with each layer
pushed over UCX (shared memory) to a loopback decode store as it lands, the prefill worker's
pipeline (``decode_peer``; needs ucxx). ``--hbm-limit-gib`` emulates a
smaller card. Each hybrid row prints the host's planning time and the GPU's span per step
(the gap to the TPOT is host time the GPU waits for); ``--piecewise`` and ``--no-cpu-share``
add the same policy without segment graphs and without a CPU share, beside. ``--smoke``: a
tiny shape on the CPU, a few steps, every path once (CI).

    python3 scripts/bench_e2e.py --shape llama-3.1-8b --contexts 32768 131072 --batches 1 4
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fluxion_dist.cpu import omp_env  # noqa: E402

omp_env.apply()  # as the decode workers run, and before torch loads libgomp

import numpy as np  # noqa: E402
import torch  # noqa: E402

from decode_worker.attention_setup import build_attention  # noqa: E402
from decode_worker.engine import DecodeEngine  # noqa: E402
from decode_worker.model_runner import ModelRunner  # noqa: E402
from fluxion_dist.attention.layout import BLOCK_TOKENS  # noqa: E402
from fluxion_dist.config.schema import DecodeConfig, DeployConfig, ModelConfig, SparseConfig  # noqa: E402
from fluxion_dist.config.loader import config_from_dict, parse_overrides  # noqa: E402
from fluxion_dist.hybrid import CostModel, HostArena, calibrate  # noqa: E402
from fluxion_dist.model.arch import ModelArch  # noqa: E402
from fluxion_dist.model.hbm_kv import DenseHBMKV  # noqa: E402
from fluxion_dist.model.loader import checkpoint_dir, dummy_model, read_hf_config  # noqa: E402
from fluxion_dist.model.tiny import TINY_ARCH, tiny_model  # noqa: E402
from fluxion_dist.sampling import SamplingParams  # noqa: E402
from kv_store import KVGeometry, KVStore, StoreConfig  # noqa: E402
from scripts.machine_probe import machine  # noqa: E402
from scripts.synthetic_paged_kv import BenchPages  # noqa: E402

GIB = 1 << 30


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ TPOT

def _stats(times: list[float]) -> tuple[float, float]:
    return float(np.median(times)), float(np.percentile(times, 99))


def tpot_dense(model, arch: ModelArch, batch: int, ctx: int, warmup: int, steps: int, eager: bool):
    device = next(model.parameters()).device
    runner = ModelRunner(model, batch, enforce_eager=eager)
    kv = DenseHBMKV(arch, batch, ctx + warmup + steps + 1, device, batch)
    gen = torch.Generator(device=device).manual_seed(1)
    for layer in range(arch.num_hidden_layers):
        for t in (kv.k[layer], kv.v[layer]):
            t[:batch, :, :ctx].normal_(generator=gen)
    kv.set_rows(list(range(batch)))
    tokens, pos, times = [7] * batch, [ctx] * batch, []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        tokens = runner.run(tokens, pos, kv).argmax(dim=-1).tolist()
        times.append(time.perf_counter() - t0)
        pos = [p + 1 for p in pos]
    out = _stats(times[warmup:])
    del kv, runner
    return out


def bench_threads() -> int:
    """The CPU path's threads: every core but one, which the host's own step planning keeps."""
    return max(1, (os.cpu_count() or 2) - 1)


def tpot_hybrid(model, arch: ModelArch, pages: BenchPages, batch: int, policy: str, budget: float,
                cost: CostModel, gpu: bool, warmup: int, steps: int, cache_blocks: int, eager: bool,
                sparse: dict | None = None, step_graphs: bool = True, no_cpu_share: bool = False):
    # the operator a deployment of this policy builds (decode_worker.attention_setup), on this node
    cfg = DeployConfig(decode=DecodeConfig(num_gpus=1 if gpu else 0, max_batch_size=batch, enforce_eager=eager,
                                           sparse=SparseConfig(policy=policy, budget=budget, gpu_cache_blocks=cache_blocks,
                                                               cpu_threads=bench_threads(), **(sparse or {}))))
    op = build_attention(cfg, arch, HostArena(pages.pages, pages.kmin, pages.kmax), cost)
    engine = DecodeEngine(model, pages, batch, op, enforce_eager=eager)
    engine.runner.step_graphs = step_graphs
    if no_cpu_share:
        op.mode = "gpu_only"
    for b in range(batch):
        engine.add(f"r{b}", pages.prompt_len, 7, SamplingParams(max_tokens=warmup + steps + 2, ignore_eos=True), None)
    times, reports = [], []
    for i in range(warmup + steps):
        if i == warmup:
            engine.runner.plan_s = 0.0
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        if i >= warmup:
            reports.append(engine.last_report)
    for b in range(batch):
        engine.abort(f"r{b}")
    op.close()
    return _stats(times[warmup:]), reports, engine.runner.plan_s / steps


def kv_bytes(arch: ModelArch, tokens: int) -> int:
    return 2 * tokens * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * 2


def store_bytes(arch: ModelArch, tokens: int) -> int:
    """A host store for one prompt: its pages plus their min/max (1/16 more), and the allocator's slack."""
    return int(kv_bytes(arch, tokens + BLOCK_TOKENS) * 1.1) + (256 << 20)


def floor_hybrid(reports, arch: ModelArch, weights: int, mach: dict) -> float:
    """weights / HBM + cached blocks / HBM + UVA-read blocks / PCIe (the CPU's share runs beside them)."""
    run = BLOCK_TOKENS * arch.head_dim * 2 * 2  # one (block, head) of K and V in bf16
    cached = np.mean([r.gpu_cached_blocks for r in reports]) * run
    uva = np.mean([sum(x.gpu_uva_blocks for x in r.layers) for r in reports]) * run
    return weights / mach["hbm_bw"] + cached / mach["hbm_bw"] + uva / mach["h2d_bw"]


# ------------------------------------------------------------------ TTFT

def ttft(model, arch: ModelArch, n: int, chunk: int, gpu: bool, push=None) -> tuple[float, float, float | None]:
    """(prefill compute alone, prefill + D2H + host-store write, the same + the UCX push to a
    decode peer, each layer on the wire as soon as it is stored, as the prefill worker does)
    in seconds; the last None without ``push`` (a ``decode_peer.PushTarget``)."""
    device = next(model.parameters()).device
    tokens = torch.randint(5, arch.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).to(device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    model.prefill(tokens[:min(n, 256)], all_logits=False)  # kernels warm
    sync()
    t0 = time.perf_counter()
    model.prefill(tokens, all_logits=False, chunk_tokens=chunk if gpu else None, keep_kv=False)
    sync()
    alone = time.perf_counter() - t0
    geo = KVGeometry(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim)
    store = KVStore(StoreConfig(geo, store_bytes(arch, n), pin="off"))
    def prefill_into_store(after_layer=lambda layer: None) -> None:
        if gpu:
            from prefill_worker.layer_offload import LayerOffload

            def on_packed(layer, kv):
                store.write_layer("p", layer, kv)
                after_layer(layer)
            off = LayerOffload(on_packed, n, arch.num_key_value_heads, arch.head_dim)
            try:
                model.prefill(tokens, off, all_logits=False, chunk_tokens=chunk, keep_kv=False)
                off.finish()
            finally:
                off.close()
        else:
            def on_layer(layer, k, v):
                store.write_layer_kv("p", layer, k, v)
                after_layer(layer)
            model.prefill(tokens, on_layer, all_logits=False, keep_kv=False)

    try:
        store.reserve("p", n)
        t0 = time.perf_counter()
        prefill_into_store()
        stored = time.perf_counter() - t0
        store.abort("p")
        pushed = None
        if push is not None:
            pushed = push.timed(store, "p", n, prefill_into_store)
    finally:
        store.close()
    return alone, stored, pushed


# ------------------------------------------------------------------ main

def build_model(args, gpu: bool):
    if args.smoke:
        return tiny_model(0), TINY_ARCH
    arch = read_hf_config(checkpoint_dir(ModelConfig(path=f"builtin:{args.shape}", load_format="dummy")))
    return dummy_model(arch, "cuda" if gpu else "cpu", torch.bfloat16, seed=0), arch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", help="builtin model config (dummy weights)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=64, help="timed steps per row (>= 64 for a p99)")
    ap.add_argument("--warmup", type=int, default=24,
                    help="untimed steps first (graph capture: a segment key is captured on its second sight, "
                         "and keys cycle over refresh_steps; cache fill)")
    ap.add_argument("--budget", type=float, default=0.05, help="sparse budget of (b) and (c)")
    ap.add_argument("--cache-blocks", type=int, default=1 << 20, help="fluxion's GPU cache slots (8 KiB each at d=128)")
    ap.add_argument("--policies", nargs="+", default=["fluxion", "quest_gpu", "fixed_hybrid"])
    ap.add_argument("--ttft-prompts", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--chunk-tokens", type=int, default=8192)
    ap.add_argument("--hbm-limit-gib", type=float, default=None)
    ap.add_argument("--host-ram-gib", type=float, default=None, help="host RAM the arena may use (default: 75%% of it)")
    ap.add_argument("--max-batch", type=int, default=64, help="the --hbm-limit-gib search stops here")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--no-cpu-share", action="store_true",
                    help="also time each hybrid policy with every miss read by the GPU (over UVA): what the CPU "
                         "share buys")
    ap.add_argument("--piecewise", action="store_true",
                    help="also time each hybrid policy without segment graphs (per-layer replays), beside")
    ap.add_argument("--sparse", action="append", default=[], metavar="KEY=VALUE",
                    help="set another SparseConfig field of the hybrid rows (repeatable), e.g. cache_admission=reused")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, a few steps, every path once")
    args = ap.parse_args(argv)
    try:
        args.sparse_overrides = parse_overrides(args.sparse)
        config_from_dict(args.sparse_overrides, SparseConfig)  # validated (field names, ranges, choices) up front
    except Exception as e:
        ap.error(str(e))
    if args.smoke:
        args.contexts, args.batches, args.steps, args.warmup = [200], [1, 2], 4, 1
        args.ttft_prompts, args.hbm_limit_gib, args.max_batch = [300], args.hbm_limit_gib or 1.0, 2
        args.cache_blocks = 256
    gpu = torch.cuda.is_available() and not args.smoke
    mach = machine(gpu)
    log(f"machine: GPU {mach['gpu']}; CPU {mach['cpu']}; host RAM {mach['host_ram'] / GIB:.0f} GiB")
    if gpu:
        log(f"machine: HBM bandwidth {mach['hbm_bw'] / 1e9:.0f} GB/s (measured, D2D copy), "
            f"host->device {mach['h2d_bw'] / 1e9:.1f} GB/s (measured, pinned)")
    else:
        mach["hbm_bw"] = mach["h2d_bw"] = 20e9  # the floors are nominal on the CPU
        log("machine: no GPU: every path runs on the CPU (floors use a nominal 20 GB/s)")
    model, arch = build_model(args, gpu)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"model: {args.shape if not args.smoke else 'tiny'} ({weights / 1e9:.2f} GB of weights, "
        f"{arch.num_hidden_layers} layers, Hq {arch.num_attention_heads}, Hkv {arch.num_key_value_heads}, d {arch.head_dim})")

    try:
        import ucxx  # noqa: F401
        from decode_peer import PushTarget
        geo = KVGeometry(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim)
        push, why = (PushTarget(geo, store_bytes(arch, max(args.ttft_prompts))) if args.ttft_prompts else None), ""
    except ImportError:
        push, why = None, "not measured: ucxx missing"
    try:
        for n in args.ttft_prompts:
            alone, stored, pushed = ttft(model, arch, n, args.chunk_tokens, gpu, push)
            ucx = why if pushed is None else f"{pushed * 1e3:.1f} ms (x{pushed / alone:.2f})"
            log(f"TTFT prompt={n}: compute {alone * 1e3:.1f} ms | + D2H + host store {stored * 1e3:.1f} ms "
                f"(x{stored / alone:.2f}) | + UCX push to a loopback decode store, layer-pipelined: {ucx}")
    finally:
        if push is not None:
            push.close()

    cost = calibrate(arch.head_dim, arch.num_key_value_heads, arch.gqa_group, num_threads=bench_threads(), gpu=gpu)
    host_cap = (args.host_ram_gib * GIB) if args.host_ram_gib else 0.75 * mach["host_ram"]
    extra = args.warmup + args.steps + 2
    log("TPOT table: row | median ms | p99 ms | floor ms | median/floor")
    for ctx in args.contexts:
        for batch in args.batches:
            med_a, p99_a = tpot_dense(model, arch, batch, ctx, args.warmup, args.steps, args.enforce_eager)
            floor_a = (weights + batch * kv_bytes(arch, ctx)) / mach["hbm_bw"]
            log(f"TPOT ctx={ctx} B={batch} dense_hbm | {med_a * 1e3:.2f} | {p99_a * 1e3:.2f} | "
                f"{floor_a * 1e3:.2f} | {med_a / floor_a:.2f}")
            if gpu:
                torch.cuda.empty_cache()  # the operator's CuPy pool allocates beside torch's
            if batch * kv_bytes(arch, ctx + extra) > host_cap:
                log(f"TPOT ctx={ctx} B={batch} host KV: skipped, {batch * kv_bytes(arch, ctx) / GIB:.0f} GiB "
                    f"exceeds the host cap {host_cap / GIB:.0f} GiB")
                continue
            pages = BenchPages(arch, batch, ctx, extra, gpu)
            log(f"arena ctx={ctx} B={batch}: {pages.pages.nbytes / GIB:.1f} GiB filled in {pages.fill_s:.1f} s")
            med = {}
            runs = [(p, True, False) for p in args.policies]
            runs += [(p, False, False) for p in args.policies if args.piecewise]
            runs += [(p, True, True) for p in args.policies if args.no_cpu_share]
            for policy, whole, gpu_only in runs:
                (m, p99), reports, plan_s = tpot_hybrid(model, arch, pages, batch, policy, args.budget, cost, gpu,
                                                        args.warmup, args.steps, args.cache_blocks, args.enforce_eager,
                                                        args.sparse_overrides, whole, gpu_only)
                policy += "" if whole else "(piecewise)"
                policy += "(no CPU share)" if gpu_only else ""
                spans = [r.gpu_span_s for r in reports if r.gpu_span_s is not None]
                med[policy] = m
                fl = floor_hybrid(reports, arch, weights, mach)
                used = np.mean([r.budget_used for r in reports])
                where = [np.mean([sum(getattr(x, f) for x in r.layers) for r in reports])
                         for f in ("gpu_cached_blocks", "gpu_uva_blocks", "cpu_blocks")]
                log(f"TPOT ctx={ctx} B={batch} {policy} | {m * 1e3:.2f} | {p99 * 1e3:.2f} | {fl * 1e3:.2f} | "
                    f"{m / fl:.2f} | budget used {used:.3f} | (block, head) runs per step: cached {where[0]:.0f}, "
                    f"UVA {where[1]:.0f}, CPU {where[2]:.0f} | CPU ms per step predicted "
                    f"{np.mean([r.predicted_cpu_s for r in reports]) * 1e3:.2f}, measured "
                    f"{np.mean([r.measured_cpu_s for r in reports]) * 1e3:.2f} | steps all in segment graphs "
                    f"{sum(r.whole_step for r in reports)} of {len(reports)}, host planning {plan_s * 1e3:.2f} ms, "
                    f"GPU span {np.median(spans) * 1e3 if spans else float('nan'):.2f} ms per step")
            del pages
            ratios = [f"{p}/dense_hbm {med[p] / med_a:.2f}" for p in med]
            ratios += [f"{p}/fluxion {med[p] / med['fluxion']:.2f}" for p in med if p != "fluxion" and "fluxion" in med]
            log(f"ratio ctx={ctx} B={batch}: " + ", ".join(ratios))

    per_req = kv_bytes(arch, max(args.contexts))
    log(f"host RAM: {mach['host_ram'] / GIB:.0f} GiB holds {int(mach['host_ram'] // per_req)} requests of "
        f"{max(args.contexts)} tokens ({per_req / GIB:.1f} GiB each; {int(host_cap // per_req)} within the cap)")
    if args.hbm_limit_gib:
        hbm_limit(args, model, arch, weights, cost, mach, gpu, host_cap)
    return 0


def hbm_limit(args, model, arch, weights, cost, mach, gpu, host_cap) -> None:
    ctx, limit = max(args.contexts), args.hbm_limit_gib * GIB
    extra = args.warmup + args.steps + 2
    if gpu:
        # the earlier rows' runners hold CUDA-graph pools until collected: the limit is the
        # weights' and this row's, not what the table's rows left behind
        gc.collect()
        torch.cuda.empty_cache()
        log(f"HBM in use before the limit: {torch.cuda.memory_reserved() / GIB:.1f} GiB reserved by torch")
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / mach["hbm_total"]))
    log(f"HBM limit {args.hbm_limit_gib:g} GiB (emulated: torch.cuda.set_per_process_memory_fraction; "
        f"the hybrid operator's CuPy pool is counted against it by hand)")
    per_dense = kv_bytes(arch, ctx + extra)
    reserve = min(GIB, limit / 8)  # activations and workspace
    fit_a = int(min(args.max_batch, max(0, limit - weights - reserve) // per_dense))
    while fit_a > 0 and gpu:
        try:
            kv = DenseHBMKV(arch, fit_a, ctx + extra, "cuda", fit_a)
            del kv
            break
        except torch.OutOfMemoryError:
            fit_a -= 1
    row = f"HBM limit ctx={ctx} dense_hbm: largest batch {fit_a}"
    if fit_a:
        med, _ = tpot_dense(model, arch, fit_a, ctx, args.warmup, args.steps, args.enforce_eager)
        row += f", {fit_a / med:.1f} tokens/s"
    log(row)
    cupy_bytes = args.cache_blocks * BLOCK_TOKENS * arch.head_dim * 2 * 2
    per_host = kv_bytes(arch, ctx + extra)
    mirror = per_host // BLOCK_TOKENS  # the device's min/max mirror: 2 rows of d per 16-token block of K and V
    if args.sparse_overrides.get("cache_admission") == "reused":  # + an int32 stamp per (block, head)
        mirror += per_host // (2 * BLOCK_TOKENS * arch.head_dim * 2) * 4
    fit_b = int(min(host_cap // per_host, max(0, limit - weights - reserve - cupy_bytes) // max(mirror, 1)))
    fit_b = max(0, min(fit_b, args.max_batch))
    row = f"HBM limit ctx={ctx} fluxion: largest batch {fit_b} (host RAM bound {int(host_cap // per_host)})"
    if fit_b:
        pages = BenchPages(arch, fit_b, ctx, extra, gpu)
        (med, _), _, _ = tpot_hybrid(model, arch, pages, fit_b, "fluxion", args.budget, cost, gpu, args.warmup,
                                  args.steps, args.cache_blocks, args.enforce_eager, args.sparse_overrides)
        row += f", {fit_b / med:.1f} tokens/s"
        del pages
    log(row)
    if gpu:
        torch.cuda.set_per_process_memory_fraction(1.0)


if __name__ == "__main__":
    raise SystemExit(main())
