"""What the end-to-end benchmark states about its machine: CPU, host RAM, GPU, and the HBM and
host-to-device bandwidths it measures (the floors of each row are bytes over these)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

GIB = 1 << 30


def machine(gpu: bool) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "unknown")
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = {"cpu": f"{cpu} x{os.cpu_count()}", "host_ram": host, "gpu": "none", "hbm_bw": None, "h2d_bw": None}
    if gpu:
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = f"{p.name} ({p.total_memory / GIB:.0f} GiB)"
        out["hbm_total"] = p.total_memory
        a = torch.empty(2 * GIB // 2, dtype=torch.int16, device="cuda")
        b = torch.empty_like(a)
        out["hbm_bw"] = 2 * a.nbytes / _time_gpu(lambda: b.copy_(a), 10)  # read + write
        del a, b
        h = torch.empty(GIB // 2, dtype=torch.int16, pin_memory=True)
        d = torch.empty(h.shape, dtype=torch.int16, device="cuda")
        out["h2d_bw"] = h.nbytes / _time_gpu(lambda: d.copy_(h, non_blocking=True), 5)
        del h, d
    return out


def _time_gpu(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps
