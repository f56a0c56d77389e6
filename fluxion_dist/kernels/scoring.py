"""Quest block scores on the GPU (launchers for scoring.cu).

Oracle: :func:`fluxion_dist.attention.reference.quest_scores` over
:func:`~fluxion_dist.attention.reference.coarsen_metadata` for coarse levels, and
:func:`~fluxion_dist.attention.reference.kv_head_scores` for the per-KV-head maximum.
``quest_scores`` reads the bf16 metadata; ``quest_scores_compact`` its int8 mirror
(:mod:`fluxion_dist.kernels.compact_metadata`), whose oracle is the same reference over
:func:`~fluxion_dist.kernels.compact_metadata.dequantize`.
"""

from __future__ import annotations


import cupy as cp
import numpy as np

from fluxion_dist.kernels import loader
from fluxion_dist.kernels.device import sm_count
from fluxion_dist.kernels.checks import BF16_BITS, expect, expect_aligned, positive_scale

_THREADS = 64  # SCORE_THREADS in scoring.cu
_SCORE_PASSES = 2  # SCORE_PASSES in scoring.cu: blocks per row group per tile at factor 1
# Base level: resident CTAs per SM the strided grid aims for. Small CTAs, many of them: the
# fastest shape of a sweep over threads, tiles and CTAs per SM (docs/benchmarks.md, GPU kernels).
_CTAS_PER_SM = 8


def quest_scores(q: cp.ndarray, kmin: cp.ndarray, kmax: cp.ndarray, block_tables: cp.ndarray,
                 seq_lens: cp.ndarray, *, scale: float, factor: int = 1, query_scores: bool = True,
                 out: tuple[cp.ndarray | None, cp.ndarray] | None = None,
                 ) -> tuple[cp.ndarray | None, cp.ndarray]:
    """Scores of every block at granularity ``factor`` x 16 tokens, for a batch; one launch.

    q: float32 [B, Hq, d]; kmin, kmax: bf16 bits [P, Hkv, d] on the GPU, indexed by page;
    block_tables: int32 [B, max_blocks]; seq_lens: int32 [B]. Coarse blocks take the
    min-of-mins / max-of-maxes of ``factor`` consecutive logical blocks.

    Returns ``(scores float32 [B, Hq, nc], kv_scores float32 [B, Hkv, nc])`` with
    ``nc = ceil(max_blocks / factor)``; ``kv_scores`` is the max over each GQA group.
    Entries past a request's own blocks are -inf. With ``query_scores=False`` only
    ``kv_scores`` is written (selection per KV head needs nothing else) and ``scores`` is None.
    """
    expect("q", q, np.float32, (None, None, None))
    d = q.shape[2]
    expect("kmin", kmin, BF16_BITS, (None, None, d))
    expect("kmax", kmax, BF16_BITS, kmin.shape)
    for name, a in (("kmin", kmin), ("kmax", kmax)):
        expect_aligned(name, a)
    return _launch("quest_scores", q, (kmin, kmax), kmin.shape[1], block_tables, seq_lens, scale, factor,
                   query_scores, out)


def quest_scores_compact(q: cp.ndarray, values: cp.ndarray, scales: cp.ndarray, block_tables: cp.ndarray,
                         seq_lens: cp.ndarray, *, scale: float, factor: int = 1, query_scores: bool = True,
                         out: tuple[cp.ndarray | None, cp.ndarray] | None = None,
                         ) -> tuple[cp.ndarray | None, cp.ndarray]:
    """``quest_scores`` over the int8 mirror: ``values`` int8 [P, Hkv, 2*d] and ``scales`` bf16 bits
    [P, Hkv] as :func:`fluxion_dist.kernels.compact_metadata.quantize` lays them out. Every
    score is at least the bf16 metadata's score of the same block (the mirror's boxes contain
    the bf16 boxes), up to float32 rounding of the sums."""
    expect("q", q, np.float32, (None, None, None))
    d = q.shape[2]
    expect("values", values, np.int8, (None, None, 2 * d))
    expect("scales", scales, BF16_BITS, values.shape[:2])
    expect_aligned("values", values)
    return _launch("quest_scores_compact", q, (values, scales), values.shape[1], block_tables, seq_lens, scale,
                   factor, query_scores, out)


def _launch(kernel_name: str, q: cp.ndarray, meta: tuple[cp.ndarray, cp.ndarray], hkv: int,
            block_tables: cp.ndarray, seq_lens: cp.ndarray, scale: float, factor: int, query_scores: bool,
            out: tuple[cp.ndarray | None, cp.ndarray] | None) -> tuple[cp.ndarray | None, cp.ndarray]:
    bsz, hq, d = q.shape
    expect("block_tables", block_tables, np.int32, (bsz, None))
    expect("seq_lens", seq_lens, np.int32, (bsz,))
    expect_aligned("q", q)
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if factor < 1:
        raise ValueError(f"factor must be >= 1; got {factor}")
    max_blocks = block_tables.shape[1]
    nc = -(-max_blocks // factor)
    if out is None:
        out = (cp.empty((bsz, hq, nc), cp.float32) if query_scores else None,
               cp.empty((bsz, hkv, nc), cp.float32))
    scores, kv_scores = out
    if (scores is not None) != query_scores:
        raise ValueError("out[0] must be an array exactly when query_scores is True")
    if scores is not None:
        expect("scores", scores, np.float32, (bsz, hq, nc))
    expect("kv_scores", kv_scores, np.float32, (bsz, hkv, nc))
    if bsz == 0 or nc == 0:
        return scores, kv_scores

    kernel = loader.get_kernel("scoring", kernel_name, HEAD_DIM=d, GROUP=hq // hkv)
    rows_per_cta = _THREADS // (d // 8)
    if factor == 1:
        # CTAs stride over tiles, prefetching the next: about _CTAS_PER_SM per SM in all.
        tiles = -(-nc // (rows_per_cta * _SCORE_PASSES))
        per_row = max(1, sm_count(q.device.id) * _CTAS_PER_SM // (hkv * bsz))
        grid = (min(tiles, per_row), hkv, bsz)
    else:
        grid = (-(-nc // rows_per_cta), hkv, bsz)
    kernel(grid, (_THREADS,), (
        q, *meta, block_tables, seq_lens, scores if scores is not None else np.uint64(0), kv_scores,
        np.int32(hkv), np.int32(max_blocks), np.int32(nc), np.int32(factor),
        np.float32(positive_scale(scale))))
    return scores, kv_scores
