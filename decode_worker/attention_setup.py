"""The decode attention operator a deployment asks for, over the decode node's host KV arena."""

from __future__ import annotations

import os

from fluxion_dist.config import DeployConfig
from fluxion_dist.hybrid import CostModel, HostArena, HybridAttention, HybridOptions, calibrate
from fluxion_dist.model.arch import ModelArch


def cpu_threads(cfg: DeployConfig) -> int:
    # Ray sets OMP_NUM_THREADS to the actor's CPUs; cpu_threads 0 means all of them.
    return cfg.decode.sparse.cpu_threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def build_attention(cfg: DeployConfig, arch: ModelArch, arena: HostArena,
                    cost: CostModel | None = None) -> HybridAttention:
    """The deployment's operator. Calibrates the cost model on this node (the CPU path here; UVA
    and cache rates on a GPU) unless ``cost`` was measured already (a benchmark's rows share one)."""
    threads = cpu_threads(cfg)
    on_gpu = cfg.decode.num_gpus > 0
    if cost is None:
        cost = calibrate(arch.head_dim, arch.num_key_value_heads, arch.gqa_group, num_threads=threads, gpu=on_gpu)
    # decode.enforce_eager turns off the operator's per-layer CUDA graphs too: every launch eager
    options = HybridOptions(num_layers=arch.num_hidden_layers, cpu_threads=threads,
                            device="gpu" if on_gpu else "cpu", cuda_graphs=not cfg.decode.enforce_eager)
    return HybridAttention(arena, cfg.decode.sparse, cost, options)
