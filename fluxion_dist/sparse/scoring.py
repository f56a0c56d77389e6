"""Quest block scores at the three granularities and the softmax mass they estimate.

Vectorised forms of ``reference.block_metadata`` / ``coarsen_metadata`` /
``quest_scores`` (the float64 loops there are the oracle, too slow for a decode
step at 128k). The Quest bound ``sum_c max(q_c lo_c, q_c hi_c)`` is computed as
``q+ . hi + q- . lo`` (``q+ = max(q, 0)``, ``q- = min(q, 0)``): two GEMMs straight
on the stored min/max, no pass to build midpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS, COARSE_FACTORS, num_blocks
from fluxion_dist.sparse.selection import SparseInputError

_CHUNK = 256  # units per scoring chunk: 256 x Hkv x d fp32 = 1 MiB at 8 x 128


@dataclass(frozen=True, slots=True)
class MetadataPyramid:
    """Quest min/max of K at each granularity for one request and layer.

    ``kmin[i], kmax[i]`` are ``[nu_i, Hkv, d]`` for units of ``factors[i]`` base
    blocks; the last unit covers only the valid tokens.
    """

    num_tokens: int
    factors: tuple[int, ...]
    kmin: tuple[np.ndarray, ...]
    kmax: tuple[np.ndarray, ...]

    def level(self, factor: int) -> int:
        if factor not in self.factors:
            raise SparseInputError(f"granularity factor {factor} not in the pyramid {self.factors}")
        return self.factors.index(factor)

    @property
    def num_kv_heads(self) -> int:
        return self.kmin[0].shape[1]


def coarsen(kmin: np.ndarray, kmax: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Min of mins and max of maxes over runs of ``factor`` blocks (``reference.coarsen_metadata``)."""
    nb = kmin.shape[0]
    nc = -(-nb // factor)
    pad = nc * factor - nb
    if pad:
        # +inf / -inf padding never wins a min / max, so the short last unit is exact
        kmin = np.concatenate([kmin, np.full((pad,) + kmin.shape[1:], np.inf, kmin.dtype)])
        kmax = np.concatenate([kmax, np.full((pad,) + kmax.shape[1:], -np.inf, kmax.dtype)])
    shape = (nc, factor) + kmin.shape[1:]
    return kmin.reshape(shape).min(axis=1), kmax.reshape(shape).max(axis=1)


def build_pyramid(kmin: np.ndarray, kmax: np.ndarray, num_tokens: int,
                  factors: tuple[int, ...] = COARSE_FACTORS) -> MetadataPyramid:
    """The pyramid from base-block metadata ``kmin, kmax [nb, Hkv, d]`` (float32 or float64)."""
    kmin, kmax = np.asarray(kmin), np.asarray(kmax)
    nb = num_blocks(num_tokens)
    if kmin.shape != kmax.shape or kmin.ndim != 3 or kmin.shape[0] != nb:
        raise SparseInputError(f"kmin/kmax must both be [{nb}, Hkv, d] for {num_tokens} tokens; "
                               f"got {kmin.shape} and {kmax.shape}")
    if not factors or factors[0] != 1:
        raise SparseInputError(f"pyramid factors must start at the base granularity 1; got {factors}")
    levels = [(kmin, kmax) if f == 1 else coarsen(kmin, kmax, f) for f in factors]
    return MetadataPyramid(num_tokens, tuple(factors), tuple(lo for lo, _ in levels),
                           tuple(hi for _, hi in levels))


def pyramid_from_kv(k: np.ndarray, factors: tuple[int, ...] = COARSE_FACTORS) -> MetadataPyramid:
    """Metadata straight from keys ``k [T, Hkv, d]`` (tests and benchmarks; the store keeps its own)."""
    k = np.asarray(k)
    # a token is a one-token box, so base metadata is the same min/max coarsening
    kmin, kmax = coarsen(k, k, BLOCK_TOKENS)
    return build_pyramid(kmin, kmax, k.shape[0], factors)


def quest_scores(q: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, scale: float) -> np.ndarray:
    """Quest upper bound of the scaled logit per query head and unit: ``[Hq, nu]``."""
    hq, d = q.shape
    nu, hkv, dm = kmin.shape
    if dm != d or hq % hkv:
        raise SparseInputError(f"q [{hq}, {d}] does not fit metadata [{nu}, {hkv}, {dm}]")
    dtype = np.result_type(q, kmin, np.float32)
    # scale is cast first: a NumPy float64 scalar would otherwise promote the whole GEMM
    qs = q.astype(dtype) * dtype.type(scale)
    g = hq // hkv
    pos = np.ascontiguousarray(np.maximum(qs, 0).reshape(hkv, g, d).transpose(0, 2, 1))  # [Hkv, d, g]
    neg = np.ascontiguousarray(np.minimum(qs, 0).reshape(hkv, g, d).transpose(0, 2, 1))
    out = np.empty((hkv, nu, g), dtype)
    # per head the metadata rows are Hkv*d apart (4 KiB at 8x128 fp32): fed to BLAS as strided
    # slices they thrash the cache, so copy a chunk head-major (it stays in L2), then one batched GEMM
    for s0 in range(0, nu, _CHUNK):
        s1 = min(s0 + _CHUNK, nu)
        hi = np.ascontiguousarray(kmax[s0:s1].transpose(1, 0, 2), dtype=dtype)
        lo = np.ascontiguousarray(kmin[s0:s1].transpose(1, 0, 2), dtype=dtype)
        out[:, s0:s1] = np.matmul(hi, pos) + np.matmul(lo, neg)
    return out.transpose(0, 2, 1).reshape(hq, nu)


def unit_tokens(num_tokens: int, factor: int) -> np.ndarray:
    """Valid tokens in each unit of ``factor`` base blocks: ``[nu]`` int64."""
    span = factor * BLOCK_TOKENS
    starts = np.arange(0, num_tokens, span)
    return np.minimum(span, num_tokens - starts)


def estimated_mass(scores: np.ndarray, tokens: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """Estimated softmax mass per KV head and unit, ``[Hkv, nu]``; each row sums to 1.

    A unit counts as ``tokens`` keys at its bound (softmax of ``score + log tokens``):
    at the base granularity with full blocks this is ``reference.estimated_mass``, and
    it keeps the estimate comparable across granularities and for the short last unit.
    A KV head's mass is the mean over its query heads: the fraction of the group's
    attention a block set keeps, since every query head of the group reads the same blocks.
    """
    hq, nu = scores.shape
    if tokens.shape != (nu,) or hq % num_kv_heads:
        raise SparseInputError(f"scores [{hq}, {nu}] do not fit {tokens.shape} unit sizes "
                               f"and {num_kv_heads} KV heads")
    # in the scores' own precision and in place: at 128k these are a few MiB per step
    p = scores + np.log(tokens).astype(scores.dtype)
    p -= p.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True, dtype=np.float64).astype(p.dtype)
    m = p.reshape(num_kv_heads, hq // num_kv_heads, nu).mean(axis=1, dtype=np.float64)
    return m / m.sum(axis=1, keepdims=True)  # rows sum to 1 in float64, whatever the scores' dtype
