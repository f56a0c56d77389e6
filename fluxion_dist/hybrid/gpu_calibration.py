"""GPU rates for the cost model, measured with the real kernels at start-up.

Three numbers and a fixed cost, each from two selection sizes (a line through them, so
launch overheads do not masquerade as bandwidth): attention reading the host arena
through UVA, attention reading the block-cache pool in HBM, and the cache's copy-in
gather. Imports CuPy: call only where ``kernels.device.gpu_unavailable_reason()`` is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cupy as cp
import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.kernels.attention import sparse_partial_attention
from fluxion_dist.kernels.uva import pinned_empty


@dataclass(frozen=True, slots=True)
class GpuRates:
    uva_bytes_per_s: float
    cached_bytes_per_s: float
    copy_bytes_per_s: float
    overhead_s: float  # fixed cost of one attention launch + merge


def _time(fn, repeats: int = 5) -> float:
    stream = cp.cuda.get_current_stream()
    fn()
    stream.synchronize()
    best = math.inf
    for _ in range(repeats):
        start = stream.record()
        fn()
        end = stream.record()
        end.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, end) / 1e3)
    return best


def _line(bytes_small: float, t_small: float, bytes_big: float, t_big: float) -> tuple[float, float]:
    """``(bytes_per_s, fixed_s)`` of ``t = fixed + bytes / rate``."""
    rate = (bytes_big - bytes_small) / max(t_big - t_small, 1e-9)
    return rate, max(t_small - bytes_small / rate, 0.0)


def measure_gpu(head_dim: int, num_kv_heads: int, group: int, *, blocks_per_row: int = 2048,
                seed: int = 0) -> GpuRates:
    nb, hkv, d = blocks_per_row, num_kv_heads, head_dim
    host, arena = pinned_empty((nb, hkv, 2, BLOCK_TOKENS, d), np.uint16)
    rng = np.random.default_rng(seed)
    # random bf16 in [-2, 2): sign/exponent bits of small normals, never NaN/inf
    host[...] = (rng.integers(0x3C00, 0x4000, size=host.shape) | (rng.integers(0, 2, size=host.shape) << 15)
                 ).astype(np.uint16)
    pool = cp.ascontiguousarray(cp.asarray(host).transpose(1, 0, 2, 3, 4)).reshape(hkv * nb, 2, BLOCK_TOKENS, d)
    q = cp.asarray(rng.standard_normal((1, hkv * group, d)).astype(np.float32))
    tables = cp.arange(nb, dtype=cp.int32)[None]
    lens = cp.asarray(np.array([nb * BLOCK_TOKENS], np.int32))
    block_bytes = 2 * BLOCK_TOKENS * d * 2

    def attn(n: int, cached: bool):
        indptr = cp.asarray((np.arange(hkv + 1) * n).astype(np.int32))
        blocks = cp.asarray(np.tile(np.arange(n, dtype=np.int32), hkv))
        slots = cp.asarray((np.arange(hkv)[:, None] * nb + np.arange(n)[None]).ravel().astype(np.int32))
        kw = dict(sel_slot=slots, cache_pool=pool) if cached else {}
        return lambda: sparse_partial_attention(q, arena, tables, lens, indptr, blocks, scale=d ** -0.5,
                                                max_row_blocks=n, **kw)

    small = max(nb // 16, 1)
    uva, over = _line(small * hkv * block_bytes, _time(attn(small, False)),
                      nb * hkv * block_bytes, _time(attn(nb, False)))
    cached, _ = _line(small * hkv * block_bytes, _time(attn(small, True)),
                      nb * hkv * block_bytes, _time(attn(nb, True)))
    a16, p16 = arena.view(cp.complex128), pool.view(cp.complex128)

    def copy(n: int):
        pages = cp.asarray(np.tile(np.arange(n), hkv).astype(np.int64))
        heads = cp.asarray(np.repeat(np.arange(hkv), n).astype(np.int64))
        dst = cp.arange(n * hkv, dtype=cp.int64)
        def run():
            p16[dst] = a16[pages, heads]
        return run

    copy_rate, _ = _line(small * hkv * block_bytes, _time(copy(small)), nb * hkv * block_bytes, _time(copy(nb)))
    return GpuRates(uva, cached, copy_rate, over)
