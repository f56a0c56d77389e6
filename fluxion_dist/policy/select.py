"""The NumPy twin of the GPU pipeline's selection stages, bit-compatible with the kernels.

Stages, in the pipeline's order (``hybrid.device_pipeline``), each the twin of one kernel:

1. :func:`quest_kv_scores` (``kernels/scoring.cu``, base level): per KV head the max over its
   query heads of the Quest bound, float32, in the kernel's arithmetic order: q pre-scaled by
   ``scale / 2``, per lane of 8 channels a chain of fused multiply-adds over
   ``(hi + lo, hi - lo)``, the lanes summed as a halving tree (the warp's xor shuffles);
2. :func:`topp_sets` (``kernels/selection.cu`` with ``BY_MASS``): the fewest highest-scoring
   blocks whose mass reaches p, the mass of a block being ``exp(score - max)`` in float32
   rounded to units of 2^-40 (deterministic integer sums), the target
   ``ceil(p * (1 - 1e-12) * total)``; :func:`far_demand` counts the set's blocks outside the
   kept ones (the policy's demand, ``policy.budget``);
3. :func:`force_kept` (``kernels/block_table.cu`` ``force_blocks``): the kept blocks' scores
   become 3.0e38, finite, so top-k takes them first and ties still go to the lower id;
4. :func:`topk_csr` (``selection.cu`` top-k): per row the k highest scores, ranked by the
   kernels' order-preserving 32-bit keys (so -0.0 ranks below +0.0), ties to the lower id;
   CSR of logical block ids, ascending;
5. with ``SparseConfig.rescore_factor`` c > 0 (fluxion only), a second stage
   (``kernels/rescore.cu``): 4 picks :func:`candidate_rows` (``ceil(c * k)``) candidates per
   row, :func:`candidate_lse` scores each exactly (per query head of the group, the
   log-sum-exp of ``q.k * scale`` over the block's tokens, read from the KV itself),
   :func:`candidate_scores` turns those into each block's share of the group's candidate mass
   (``reference.candidate_shares``; kept blocks stay forced, the rest -inf), and top-k at the
   planned k picks from that. Float32 in the kernels' formulas (log2 units inside a block,
   natural ones across blocks), but not their summation order: ranks match the kernel's
   except where two candidates' exact scores lie within float32 rounding of each other.

The CPU path runs the Cython versions of 1, 2 and 4 (``cpu.selection``: same rankings, its
own float32 arithmetic) and this module's 3 and far-demand count. Only ``exp`` may differ from
CUDA's ``expf`` by an ulp, which moves a top-p cut only where the target falls within that
of a block's cumulative mass. The float64 oracle is ``attention.reference``.
"""

from __future__ import annotations

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS, from_bf16_bits

FORCED_SCORE = np.float32(3.0e38)
MASS_ONE = np.float32(2.0 ** 40)
LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add: the product is exact in extended precision (48 of its 64
    mantissa bits) and the sum is rounded once there, then to float32."""
    ld = np.longdouble
    return (a.astype(ld) * b.astype(ld) + c.astype(ld)).astype(np.float32)


def block_counts(seq_lens) -> np.ndarray:
    return (np.asarray(seq_lens, dtype=np.int64) + BLOCK_TOKENS - 1) // BLOCK_TOKENS


def quest_kv_scores(q: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, block_tables: np.ndarray,
                    seq_lens: np.ndarray, scale: float) -> np.ndarray:
    """``float32 [B, Hkv, W]`` (W = the tables' width): the kernel's kv_scores at factor 1.

    q float32 [B, Hq, d]; kmin, kmax bf16 bits [P, Hkv, d]; block_tables int [B, W];
    seq_lens [B] (tokens, the new one included). Past a request's blocks: -inf."""
    q = _f32(q)
    bsz, hq, d = q.shape
    _, hkv, _ = kmin.shape
    g, lanes = hq // hkv, d // 8
    width = block_tables.shape[1]
    nb = block_counts(seq_lens)
    live = np.arange(width)[None, :] < nb[:, None]  # [B, W]
    pages = np.where(live, block_tables, 0).astype(np.int64)
    lo = from_bf16_bits(kmin[pages]).reshape(bsz, width, hkv, lanes, 8)
    hi = from_bf16_bits(kmax[pages]).reshape(bsz, width, hkv, lanes, 8)
    mid, half = hi + lo, hi - lo  # float32, as the kernel forms them
    qs = q * (np.float32(scale) * np.float32(0.5))
    qs = qs.reshape(bsz, hkv, g, lanes, 8)
    # acc [B, Hkv, G, W, lanes]
    mid = mid.transpose(0, 2, 1, 3, 4)[:, :, None]  # [B, Hkv, 1, W, lanes, 8]
    half = half.transpose(0, 2, 1, 3, 4)[:, :, None]
    qr = qs[:, :, :, None]  # [B, Hkv, G, 1, lanes, 8]
    acc = np.zeros(np.broadcast_shapes(mid.shape[:-1], qr.shape[:-1]), dtype=np.float32)
    for i in range(8):
        acc = _fma(qr[..., i], mid[..., i], _fma(np.abs(qr[..., i]), half[..., i], acc))
    while acc.shape[-1] > 1:  # the xor-shuffle tree: lane j adds lane j + width / 2
        h = acc.shape[-1] // 2
        acc = acc[..., :h] + acc[..., h:]
    scores = acc[..., 0].max(axis=2)  # [B, Hkv, W]: the max over the GQA group
    return np.where(live[:, None, :], scores, np.float32(-np.inf)).astype(np.float32)


def order_keys(scores: np.ndarray) -> np.ndarray:
    """The kernels' order-preserving uint32 keys of float32 scores."""
    u = _f32(scores).view(np.uint32)
    return np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000)).astype(np.uint32)


