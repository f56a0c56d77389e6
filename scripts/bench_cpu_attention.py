"""CPU sparse attention: KV bytes read per second against the DRAM read ceiling and torch.

One run prints one table for an 8B-shaped layer (8 KV heads, 32 query heads,
d=128, bf16): for each context and budget, the median time of our kernel on
each path (``openmp``: ``sparse_partial_attention``, a parallel region and
Python checks per call; ``team``: ``AttentionTeam.attend``, a persistent team
bound once per step) and of the torch baseline (gather + bmm, same thread
count), the KV bytes each read per second, and the ratios ours/ceiling and
ours/torch. Above the table, each path's fixed cost per layer call: the
median of back-to-back calls over an empty selection (no KV read, outputs
still written). The ceiling is a
multithreaded streaming read of a buffer far larger than the caches; beside it,
the same scattered (page, head) runs as each row's selection read with no
arithmetic by the row's own threads (``_stream.scattered_read`` on OpenMP,
``AttentionTeam.scattered_read`` on the team): the ceiling of the kernel's
access pattern, which no prefetcher streams. OpenMP runs under the decode
workers' wait policy (``cpu.omp_env``; a setting in the environment wins).

Every repeat draws a fresh random selection and first streams through a
cache-sized slice of the ceiling buffer, so no repeat finds its blocks in
cache (decode reads each layer's KV once per step). The flush also evicts the
call's own code and Python state, which decode (one call per layer, every
step) keeps warm: cold, that alone costs ~125 us here (32k/5% reads its KV in
~0.4 ms), so each timed call follows an untimed one over an empty selection,
which reads no KV. Ceiling samples are taken
between the kernel's repeats and each row is judged against the samples taken
during it, so both sides see the same background load.

Below the table, for each row that ran on both paths, the two per-layer-call times and
their ratio: what the decode worker's operator (which calls the team) saves per layer.

    python scripts/bench_cpu_attention.py --threads 2 --contexts 131072 --budgets 0.05 --no-torch
    python scripts/bench_cpu_attention.py --threads 2 --contexts 4096 --budgets 0.05 --no-torch --repeats 51 --operator

``--operator`` adds the same comparison one level up: a layer call of the hybrid operator's
CPU step (append, scores, selection, attention, merge) on the team as served and on OpenMP
regions; and fluxion's step with and without block -> token refinement
(``sparse.token_refine_factor``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
from fluxion_dist.cpu import omp_env  # noqa: E402

omp_env.apply()  # as the decode workers run, and before torch loads libgomp

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fluxion_dist.attention.layout import BLOCK_TOKENS  # noqa: E402
from fluxion_dist.cpu import _attention, _stream  # noqa: E402
from fluxion_dist.cpu.attention import sparse_partial_attention  # noqa: E402
from fluxion_dist.cpu.synthetic_arena import paged_batch, random_selection  # noqa: E402
from fluxion_dist.cpu.team import AttentionTeam  # noqa: E402
from fluxion_dist.cpu.torch_baseline import torch_sparse_partial_attention  # noqa: E402
from fluxion_dist.config.schema import SparseConfig  # noqa: E402
from fluxion_dist.hybrid import CostModel, HybridAttention, HybridOptions, StepHook  # noqa: E402
from fluxion_dist.hybrid.paged_builder import allocate_arena, build_paged, pages_needed  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


class Ceiling:
    """The streaming-read buffer: its samples are the ceiling, a slice of it flushes the caches."""

    def __init__(self, gib: float, flush_mib: int, threads: int):
        n = int(gib * (1 << 30)) // 8
        self.buf = np.arange(n, dtype=np.uint64)
        self.buf *= np.uint64(0x9E3779B97F4A7C15)  # non-zero, non-repeating words, written once
        self.flush_words = min(n, flush_mib * (1 << 20) // 8)
        self.threads = threads
        self.samples: list[float] = []

    def sample(self) -> None:
        t = time.perf_counter()
        _stream.stream_read(self.buf, self.threads)
        self.samples.append(self.buf.nbytes / (time.perf_counter() - t))

    def flush(self) -> None:
        _stream.stream_read(self.buf[-self.flush_words:], self.threads)

    @property
    def gbps(self) -> float:
        return statistics.median(self.samples) / 1e9


def time_calls(rng, batch, budget, repeats, ceiling, run, prepare=lambda call: call) -> tuple[int, float, float]:
    """Median seconds of ``run(prepare(call))`` (``prepare`` untimed) over fresh selections,
    caches flushed; the KV bytes read; and the median ceiling (bytes/s) sampled between these
    repeats, under the same load."""
    hkv, d = batch.kv_pages.shape[1], batch.q.shape[-1]
    times, nbytes, first = [], 0, len(ceiling.samples)
    for _ in range(repeats):
        indptr, blocks = random_selection(rng, batch.seq_lens, hkv, budget)
        nbytes = blocks.size * 2 * BLOCK_TOKENS * d * 2  # contexts are whole blocks
        empty = prepare((batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens, np.zeros_like(indptr),
                         blocks[:0], 1 / np.sqrt(d)))
        call = prepare((batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens, indptr, blocks, 1 / np.sqrt(d)))
        ceiling.sample()
        ceiling.flush()
        run(empty)
        t = time.perf_counter()
        run(call)
        times.append(time.perf_counter() - t)
    return nbytes, statistics.median(times), statistics.median(ceiling.samples[first:])


def run_starts(call) -> tuple[np.ndarray, np.ndarray, int]:
    """The kernel call's selection as (arena words, start word of each selected (page, head) run,
    run length in words), in the kernel's order: for ``_stream.scattered_read``."""
    _, kv, tables, _, indptr, blocks, _ = call
    hkv = kv.shape[1]
    run_words = kv[0, 0].nbytes // 8
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    pages = tables[rows // hkv, blocks[:rows.size]].astype(np.int64)
    return kv.reshape(-1).view(np.uint64), (pages * hkv + rows % hkv) * run_words, run_words


def fixed_costs(rng, args, group, team: AttentionTeam) -> dict[str, float]:
    """Median seconds of a layer call over an empty selection, back to back (as a step's layers
    come), per path: the cost a call adds before it reads any KV."""
    batch = paged_batch(rng, [4096], args.kv_heads, group, args.head_dim, poison=False)  # reads none of it
    indptr, blocks = np.zeros(args.kv_heads + 1, np.int32), np.zeros(0, np.int32)
    scale = 1 / np.sqrt(args.head_dim)
    team.bind(batch.kv_pages, batch.seq_lens, batch.q.shape[1], scale)
    calls = {
        "openmp": lambda: sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens,
                                                   indptr, blocks, scale, num_threads=args.threads),
        "team": lambda: team.attend(batch.q, batch.block_tables, indptr, blocks),
    }
    out = {}
    for name, call in calls.items():
        times = []
        for _ in range(args.fixed_calls):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


