"""scripts/bench_e2e.py --smoke runs every path (dense runner, each host-KV policy, TTFT with the
host-store write and, where ucxx is installed, the UCX push to a loopback decode store, the
HBM-limit search) on the CPU and prints every row of its table."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAS_UCXX = importlib.util.find_spec("ucxx") is not None


def test_bench_e2e_smoke_prints_every_row():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_e2e.py"), "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    num = r"[0-9]+\.[0-9]+"
    for pattern in (r"^machine: GPU .*; CPU .*; host RAM \d+ GiB$",
                    rf"^TTFT prompt=300: compute {num} ms \| \+ D2H \+ host store {num} ms \(x{num}\) \| \+ UCX push "
                    rf"to a loopback decode store, layer-pipelined: " + (rf"{num} ms \(x{num}\)$" if HAS_UCXX
                                                                        else "not measured: ucxx missing$"),
                    *(rf"^TPOT ctx=200 B={b} {p} \| {num} \| {num} \| {num} \| {num}"
                      for b in (1, 2) for p in ("dense_hbm", "fluxion", "quest_gpu", "fixed_hybrid")),
                    rf"^ratio ctx=200 B=1: fluxion/dense_hbm {num}, .*quest_gpu/fluxion {num}, fixed_hybrid/fluxion {num}$",
                    r"^host RAM: \d+ GiB holds \d+ requests of 200 tokens",
                    r"^HBM limit 1 GiB \(emulated",
                    rf"^HBM limit ctx=200 dense_hbm: largest batch [1-9]\d*, {num} tokens/s$",
                    rf"^HBM limit ctx=200 fluxion: largest batch [1-9]\d* .*, {num} tokens/s$"):
        assert re.search(pattern, text, re.M), f"no row matching {pattern!r} in:\n{text}"
    budgets = [float(x) for x in re.findall(r"budget used ([0-9.]+)", text)]
    assert budgets and all(0 < b <= 1 for b in budgets)