def _ranking(keys: np.ndarray) -> np.ndarray:
    """Indices by key descending, ties to the lower id (stable sort of the complemented key)."""
    return np.argsort(~keys, kind="stable")


def _rows(scores: np.ndarray, seq_lens) -> tuple[np.ndarray, np.ndarray, int]:
    bsz, heads, width = scores.shape
    nb = np.minimum(block_counts(seq_lens), width)
    return scores.reshape(bsz * heads, width), np.repeat(nb, heads), heads


def _csr(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([r.size for r in rows], out=indptr[1:])
    blocks = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
    return indptr, blocks


def topk_csr(scores: np.ndarray, seq_lens, k) -> tuple[np.ndarray, np.ndarray]:
    """``scores float32 [B, H, W]``, ``k`` int or int [B, H] -> CSR (indptr int32 [B*H + 1],
    blocks int32): per row the k best of its request's own blocks, ascending."""
    flat, n, _ = _rows(_f32(scores), seq_lens)
    ks = np.broadcast_to(np.asarray(k, dtype=np.int64).reshape(-1) if np.ndim(k) else np.int64(k), (flat.shape[0],))
    out = []
    for r in range(flat.shape[0]):
        take = int(min(max(ks[r], 0), n[r]))
        out.append(np.sort(_ranking(order_keys(flat[r, :n[r]]))[:take]))
    return _csr(out)


def _mass_weights(keys: np.ndarray) -> np.ndarray:
    """Fixed-point masses (units of 2^-40) of a row's keys, computed from the key as the kernel does."""
    vals = np.where(keys & np.uint32(0x80000000), keys & np.uint32(0x7FFFFFFF), ~keys).astype(np.uint32)
    vals = vals.view(np.float32)
    smax = vals.max()
    with np.errstate(over="ignore", invalid="ignore"):
        w = np.exp(vals - smax) * MASS_ONE  # float32 throughout
    return np.rint(w.astype(np.float64)).astype(np.uint64)


def topp_sets(scores: np.ndarray, seq_lens, p: float) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' top-p pass (``select_topp`` at factor 1) -> CSR, ascending per row."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top-p mass must be in (0, 1]; got {p}")
    flat, n, _ = _rows(_f32(scores), seq_lens)
    p32 = float(np.float32(p))
    out = []
    for r in range(flat.shape[0]):
        m = int(n[r])
        if m == 0:
            out.append(np.zeros(0, np.int64))
            continue
        if p32 >= 1.0:
            out.append(np.arange(m))
            continue
        keys = order_keys(flat[r, :m])
        order = _ranking(keys)
        w = _mass_weights(keys)[order]
        total = int(w.sum())
        target = min(max(int(np.ceil(p32 * (1.0 - 1e-12) * total)), 1), total)
        count = int(np.searchsorted(np.cumsum(w), target, side="left")) + 1
        out.append(np.sort(order[:count]))
    return _csr(out)


def far_demand(indptr: np.ndarray, blocks: np.ndarray, seq_lens, heads: int, *, sink_blocks: int,
               recent_blocks: int) -> np.ndarray:
    """``int64 [B, heads]``: per row of a (top-p) CSR, its blocks outside the kept ones."""
    rows = indptr.size - 1
    nb = np.repeat(block_counts(seq_lens), heads)
    row = np.repeat(np.arange(rows), np.diff(indptr))
    blk = blocks[:int(indptr[-1])].astype(np.int64)
    far = (blk >= sink_blocks) & (blk < nb[row] - recent_blocks)
    return np.bincount(row[far], minlength=rows).astype(np.int64).reshape(-1, heads)


def force_kept(scores: np.ndarray, seq_lens, *, sink_blocks: int, recent_blocks: int) -> np.ndarray:
    """In place on ``scores float32 [B, H, W]``: each request's first ``sink_blocks`` and last
    ``recent_blocks`` blocks score ``FORCED_SCORE``; returns ``scores``."""
    bsz, _, width = scores.shape
    nb = np.minimum(block_counts(seq_lens), width)
    j = np.arange(width)[None, :]
    kept = ((j < sink_blocks) | (j >= nb[:, None] - recent_blocks)) & (j < nb[:, None])
    scores[np.broadcast_to(kept[:, None, :], scores.shape)] = FORCED_SCORE
    return scores


def candidate_rows(k_rows, seq_lens, factor: float) -> np.ndarray:
    """``int64 [B, H]``: the rescoring stage's candidates per row, ``ceil(factor * k)`` (never
    below k, never above the request's blocks); ``k_rows`` int [B, H]."""
    if not factor >= 1.0:
        raise ValueError(f"rescore factor must be >= 1; got {factor}")
    k = np.asarray(k_rows, dtype=np.int64)
    nb = block_counts(seq_lens)[:, None]
    cand = np.ceil(np.float64(factor) * k - 1e-9).astype(np.int64)
    return np.minimum(np.maximum(cand, k), nb)


def _entry_rows(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(indptr.size - 1), np.diff(indptr))


def candidate_lse(q: np.ndarray, kv_pages: np.ndarray, block_tables: np.ndarray, seq_lens, scale: float,
                  indptr: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """``float32 [nnz, G]``: per CSR entry (row ``b * Hkv + h``, logical block) and query head
    of the group, the block's exact log-sum-exp of ``q.k * scale`` over its tokens (those
    before ``seq_lens[b]``), from ``kv_pages`` (bf16 bits ``[P, Hkv, 2, 16, d]``, K only)."""
    q = _f32(q)
    bsz, hq, d = q.shape
    hkv = kv_pages.shape[1]
    g = hq // hkv
    qs = (q * (np.float32(scale) * LOG2E)).reshape(bsz, hkv, g, d)
    lens = np.asarray(seq_lens, np.int64)
    out = np.empty((int(indptr[-1]), g), np.float32)
    tok = np.arange(BLOCK_TOKENS)
    for r in range(indptr.size - 1):  # one GEMM per row: a row's entries share q and KV head
        lo, hi = int(indptr[r]), int(indptr[r + 1])
        if lo == hi:
            continue
        b, h = divmod(r, hkv)
        blk = blocks[lo:hi].astype(np.int64)
        k = from_bf16_bits(kv_pages[block_tables[b, blk], h, 0]).reshape(-1, d)
        with np.errstate(over="ignore", invalid="ignore"):  # the padding past the sequence may hold anything
            s = (k @ qs[b, h].T).reshape(hi - lo, BLOCK_TOKENS, g)  # log2 units
        s = np.where((tok[None, :] < (lens[b] - blk * BLOCK_TOKENS)[:, None])[..., None], s, np.float32(-np.inf))
        m = s.max(axis=1)
        out[lo:hi] = (m + np.log2(np.exp2(s - m[:, None]).sum(axis=1, dtype=np.float32))) * LN2
    return out


def candidate_scores(lse: np.ndarray, indptr: np.ndarray, blocks: np.ndarray, seq_lens, heads: int,
                     width: int, *, sink_blocks: int, recent_blocks: int) -> np.ndarray:
    """``float32 [B, heads, width]`` from :func:`candidate_lse`: each candidate's share of its
    group's candidate mass (``reference.candidate_shares``), the kept blocks ``FORCED_SCORE``,
    every other block -inf: top-k over it picks among the candidates only."""
    lse = _f32(lse)
    rows = indptr.size - 1
    nnz = int(indptr[-1])
    row = _entry_rows(indptr)
    # a row's entries are contiguous: segment reductions over the rows that have any
    counts = np.diff(indptr)
    starts = indptr[:-1][counts > 0].astype(np.int64)
    zmax = np.full((rows, lse.shape[1]), -np.inf, np.float32)
    zsum = np.zeros_like(zmax)
    if starts.size:
        zmax[counts > 0] = np.maximum.reduceat(lse[:nnz], starts, axis=0)
        zsum[counts > 0] = np.add.reduceat(np.exp(lse[:nnz] - zmax[row]), starts, axis=0, dtype=np.float32)
    with np.errstate(divide="ignore"):  # a row without candidates: log 0, never read
        x = lse[:nnz] - (zmax + np.log(zsum))[row]  # [nnz, G]: log of each head's share
    xm = x.max(axis=1)
    share = xm + np.log(np.exp(x - xm[:, None]).sum(axis=1, dtype=np.float32))
    blk = blocks[:nnz].astype(np.int64)
    nb = np.repeat(block_counts(seq_lens), heads)[row]
    share = np.where((blk < sink_blocks) | (blk >= nb - recent_blocks), FORCED_SCORE, share)
    out = np.full((rows, width), -np.inf, np.float32)
    out[row, blk] = share
    return out.reshape(-1, heads, width)


def rescore_csr(q: np.ndarray, kv_pages: np.ndarray, block_tables: np.ndarray, seq_lens, scale: float,
                forced_scores: np.ndarray, k_rows, factor: float, *, sink_blocks: int,
                recent_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The rescoring stage end to end: ``forced_scores`` (Quest's, after :func:`force_kept`)
    -> the top :func:`candidate_rows` -> their exact scores -> top-k at ``k_rows`` (CSR)."""
    heads, width = forced_scores.shape[1:]
    k_rows = np.broadcast_to(np.asarray(k_rows, dtype=np.int64), forced_scores.shape[:2])
    ip, bl = topk_csr(forced_scores, seq_lens, candidate_rows(k_rows, seq_lens, factor))
    lse = candidate_lse(q, kv_pages, block_tables, seq_lens, scale, ip, bl)
    exact = candidate_scores(lse, ip, bl, seq_lens, heads, width, sink_blocks=sink_blocks,
                             recent_blocks=recent_blocks)
    return topk_csr(exact, seq_lens, k_rows)


def select_layer(q: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, block_tables: np.ndarray, seq_lens,
                 scale: float, k_rows: np.ndarray, *, sink_blocks: int, recent_blocks: int,
                 mass_target: float | None = None, rescore_factor: float = 0.0,
                 kv_pages: np.ndarray | None = None):
    """The GPU layer's selection, end to end: ``(indptr, blocks, demand)``; ``demand`` [B, Hkv]
    (the far demand of the top-p pass) only with a ``mass_target``, else None. With a
    ``rescore_factor`` (>= 1) the top-k is the rescoring stage's over ``kv_pages``."""
    hkv = kmin.shape[1]
    scores = quest_kv_scores(q, kmin, kmax, block_tables, seq_lens, scale)
    demand = None
    if mass_target is not None:
        ip, bl = topp_sets(scores, seq_lens, mass_target)
        demand = far_demand(ip, bl, seq_lens, hkv, sink_blocks=sink_blocks, recent_blocks=recent_blocks)
    force_kept(scores, seq_lens, sink_blocks=sink_blocks, recent_blocks=recent_blocks)
    if rescore_factor > 0:
        if kv_pages is None:
            raise ValueError("rescoring reads the KV: pass kv_pages")
        indptr, blocks = rescore_csr(q, kv_pages, block_tables, seq_lens, scale, scores, k_rows, rescore_factor,
                                     sink_blocks=sink_blocks, recent_blocks=recent_blocks)
    else:
        indptr, blocks = topk_csr(scores, seq_lens, k_rows)
    return indptr, blocks, demand