class _OpenMPStepHook(StepHook):
    """The operator's CPU step with its scoring, selection and attention on OpenMP regions
    instead of the team: what each layer would cost without the team."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.selection_team = None

    def _attend(self, qf, tables, seq_lens, indptr, blocks, scale, masks=None):
        return sparse_partial_attention(qf, self.op.arena.kv_pages, tables, seq_lens, indptr, blocks, scale,
                                        sel_masks=masks, num_threads=self.op.options.cpu_threads)


OPERATOR_VARIANTS = {  # name: (SparseConfig fields, hook); fixed_hybrid's pair isolates the team
    "openmp": ({"policy": "fixed_hybrid"}, _OpenMPStepHook),
    "team": ({"policy": "fixed_hybrid"}, StepHook),
    "fluxion": ({"policy": "fluxion"}, StepHook),
    "fluxion+token_refine": ({"policy": "fluxion", "token_refine_factor": 2.0}, StepHook),
}


def operator_layer_calls(rng, args, group) -> dict[str, float]:
    """Median seconds of one layer call of ``HybridAttention``'s CPU step (append, Quest scores,
    selection, attention, merge) at the first context and budget, per ``OPERATOR_VARIANTS``
    entry. Steps go round the variants, so all see the same background load; the KV (each layer
    its own pages) is read back to back as in a decode step, caches not flushed."""
    ctx, layers, steps = args.contexts[0], args.operator_layers, args.operator_steps
    hkv, d = args.kv_heads, args.head_dim
    rounds = len(OPERATOR_VARIANTS) * (steps + 1)
    kv = [[tuple(rng.standard_normal((ctx, hkv, d), dtype=np.float32) for _ in range(2)) for _ in range(layers)]]
    arena = allocate_arena(pages_needed([ctx], layers, rounds + 1), hkv, d)
    seqs = build_paged(arena, kv, reserve_tokens=rounds + 1, rng=rng)
    del kv
    cost = CostModel.cpu_only(d, 10.0)
    ops = {name: (HybridAttention(arena, SparseConfig(budget=args.budgets[0], **fields), cost,
                                  HybridOptions(layers, cpu_threads=args.threads, device="cpu")), hook)
           for name, (fields, hook) in OPERATOR_VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in ops}
    try:
        for step in range(rounds):  # the first round warms up
            name = list(ops)[step % len(ops)]
            op, hook_cls = ops[name]
            hook = hook_cls(op, seqs, ["r0"], [None])
            for layer in range(layers):
                q = torch.from_numpy(rng.standard_normal((1, hkv * group, d), dtype=np.float32))
                k, v = (torch.from_numpy(rng.standard_normal((1, hkv, d), dtype=np.float32)) for _ in range(2))
                t = time.perf_counter()
                hook(layer, q, k, v)
                if step >= len(ops):
                    times[name].append(time.perf_counter() - t)
            seqs[0].seq_len += 1
    finally:
        for op, _ in ops.values():
            op.close()
    return {name: statistics.median(t) for name, t in times.items()}


def make_team(teams: dict, args, isa: str | None = None, prefetch: int | None = None,
              chunks: int | None = None) -> AttentionTeam:
    """The run's team for these kernel knobs (the first of each by default), made once."""
    key = (isa or args.isa[0], args.prefetch[0] if prefetch is None else prefetch,
           chunks or args.chunks_per_thread[0])
    if key not in teams:
        teams[key] = AttentionTeam(args.threads, pause_us=args.team_pause_us, isa=key[0], prefetch=key[1],
                                   chunks_per_thread=key[2])
    return teams[key]


def hot_rate(rng, args, group, isa) -> float:
    """Bytes/s of the kernel over 32 blocks per KV head revisited ~1000 times: the KV stays in
    L2, so this is the compute ceiling of the kernel on this machine (memory not in the way)."""
    batch = paged_batch(rng, [32 * BLOCK_TOKENS], args.kv_heads, group, args.head_dim, poison=False)
    per_row = 32 * 1024
    blocks = np.tile(np.arange(32, dtype=np.int32), per_row // 32 * args.kv_heads)
    indptr = (np.arange(args.kv_heads + 1) * per_row).astype(np.int32)
    call = (batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens, indptr, blocks, 0.1)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        sparse_partial_attention(*call, num_threads=args.threads, isa=isa)
        times.append(time.perf_counter() - t)
    return blocks.size * 2 * BLOCK_TOKENS * args.head_dim * 2 / statistics.median(times) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--contexts", type=ints, default=[32768, 131072], help="tokens, comma-separated")
    p.add_argument("--budgets", type=floats, default=[0.05, 1.0], help="fractions of the blocks")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--torch-repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--ceiling-gib", type=float, default=2.0)
    p.add_argument("--flush-mib", type=int, default=512, help="read before each repeat to evict caches")
    p.add_argument("--isa", type=lambda t: t.split(","), default=["auto"], help="kernel body(ies)")
    p.add_argument("--prefetch", type=ints, default=[1], help="kernel knob(s), blocks ahead")
    p.add_argument("--chunks-per-thread", type=ints, default=[4], help="kernel knob(s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hot", action="store_true", help="also print the kernel's rate on L2-resident KV")
    p.add_argument("--paths", type=lambda t: t.split(","), default=["openmp", "team"], help="openmp, team")
    p.add_argument("--fixed-calls", type=int, default=2000, help="empty calls per path for the fixed cost")
    p.add_argument("--team-pause-us", type=float, default=0.0,
                   help="how long the team's waiters hold the core before yielding (AttentionTeam pause_us)")
    p.add_argument("--operator", action="store_true",
                   help="also time a layer call of the hybrid operator's CPU step at the first context and budget, "
                        "attention on the team (as served) and on the OpenMP call")
    p.add_argument("--operator-layers", type=int, default=4)
    p.add_argument("--operator-steps", type=int, default=25, help="steps per path (alternating)")
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    ceiling = Ceiling(args.ceiling_gib, args.flush_mib, args.threads)
    group = args.q_heads // args.kv_heads
    rows = []
    teams: dict[tuple, AttentionTeam] = {}
    for ctx in args.contexts:
        batch = paged_batch(rng, [ctx], args.kv_heads, group, args.head_dim, poison=False)
        for budget in args.budgets:
            torch_s = None
            if not args.no_torch:
                _, torch_s, _ = time_calls(rng, batch, budget, args.torch_repeats, ceiling, lambda call:
                                        torch_sparse_partial_attention(*call, num_threads=args.threads))
            # the same scattered runs read with no arithmetic, by each path's threads: the ceiling
            # of this access pattern (a team's waiters and OpenMP's wake differently)
            scattered = {}
            for path in args.paths:
                read = (make_team(teams, args).scattered_read if path == "team"
                        else lambda *a: _stream.scattered_read(*a, args.threads))
                scattered[path] = time_calls(rng, batch, budget, args.repeats, ceiling, lambda a: read(*a),
                                             prepare=run_starts)[1]
            for path, isa, prefetch, chunks in itertools.product(args.paths, args.isa, args.prefetch,
                                                                  args.chunks_per_thread):
                scattered_s = scattered[path]
                if path == "team":
                    team = make_team(teams, args, isa, prefetch, chunks)
                    team.bind(batch.kv_pages, batch.seq_lens, batch.q.shape[1], 1 / np.sqrt(args.head_dim))
                    run = lambda call, team=team: team.attend(call[0], call[2], call[4], call[5])
                else:
                    run = lambda call, isa=isa, prefetch=prefetch, chunks=chunks: sparse_partial_attention(
                        *call, num_threads=args.threads, isa=isa, prefetch=prefetch, chunks_per_thread=chunks)
                nbytes, ours, near = time_calls(rng, batch, budget, args.repeats, ceiling, run)
                rows.append((ctx, budget, (path, isa, prefetch, chunks), nbytes, ours, near / 1e9, scattered_s,
                             torch_s))
        del batch

    fixed = fixed_costs(rng, args, group, make_team(teams, args))
    for team in teams.values():
        team.close()

    hot = {isa: hot_rate(rng, args, group, isa) for isa in args.isa} if args.hot else {}
    operator = operator_layer_calls(rng, args, group) if args.operator else {}

    cgb = ceiling.gbps
    print(f"cpu: {cpu_name()}, {os.cpu_count()} logical cpus; threads={args.threads}; "
          f"widest kernel body: {_attention.cpu_isa()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"layer: {args.kv_heads} KV heads, {args.q_heads} query heads, d={args.head_dim}, bf16 KV "
          f"paged in 16-token blocks, random block order; medians of {args.repeats} repeats "
          f"(torch: {args.torch_repeats}), caches flushed before each")
    print(f"DRAM read ceiling ({args.threads} threads, {args.ceiling_gib:g} GiB streaming read, "
          f"median of {len(ceiling.samples)}): {cgb:.1f} GB/s; each row's ratio uses the ceiling "
          f"sampled between that row's own repeats")
    print(f"fixed cost per layer call (empty selection, {args.kv_heads} KV heads, median of "
          f"{args.fixed_calls} back-to-back calls): " +
          ", ".join(f"{name} {sec * 1e6:.1f} us" for name, sec in fixed.items()))
    for isa, rate in hot.items():
        print(f"kernel ({isa}) on L2-resident KV, i.e. its compute ceiling ({args.threads} threads): "
              f"{rate:.1f} GB/s")
    print()
    knobs = len(args.isa) * len(args.prefetch) * len(args.chunks_per_thread) > 1
    head = "| context | budget | KV read MiB | path |" + (" isa | prefetch | chunks/thr |" if knobs else "")
    head += (" ours ms | ours GB/s | ceiling GB/s | ours/ceiling | scattered read GB/s | scattered/ceiling |"
             " ours/scattered | torch ms | torch GB/s | ours/torch |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for ctx, budget, knob, nbytes, ours, near, scattered_s, torch_s in rows:
        gb, sgb = nbytes / ours / 1e9, nbytes / scattered_s / 1e9
        line = f"| {ctx // 1024}k | {budget:.0%} | {nbytes / 2**20:.1f} |"
        line += f" {knob[0]} |" + ("".join(f" {k} |" for k in knob[1:]) if knobs else "")
        line += f" {ours * 1e3:.2f} | {gb:.1f} | {near:.1f} | {gb / near:.2f} | {sgb:.1f} | {sgb / near:.2f} | {gb / sgb:.2f} |"
        if torch_s is None:
            line += " - | - | - |"
        else:
            line += f" {torch_s * 1e3:.2f} | {nbytes / torch_s / 1e9:.1f} | {torch_s / ours:.1f}x |"
        print(line)
    paths = {}
    for ctx, budget, knob, _, ours, *_ in rows:
        paths.setdefault((ctx, budget, knob[1:]), {})[knob[0]] = ours
    pairs = [(key, t) for key, t in paths.items() if {"openmp", "team"} <= t.keys()]
    if pairs:
        # the decode worker's operator calls the team (bound once per step); the OpenMP call
        # is what it would pay per layer without it
        print()
        for (ctx, budget, knob), t in pairs:
            print(f"per layer call, {ctx // 1024}k at {budget:.0%}" + (f" {knob}" if knobs else "") +
                  f": openmp {t['openmp'] * 1e6:.0f} us, team {t['team'] * 1e6:.0f} us, "
                  f"openmp/team {t['openmp'] / t['team']:.2f}x")
    if operator:
        print(f"operator CPU step, per layer call ({args.contexts[0] // 1024}k at {args.budgets[0]:.0%}, "
              f"{args.operator_layers} layers, median of {args.operator_steps} steps per variant, in turn): "
              f"fixed_hybrid on OpenMP regions {operator['openmp'] * 1e6:.0f} us, on the team "
              f"{operator['team'] * 1e6:.0f} us (openmp/team {operator['openmp'] / operator['team']:.2f}x); "
              f"fluxion {operator['fluxion'] * 1e6:.0f} us, with token refinement (c=2) "
              f"{operator['fluxion+token_refine'] * 1e6:.0f} us "
              f"({operator['fluxion+token_refine'] / operator['fluxion']:.2f}x)")


if __name__ == "__main__":
    main()
