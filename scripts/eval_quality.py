"""Task accuracy and attention fidelity of the quality model under each decode attention policy.

The deployment policies (``--policies``: any of fluxion_dist.policy.POLICIES) decode through
the production operator, ``HybridAttention`` (the GPU pipeline on a GPU, the CPU path
elsewhere), under the deployment's ``sparse`` settings: ``--budget`` is ``sparse.budget``
(fluxion's average), ``--sparse KEY=VALUE`` overrides any other SparseConfig field, so one run
can compare switches. ``oracle_topk`` (the harness's oracle: top-k by the true mass at the
budget) runs on the harness's own hook. For every task and context: exact-match accuracy,
softmax-mass recall and output relative error of what each policy attended (overall and per
layer) and the fraction of the KV it read. Prints the markdown tables; writes
``quality_eval.json`` and ``quality_eval.png`` into ``--out`` after every context::

    python scripts/eval_quality.py --device cuda --contexts 8192 12288 16384 32768 --samples 40 --out $OUT
    python scripts/eval_quality.py --contexts 512 --samples 2 --out /tmp/q   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from fluxion_dist.hybrid import calibrate  # noqa: E402
from fluxion_dist.quality import report  # noqa: E402
from fluxion_dist.quality.harness import OperatorPolicy, deployment_sparse, make_runners, parse_overrides, run_cells  # noqa: E402
from fluxion_dist.quality.model import SHIPPED_DIR, load_quality_model  # noqa: E402
from fluxion_dist.quality.operator_decode import attention_dtype_note  # noqa: E402
from fluxion_dist.quality.policies import DEFAULT_POLICIES, check_policy_names, label  # noqa: E402
from fluxion_dist.quality.tasks import ALL_TASKS, TaskSuite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=SHIPPED_DIR, help="checkpoint directory (default: the shipped one)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--tasks", nargs="+", choices=ALL_TASKS, default=None,
                    help="default: every task the model reads (word tasks for v1, RULER tasks for a BPE model)")
    ap.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES),
                    help="deployment policies (fluxion_dist.policy.POLICIES), each optionally with SparseConfig "
                    "fields of its own (POLICY:KEY=VALUE[,KEY=VALUE], e.g. fluxion:token_refine_factor=2, "
                    "to compare a switch on and off in one run), and/or the oracle oracle_topk")
    ap.add_argument("--samples", type=int, default=40, help="per task and context")
    ap.add_argument("--budget", type=float, default=0.05,
                    help="sparse.budget: the fixed policies' and the oracle's fraction, fluxion's average")
    ap.add_argument("--sparse", action="append", default=[], metavar="KEY=VALUE",
                    help="override a SparseConfig field (repeatable), e.g. --sparse recent_tokens=256")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    ap.add_argument("--operator-device", choices=("auto", "cpu", "gpu"), default="auto",
                    help="HybridOptions.device: auto is the GPU pipeline where a GPU runs kernels")
    ap.add_argument("--cpu-threads", type=int, default=None, help="the CPU path's threads (default: sparse.cpu_threads, "
                    "0 there meaning all cores)")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args(argv)
    try:
        names = check_policy_names(args.policies)
        overrides = parse_overrides(args.sparse)
        sparse = deployment_sparse(args.budget, overrides)
    except ValueError as e:
        ap.error(str(e))
    suite = TaskSuite.for_model(args.model)
    tasks = args.tasks or list(suite.tasks)
    if any(t not in suite.tasks for t in tasks):
        ap.error(f"--tasks {[t for t in tasks if t not in suite.tasks]}: not tasks {args.model} reads; "
                 f"its tasks: {', '.join(suite.tasks)}")

    device = torch.device(args.device)
    if device.type == "cuda":
        # the fidelity numbers compare float32 attention outputs: no TF32 rounding in them
        torch.backends.cuda.matmul.allow_tf32 = False
    model = load_quality_model(args.model).to(device)
    arch = model.arch
    threads = args.cpu_threads or sparse.cpu_threads or None
    t0 = time.perf_counter()
    # one calibration for the run, as a decode worker does at start-up
    cost = calibrate(arch.head_dim, arch.num_key_value_heads, arch.gqa_group,
                     num_threads=threads or torch.get_num_threads(), gpu=args.operator_device != "cpu")
    runners = make_runners(model, names, sparse, cost, max_tokens=max(args.contexts), compute=device,
                           device=args.operator_device, cpu_threads=threads)
    op_device = next((r.runner.op.device for r in runners if isinstance(r, OperatorPolicy)), None)
    meta = {"model": str(args.model), "tasks": tasks, "contexts": args.contexts, "samples": args.samples, "seed": args.seed,
            "budget": args.budget, "sparse_overrides": overrides, "sparse": dataclasses.asdict(sparse),
            "policies": [label(n) for n in names], "operator_device": op_device,
            "cost_model": {**dataclasses.asdict(cost), "source": "calibrate", "seconds": round(time.perf_counter() - t0, 2)},
            "fidelity_arithmetic": attention_dtype_note(device),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cells = []
    drawn = False
    try:
        # results are written after every context, so a run cut short still leaves its numbers
        for context in args.contexts:
            cells += run_cells(model, runners, tasks, [context], args.samples, args.seed, device,
                               progress=lambda line: print(line, flush=True), suite=suite)
            meta["seconds"] = round(time.perf_counter() - t0, 1)
            report.write_json(args.out / "quality_eval.json", cells, meta)
            drawn = report.plot(args.out / "quality_eval.png", cells)
            print("\n" + report.markdown_table(cells) + "\n\n" + report.layer_table(cells) + "\n", flush=True)
    finally:
        for r in runners:
            r.close()
    print(f"\nwrote {args.out / 'quality_eval.json'}"
          + (", quality_eval.png" if drawn else " (no plot: matplotlib is not installed)")
          + f" in {meta['seconds']:.0f}s (operator on {op_device})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
