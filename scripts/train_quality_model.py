"""Train the v2 quality model (``quality.model.TEXT_ARCH``) on natural text with the RULER tasks.

The loss is next-token cross-entropy over the samples (corpus haystacks with facts
spliced in): the mean over the answer tokens (each ending in ``<eoa>``) makes
``--answer-share`` of it, rising to ``--answer-share-end`` by the end of the budget, and
the mean over the text the rest. The haystacks are recombined passages with words
replaced (``quality.train_haystack``), so the text cannot be learnt by heart; the text
loss on held-out paragraphs is logged beside the loss on trained ones (``text seen /
held-out``). Tasks start easy (codes of one or two digits, one-letter variable names,
variable tracking at one hop) and grow a step each time the code tasks (``GATED``) reach
``--level-gate`` at the current sizes: an answer is copied a token a digit, and the copy
only forms while codes are short, so the sizes wait for it; they are full by ``--ramp``
of the budget at the latest. Variable tracking's sizes (names of one to three letters,
chains of one hop to four, its codes) follow a level of their own, earned the same way by
its own accuracy, and full by ``--vt-ramp``: its lookup forms later than the needles', and
not at all once its names and chains are long (docs/benchmarks.md). Two phases, measured in *training time*, so a run ends on
schedule whatever the device's speed and one split over calls resumes exactly:

1. short contexts (``--short``) until retrieval has formed: teacher-forced accuracy
   on ``GATED`` at or above ``--gate`` on a log window at full task sizes, or
   ``--gate-cap`` of the budget.
   Lengthening the context first only dilutes the few useful attention paths.
2. a curriculum to 32k over the rest of the budget (``--stages``, fractions of that
   rest); later stages alternate with a shorter shape so short contexts stay learnt.

The learning rate follows a cosine over the whole budget. Each call checkpoints every
``--save-minutes`` and on exit (``--call-minutes``); the checkpoint directory
``OUT/checkpoint`` is a complete model directory (config.json, bf16 model.safetensors,
tokenizer.json) that ``quality.model.load_quality_model`` and the serving loader read,
and a later call with the same ``--out`` resumes it::

    # one H200 call of a 25-minute run (three calls in all)
    python scripts/train_quality_model.py --out $OUT --budget-minutes 25 --call-minutes 8.5
    # a CPU smoke run: a tiny model, a few steps; a second call resumes its step count
    python scripts/train_quality_model.py --smoke --out /tmp/q
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from fluxion_dist.quality.corpus import CORPUS_DIR  # noqa: E402
from fluxion_dist.quality.model import TEXT_ARCH, TINY_TEXT_ARCH, export_model, init_model, write_text_tokenizer  # noqa: E402
from fluxion_dist.quality.ruler_tasks import RULER_TASKS  # noqa: E402
from fluxion_dist.quality.text_vocab import load_text_vocab  # noqa: E402
from fluxion_dist.quality.train_batches import OWN_LEVEL_TASK, BatchMaker  # noqa: E402
from fluxion_dist.quality.train_checkpoint import (TrainerState, has_checkpoint, load_checkpoint,  # noqa: E402
                                                   save_checkpoint)
from fluxion_dist.quality.train_forward import lm_loss, text_loss  # noqa: E402
from fluxion_dist.quality.train_haystack import HaystackMix, text_windows  # noqa: E402

DEFAULT_STAGES = ("0:1024x128;0.08:2048x64;0.18:4096x32;0.32:8192x16,4096x32;"
                  "0.5:16384x8,8192x16;0.72:32768x4,16384x8")
SMOKE = dict(arch="tiny", device="cpu", short=(512, 4), stages="0:512x4", budget_minutes=60.0, call_steps=3,
             log_every=1, gate_cap=0.5, workers=0, warmup=2)
GATED = ("niah_single", "niah_multikey")
_SHORT = {"niah_single": "s1", "niah_multikey": "mk", "niah_multivalue": "mv", "niah_multiquery": "mq",
          "vt_chains": "vt", "cwe": "cwe", "fwe": "fwe", "qa_facts": "qa"}


def parse_shape(spec: str) -> tuple[int, int]:
    length, batch = spec.split("x")
    return int(length), int(batch)


def parse_stages(spec: str) -> list[tuple[float, list[tuple[int, int]]]]:
    stages = [(float(start), [parse_shape(s) for s in shapes.split(",")])
              for start, shapes in (part.split(":") for part in spec.split(";"))]
    if stages[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(stages, stages[1:])):
        raise SystemExit(f"--stages must start at 0 and increase: {spec!r}")
    return stages


LEVEL_STEPS = 3  # earned levels are thirds: a digit more per code (``ruler_tasks.code_digits``) each


def level_at(trained: float, budget: float, ramp: float, earned: float = 0.0) -> float:
    """The tasks' curriculum level, 0 to 1: the ``earned`` one, or where a ramp over the
    first ``ramp`` of the budget has got to if that is further (in twentieths, so batches
    made ahead at a slightly earlier time are the same)."""
    floor = 1.0 if ramp <= 0 else min(1.0, round(20 * trained / (ramp * budget)) / 20)
    return max(earned, floor)


def next_level(level: float) -> float:
    """The earned level after ``level``: its next third."""
    return min(1.0, (math.floor(level * LEVEL_STEPS + 1e-9) + 1) / LEVEL_STEPS)


def share_at(progress: float, start: float, end: float) -> float:
    return start + (end - start) * min(max(progress, 0.0), 1.0)


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="run directory; its checkpoint/ is resumed if present")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 3 steps a call: " + str(SMOKE))
    ap.add_argument("--arch", choices=("text", "tiny"), default="text")
    ap.add_argument("--tokenizer", type=Path, default=CORPUS_DIR, help="directory of the BPE tokenizer.json")
    ap.add_argument("--budget-minutes", type=float, default=25.0, help="training time of the whole run")
    ap.add_argument("--call-minutes", type=float, default=9.0, help="stop (and checkpoint) after this long")
    ap.add_argument("--call-steps", type=int, default=0, help="... or after this many steps (0: no limit)")
    ap.add_argument("--short", type=parse_shape, default=(1024, 128), help="phase 1 shape, LENGTHxBATCH")
    ap.add_argument("--gate", type=float, default=0.9, help=f"phase 1 ends at this accuracy on {GATED}")
    ap.add_argument("--gate-cap", type=float, default=0.4,
                    help="... or at this fraction of the budget (the gate reads full-size tasks only)")
    ap.add_argument("--stages", default=DEFAULT_STAGES, help="phase 2: START:LxB[,LxB];... (START: fraction)")
    ap.add_argument("--answer-share", type=float, default=0.5, help="share of the loss on answer tokens at the start")
    ap.add_argument("--answer-share-end", type=float, default=0.75, help="... at the end of the budget (linear)")
    ap.add_argument("--level-gate", type=float, default=0.5,
                    help=f"accuracy on {GATED} at the current task sizes that earns the next curriculum level")
    ap.add_argument("--ramp", type=float, default=0.6,
                    help="fraction of the budget by which tasks reach full size whatever they earned")
    ap.add_argument("--vt-ramp", type=float, default=0.85,
                    help=f"... the same for {OWN_LEVEL_TASK}, whose level its own accuracy earns")
    ap.add_argument("--haystack", choices=("mixed", "span"), default="mixed",
                    help="training haystacks: recombined passages with words replaced, or plain corpus spans")
    ap.add_argument("--eval-minutes", type=float, default=2.0, help="text loss on seen/held-out paragraphs this often")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-minutes", type=float, default=3.0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 2)),
                    help="processes making batches ahead (0: in the training loop)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--export", type=Path, help="also write the shippable model here once the budget is spent")
    args = ap.parse_args(argv)
    for name in ("answer_share", "answer_share_end"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            ap.error(f"--{name.replace('_', '-')} must be in [0, 1]; got {getattr(args, name)}")
    if args.smoke:
        given = {a.dest for a in ap._actions if f"--{a.dest.replace('_', '-')}" in (argv or sys.argv[1:])}
        for k, v in SMOKE.items():
            if k not in given:
                setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_call = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    stages = parse_stages(args.stages)
    ckpt = args.out / "checkpoint"
    factory = lambda m: make_optimizer(m, args.lr, cuda)  # noqa: E731
    if has_checkpoint(ckpt):
        model, opt, state = load_checkpoint(ckpt, factory, device)
        tokenizer_dir = ckpt  # the run keeps the tokenizer it started with
        print(f"resumed {ckpt} at step {state.step}, {state.train_seconds:.0f}s trained", flush=True)
    else:
        arch = TEXT_ARCH if args.arch == "text" else TINY_TEXT_ARCH
        model = init_model(arch, args.seed).to(device).train()
        opt = factory(model)
        state = TrainerState(0, 0.0, args.seed, args.budget_minutes * 60, None)
        tokenizer_dir = args.tokenizer
        n = sum(p.numel() for p in model.parameters())
        print(f"new model: {n / 1e6:.2f}M parameters ({2 * n / 2**20:.1f} MiB in bf16), "
              f"{arch.num_hidden_layers} layers, {arch.num_attention_heads}q/{arch.num_key_value_heads}kv "
              f"heads of {arch.head_dim}, d_model {arch.hidden_size}, rope theta {arch.rope_theta:g}", flush=True)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    step, trained, gate_at, earned = state.step, state.train_seconds, state.gate_seconds, state.level
    earned_vt = state.vt_level
    budget = args.budget_minutes * 60  # may differ from the stored one: a run can be extended
    tv = load_text_vocab(tokenizer_dir)
    maker = BatchMaker(tokenizer_dir, state.seed, args.workers,
                       mix=HaystackMix() if args.haystack == "mixed" else None)
    win = min(args.short[0], 1024)
    windows = {k: torch.from_numpy(text_windows(tv, heldout=k == "held-out", length=win, count=8)).to(device)
               for k in ("seen", "held-out")}
    n_tasks = len(RULER_TASKS)
    tally = torch.zeros(n_tasks, 3, device=device)  # correct, answers, answer-loss sum
    loss_sum, lm_sum, loss_n, tokens = torch.zeros((), device=device), torch.zeros((), device=device), 0, 0
    t_log = t_save = t_eval = time.perf_counter()

    def text_eval() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            got = {k: text_loss(model, w) for k, w in windows.items()}
        print(f"text loss at step {step}: seen {got['seen']:.3f} held-out {got['held-out']:.3f} "
              f"(gap {got['held-out'] - got['seen']:+.3f}; {win}-token windows of plain paragraphs)", flush=True)

    def checkpoint() -> None:
        save_checkpoint(ckpt, model, opt, TrainerState(step, trained, state.seed, budget, gate_at, earned, earned_vt))
        write_text_tokenizer(ckpt, tokenizer_dir)

    def spec_of(s: int) -> tuple[int, int, float, float]:
        return (*shape_at(args.short, stages, gate_at, trained, budget, s),
                level_at(trained, budget, args.ramp, earned), level_at(trained, budget, args.vt_ramp, earned_vt))

    calls_steps = 0
    try:
        while (trained < budget and time.perf_counter() - t_call < args.call_minutes * 60
               and (args.call_steps == 0 or calls_steps < args.call_steps)):
            (length, batch, level, vt_level), samples = maker.get(step, spec_of)
            t0 = time.perf_counter()
            if gate_at is None and trained >= args.gate_cap * budget:
                gate_at = trained
                print(f"phase 2 at step {step} by the clock: the gate was not reached", flush=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, trained / budget, args.lr, args.warmup)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                share = share_at(trained / budget, args.answer_share, args.answer_share_end)
                res = lm_loss(model, samples, device, share)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            calls_steps += 1
            tokens += length * batch
            loss_sum += res.loss.detach()
            lm_sum += res.lm_loss
            loss_n += 1
            # per-task tallies stay on the device: no sync until the log line
            ids = torch.tensor([RULER_TASKS.index(t) for t in res.span_task], device=device)
            tally.index_add_(0, ids, torch.stack([res.span_correct.float(), torch.ones_like(res.span_loss),
                                                  res.span_loss], 1))
            if cuda:
                torch.cuda.synchronize()  # the step's time, not its launch
            trained += time.perf_counter() - t0
            if step % args.log_every == 0:
                rows = tally.tolist()
                dt = time.perf_counter() - t_log
                acc = {t: c / n if n else float("nan") for t, (c, n, _) in zip(RULER_TASKS, rows)}
                aloss = {t: s / n if n else float("nan") for t, (_, n, s) in zip(RULER_TASKS, rows)}
                print(f"step {step:5d} | {100 * trained / budget:5.1f}% | len {length:5d}x{batch:<3d} | "
                      f"loss {float(loss_sum) / loss_n:.3f} lm {float(lm_sum) / loss_n:.3f} | "
                      + " ".join(f"{_SHORT[t]} {acc[t]:.2f}/{aloss[t]:.2f}" for t in RULER_TASKS)
                      + f" | {tokens / dt / 1e3:5.0f}k tok/s | lr {opt.param_groups[0]['lr']:.1e} | lv {level:.2f} "
                      f"vt {vt_level:.2f} | "
                      f"{time.perf_counter() - t_call:4.0f}s", flush=True)
                # short codes are no evidence: the gate opens on full-size tasks only
                if gate_at is None and level >= 1.0 and all(acc[t] >= args.gate for t in GATED):
                    gate_at = trained
                    print(f"phase 2 at step {step}: {GATED} reached {args.gate}", flush=True)
                if level < 1.0 and all(acc[t] >= args.level_gate for t in GATED):
                    earned = next_level(level)
                    print(f"curriculum level {earned:.2f} at step {step}: {GATED} reached {args.level_gate}",
                          flush=True)
                if vt_level < 1.0 and acc[OWN_LEVEL_TASK] >= args.level_gate:
                    earned_vt = next_level(vt_level)
                    print(f"{OWN_LEVEL_TASK} level {earned_vt:.2f} at step {step}: its accuracy reached {args.level_gate}",
                          flush=True)
                tally.zero_()
                loss_sum, lm_sum, loss_n, tokens = (torch.zeros((), device=device), torch.zeros((), device=device),
                                                    0, 0)
                t_log = time.perf_counter()
            if time.perf_counter() - t_eval > args.eval_minutes * 60:
                text_eval()
                t_eval = time.perf_counter()
            if time.perf_counter() - t_save > args.save_minutes * 60:
                checkpoint()
                t_save = time.perf_counter()
    finally:
        maker.close()
    text_eval()
    checkpoint()
    done = trained >= budget
    print(f"{'finished' if done else 'paused'} at step {step}: {trained:.0f}s of {budget:.0f}s trained, "
          f"checkpoint (a model directory) in {ckpt}", flush=True)
    if done and args.export is not None:
        export_model(model, args.export, tokenizer_dir)
        print(f"exported the model to {args.export}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
