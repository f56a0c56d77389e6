"""OpenMP's settings for a process that runs the CPU path, applied before anything loads libgomp.

libgomp's idle threads spin for up to milliseconds after each parallel region. On a decode
worker the persistent attention team (``team``) runs right after the selection's OpenMP region,
on the same cores, and waited behind those spinners: on a 16-core host a 5% layer call took
3.5-4 ms instead of 0.05-0.13 ms (docs/benchmarks.md, CPU path). libgomp reads its settings once,
when it loads (``import torch`` already loads it), so they are set in the process's environment:
the decode and prefill actors' (``server.ray_cluster.worker_env``) and the benchmarks' (before
their imports). A setting of the user's own wins.
"""

from __future__ import annotations

import os

WAIT_POLICY = "PASSIVE"


def omp_env() -> dict[str, str]:
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", WAIT_POLICY)}


def apply() -> None:
    """Into this process's environment; effective only before libgomp loads."""
    os.environ.update(omp_env())
