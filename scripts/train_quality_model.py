"""Train the quality model (``fluxion_dist.quality.model``) on the synthetic long-context tasks.

Two phases, both measured in *training time*, not steps, so a run ends on schedule
whatever the device's speed and a run split over several calls resumes exactly:

1. short contexts (``--short``, 128 tokens) until the lookup circuit has formed:
   retrieval accuracy at or above ``--gate`` on a log window, or ``--gate-cap`` of
   the budget. Lengthening the context before that only dilutes the few useful
   attention paths, and the model stalls at predicting a uniform number (seen on
   the H100: two runs that ramped by the clock alone learnt nothing).
2. a ramp to 16k over the rest of the budget (``--stages``, fractions of that rest);
   later stages alternate with a shorter shape so shorter contexts are not forgotten.

The learning rate follows a cosine over the whole budget::

    # one H100 call: ~7 minutes of training, then the shippable bf16 export
    python scripts/train_quality_model.py --out $OUT --budget-minutes 7 --export $OUT/model
    # a CPU smoke run in seconds
    python scripts/train_quality_model.py --out /tmp/q --arch tiny --budget-minutes 0.2 \\
        --short 128x8 --gate-cap 0.5 --stages "0:256x4" --log-every 2

Each call checkpoints every ``--save-every`` steps and on exit (``--call-minutes``),
and a later call with the same ``--out`` resumes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fluxion_dist.quality.model import QUALITY_ARCH, TINY_QUALITY_ARCH, export_model, init_model
from fluxion_dist.quality.tasks import TRAIN_TASKS, make_sample, training_queries
from fluxion_dist.quality.train_checkpoint import (TrainerState, has_checkpoint, load_checkpoint,
                                                   save_checkpoint)
from fluxion_dist.quality.train_forward import answer_loss

DEFAULT_STAGES = ("0:256x128;0.05:512x64;0.12:1024x64;0.22:2048x32;0.34:4096x16,2048x32;"
                  "0.5:8192x8,4096x16;0.68:16384x4,8192x8")
# rows of a batch cycle through this: the copy task and multi-key retrieval twice, since
# they carry the shared lookup; var tracking twice, for its longer answers
CYCLE = ("copy", "kv_retrieval", "passkey", "var_tracking", "copy", "kv_retrieval", "aggregation", "var_tracking")
GATED = ("kv_retrieval", "passkey")
_SHORT = {"kv_retrieval": "kv", "passkey": "pk", "var_tracking": "vt", "aggregation": "agg", "copy": "copy"}


def parse_shape(spec: str) -> tuple[int, int]:
    length, batch = spec.split("x")
    return int(length), int(batch)


def parse_stages(spec: str) -> list[tuple[float, list[tuple[int, int]]]]:
    stages = [(float(start), [parse_shape(s) for s in shapes.split(",")])
              for start, shapes in (part.split(":") for part in spec.split(";"))]
    if stages[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(stages, stages[1:])):
        raise SystemExit(f"--stages must start at 0 and increase: {spec!r}")
    return stages


def shape_at(short: tuple[int, int], stages, gate_seconds: float | None, trained: float, budget: float,
             step: int) -> tuple[int, int]:
    if gate_seconds is None:
        return short
    rest = (trained - gate_seconds) / max(budget - gate_seconds, 1e-9)
    shapes = [s for start, s in stages if start <= rest][-1]
    return shapes[step % len(shapes)]


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, lr: float, fused: bool) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=fused)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="run directory; its checkpoint/ is resumed if present "
                    "(and is a model directory: config.json + model.safetensors)")
    ap.add_argument("--arch", choices=("quality", "tiny"), default="quality")
    ap.add_argument("--budget-minutes", type=float, default=7.0, help="training time of the whole run")
    ap.add_argument("--call-minutes", type=float, default=9.0, help="stop (and checkpoint) after this long")
    ap.add_argument("--short", type=parse_shape, default=(128, 256), help="phase 1 shape, LENGTHxBATCH")
    ap.add_argument("--gate", type=float, default=0.9, help=f"phase 1 ends at this accuracy on {GATED}")
    ap.add_argument("--gate-cap", type=float, default=0.35, help="... or at this fraction of the budget")
    ap.add_argument("--stages", default=DEFAULT_STAGES, help="phase 2: START:LxB[,LxB];... (START: fraction)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=2000)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--export", type=Path, help="write the shippable model here once the budget is spent")
    args = ap.parse_args(argv)

    t_call = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    stages = parse_stages(args.stages)
    ckpt = args.out / "checkpoint"
    factory = lambda m: make_optimizer(m, args.lr, cuda)  # noqa: E731
    if has_checkpoint(ckpt):
        model, opt, state = load_checkpoint(ckpt, factory, device)
        print(f"resumed {ckpt} at step {state.step}, {state.train_seconds:.0f}s trained", flush=True)
    else:
        arch = QUALITY_ARCH if args.arch == "quality" else TINY_QUALITY_ARCH
        model = init_model(arch, args.seed).to(device).train()
        opt = factory(model)
        state = TrainerState(0, 0.0, args.seed, args.budget_minutes * 60, None)
        print(f"new model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{arch.num_hidden_layers} layers, {arch.num_attention_heads}q/{arch.num_key_value_heads}kv "
              f"heads of {arch.head_dim}", flush=True)
    step, trained, gate_at = state.step, state.train_seconds, state.gate_seconds
    budget = args.budget_minutes * 60  # may differ from the stored one: a run can be extended
    tally = torch.zeros(len(TRAIN_TASKS), 2, dtype=torch.long, device=device)
    loss_sum, loss_n, tokens = torch.zeros((), device=device), 0, 0
    t_log = time.perf_counter()

    def checkpoint() -> None:
        save_checkpoint(ckpt, model, opt, TrainerState(step, trained, state.seed, budget, gate_at))

    while trained < budget and time.perf_counter() - t_call < args.call_minutes * 60:
        t0 = time.perf_counter()
        if gate_at is None and trained >= args.gate_cap * budget:
            gate_at = trained
            print(f"phase 2 at step {step} by the clock: the gate was not reached", flush=True)
        length, batch = shape_at(args.short, stages, gate_at, trained, budget, step)
        rng = np.random.default_rng([state.seed, step])
        tasks = [CYCLE[(step + i) % len(CYCLE)] for i in range(batch)]
        samples = [make_sample(t, rng, length, queries=training_queries(t), vary=True) for t in tasks]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, trained / budget, args.lr, args.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            res = answer_loss(model, samples, device)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += length * batch
        loss_sum += res.loss.detach()
        loss_n += 1
        # per-task tallies stay on the device: no sync until the log line
        task_ids = torch.tensor([TRAIN_TASKS.index(t) for t in res.span_task], device=device)
        tally.index_add_(0, task_ids, torch.stack([res.span_correct.long(), torch.ones_like(task_ids)], 1))
        trained += time.perf_counter() - t0
        if step % args.log_every == 0:
            counts = tally.tolist()
            dt = time.perf_counter() - t_log
            acc = {t: c / n if n else float("nan") for t, (c, n) in zip(TRAIN_TASKS, counts)}
            # the shapes of the current stage (they alternate step by step)
            shapes = ",".join(f"{ln}x{b}" for ln, b in dict.fromkeys(
                shape_at(args.short, stages, gate_at, trained, budget, s) for s in (step, step + 1)))
            print(f"step {step:5d} | {100 * trained / budget:5.1f}% | len {shapes:>16s} | "
                  f"loss {float(loss_sum) / loss_n:.4f} | acc "
                  + " ".join(f"{_SHORT[t]} {a:.2f}" for t, a in acc.items())
                  + f" | {tokens / dt / 1e3:5.0f}k tok/s | lr {opt.param_groups[0]['lr']:.1e} | "
                  f"{time.perf_counter() - t_call:4.0f}s", flush=True)
            if gate_at is None and all(acc[t] >= args.gate for t in GATED):
                gate_at = trained
                print(f"phase 2 at step {step}: {GATED} reached {args.gate}", flush=True)
            tally.zero_()
            loss_sum, loss_n, tokens = torch.zeros((), device=device), 0, 0
            t_log = time.perf_counter()
        if step % args.save_every == 0:
            checkpoint()
    checkpoint()
    done = trained >= budget
    print(f"{'finished' if done else 'paused'} at step {step}: {trained:.0f}s of {budget:.0f}s trained, "
          f"checkpoint in {ckpt}", flush=True)
    if done and args.export is not None:
        export_model(model, args.export)
        print(f"exported the model to {args.export}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
