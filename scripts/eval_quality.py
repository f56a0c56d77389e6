"""Task accuracy and attention fidelity of the quality model under each decode attention policy.

For every task and context: exact-match accuracy under full attention, oracle top-k,
fixed-budget (5%) Quest and the Fluxion policy (when ``fluxion_dist.sparse`` is
present), plus per-head softmax-mass recall, output relative error against full
attention and the average fraction of the KV each policy read. Prints a markdown
table; writes ``quality_eval.json`` and ``quality_eval.png`` into ``--out``::

    python scripts/eval_quality.py --device cuda --contexts 8192 16384 32768 --samples 25 --out $OUT
    python scripts/eval_quality.py --contexts 512 --samples 2 --out /tmp/q   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from fluxion_dist.quality import report
from fluxion_dist.quality.harness import run_cells
from fluxion_dist.quality.model import SHIPPED_DIR, load_quality_model
from fluxion_dist.quality.policies import POLICY_NAMES, make_policies
from fluxion_dist.quality.tasks import TASKS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=SHIPPED_DIR, help="checkpoint directory (default: the shipped one)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--policies", nargs="+", choices=POLICY_NAMES, default=list(POLICY_NAMES))
    ap.add_argument("--samples", type=int, default=25, help="per task and context")
    ap.add_argument("--budget", type=float, default=0.05, help="fixed budget of oracle/quest; fluxion's cap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        # the fidelity numbers compare float32 attention outputs: no TF32 rounding in them
        torch.backends.cuda.matmul.allow_tf32 = False
    model = load_quality_model(args.model).to(device)
    policies = make_policies(args.policies, args.budget)
    meta = {"model": str(args.model), "contexts": args.contexts, "samples": args.samples,
            "budget": args.budget, "seed": args.seed, "policies": [p.name for p in policies],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cells = []
    # results are written after every context, so a run cut short still leaves its numbers
    for context in args.contexts:
        cells += run_cells(model, policies, args.tasks, [context], args.samples, args.seed, device,
                           progress=lambda line: print(line, flush=True))
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        report.write_json(args.out / "quality_eval.json", cells, meta)
        drawn = report.plot(args.out / "quality_eval.png", cells)
        print("\n" + report.markdown_table(cells) + "\n", flush=True)
    print(f"\nwrote {args.out / 'quality_eval.json'}"
          + (", quality_eval.png" if drawn else " (no plot: matplotlib is not installed)")
          + f" in {meta['seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
