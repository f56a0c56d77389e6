"""Hierarchical selection (AsyncTLS): filter coarse blocks, then keep the best tokens inside.

Stage 1 ranks coarse units (64 tokens by default) by their Quest bound and keeps a
candidate set a few times larger than the budget: cheap, GEMM-shaped, and coarse
bounds only have to be good enough not to lose a needle. Stage 2 scores every token
of the candidates exactly (``q . k``, max over the GQA group, as the Cython
``token_scores`` returns them, ``[nnz, 16]``) and keeps the highest tokens until they
hold ``token_mass`` of the candidates' softmax mass, within a token budget.

Output for the kernels: the block CSR plus ``sel_masks`` (one ``uint16`` per selected
block; bit ``i`` = token ``i`` attended), the form the Cython path's
``sparse_partial_attention(..., sel_masks, ...)`` takes. A 16-token block maps onto
16 bits exactly, so the mask costs 2 bytes per block next to the 4-byte block id,
the block stays the unit of transfer and caching, and a block whose tokens were all
dropped leaves the list. Per-block token lists were the alternative: variable
length, a second CSR level, and no gain, since a block is fetched whole anyway.

Where it pays (``refine_tokens``): masking saves attention compute, not transfer, so
a row is refined only when it keeps at most ``max_keep_fraction`` of its candidate
tokens (a head whose mass sits in a few tokens); otherwise its blocks stay whole.
Sinks and the recent window stay whole: they are cached on the GPU and cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.sparse.scoring import MetadataPyramid, quest_scores
from fluxion_dist.sparse.selection import (FULL_MASK, BlockSelection, SparseInputError, forced_blocks,
                                           selection_from_mask)


@dataclass(frozen=True, slots=True)
class HierarchicalOptions:
    coarse_factor: int = field(default=4, metadata={"doc": "stage-1 unit, in base blocks (4: 64 tokens)"})
    candidate_ratio: float = field(default=4.0, metadata={
        "doc": "stage-1 keeps this many times the budget's blocks as candidates"})
    token_mass: float = field(default=0.95, metadata={"doc": "stage 2 keeps tokens up to this share of candidate mass"})


@dataclass(frozen=True, slots=True)
class TokenRefinement:
    selection: BlockSelection  # with sel_masks
    tokens_kept: np.ndarray  # int64 [rows]: tokens attended per row
    refined: np.ndarray  # bool [rows]: the row's tokens were selected (False: whole blocks)


def token_scores(q: np.ndarray, k: np.ndarray, selection: BlockSelection, scale: float | None = None,
                 request: int = 0) -> np.ndarray:
    """``[nnz, 16]`` scaled ``q . k`` of the selected blocks' tokens, max over the GQA group.

    The NumPy form of the Cython ``token_scores``; tokens past ``T`` read ``-inf``.
    ``q [Hq, d]``, ``k [T, Hkv, d]`` of one request (``selection`` holds its rows only).
    """
    hq, d = q.shape
    t, hkv, _ = k.shape
    if selection.num_kv_heads != hkv or hq % hkv:
        raise SparseInputError(f"q [{hq}, {d}] and k [{t}, {hkv}, {d}] do not fit a {selection.num_kv_heads}-head selection")
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    rows = np.repeat(np.arange(selection.num_rows), selection.blocks_per_row())
    kh = rows % hkv
    tok = selection.sel_blocks.astype(np.int64)[:, None] * BLOCK_TOKENS + np.arange(BLOCK_TOKENS)
    valid = tok < t
    kk = k[np.minimum(tok, t - 1), kh[:, None]]  # [nnz, 16, d]
    qg = q.reshape(hkv, hq // hkv, d)[kh]  # [nnz, g, d]
    s = np.einsum("etd,egd->egt", kk, qg).max(axis=1) * scale
    return np.where(valid, s, -np.inf).astype(np.float32)


def refine_tokens(selection: BlockSelection, scores: np.ndarray, num_tokens: int, *,
                  keep_whole: np.ndarray | None = None, token_mass: float = 0.95,
                  max_keep_fraction: float = 0.5, token_cap: np.ndarray | None = None) -> TokenRefinement:
    """Keep, per row, the top tokens of the non-whole blocks (single request, rows = KV heads).

    ``scores [nnz, 16]`` are token scores of ``selection``'s blocks; ``keep_whole [nnz]``
    marks blocks kept entirely (their mass counts toward ``token_mass``); ``token_cap
    [rows]`` bounds the tokens kept outside whole blocks. All rows at once: one lexsort
    by (row, score) and segment cumulative sums, no loop over heads.
    """
    nnz = selection.sel_blocks.size
    if scores.shape != (nnz, BLOCK_TOKENS):
        raise SparseInputError(f"token scores must be [{nnz}, {BLOCK_TOKENS}]; got {scores.shape}")
    if not 0.0 < token_mass <= 1.0 or not 0.0 <= max_keep_fraction <= 1.0:
        raise SparseInputError(f"token_mass must be in (0, 1] and max_keep_fraction in [0, 1]; "
                               f"got {token_mass}, {max_keep_fraction}")
    nrows = selection.num_rows
    whole = np.zeros(nnz, bool) if keep_whole is None else np.asarray(keep_whole, bool)
    if whole.shape != (nnz,) or (token_cap is not None and np.shape(token_cap) != (nrows,)):
        raise SparseInputError(f"keep_whole must be [{nnz}] and token_cap [{nrows}]; got {whole.shape} "
                               f"and {None if token_cap is None else np.shape(token_cap)}")
    rows = np.repeat(np.arange(nrows), selection.blocks_per_row())
    tok = selection.sel_blocks.astype(np.int64)[:, None] * BLOCK_TOKENS + np.arange(BLOCK_TOKENS)
    valid = tok < num_tokens
    s = np.where(valid, scores.astype(np.float64), -np.inf)
    row_t = np.repeat(rows, BLOCK_TOKENS)
    flat = s.ravel()
    row_max = np.full(nrows, -np.inf)
    np.maximum.at(row_max, row_t, flat)
    w = np.where(valid.ravel(), np.exp(flat - np.where(np.isfinite(row_max), row_max, 0.0)[row_t]), 0.0)
    total = np.bincount(row_t, weights=w, minlength=nrows)
    whole_t = np.repeat(whole, BLOCK_TOKENS) & valid.ravel()
    cand = valid.ravel() & ~whole_t
    need = token_mass * (1.0 - 1e-12) * total - np.bincount(row_t, weights=w * whole_t, minlength=nrows)

    # candidate tokens, each row's best first
    idx = np.flatnonzero(cand)
    idx = idx[np.lexsort((-w[idx], row_t[idx]))]
    r = row_t[idx]
    csum = np.cumsum(w[idx])
    first = np.searchsorted(r, np.arange(nrows))
    before = csum - w[idx] - np.concatenate([[0.0], csum])[first][r]  # row mass ahead of the token
    rank = np.arange(idx.size) - first[r]
    cap = np.full(nrows, np.iinfo(np.int64).max) if token_cap is None else np.asarray(token_cap)
    keep = (before < need[r]) & (rank < cap[r])
    n_cand = np.bincount(r, minlength=nrows)
    n_keep = np.bincount(r, weights=keep, minlength=nrows).astype(np.int64)
    refined = n_keep <= max_keep_fraction * n_cand

    bits = np.zeros(nnz * BLOCK_TOKENS, bool)
    bits[whole_t] = True
    bits[idx[keep]] = True
    bits[cand & ~refined[row_t]] = True  # rows where refining does not pay keep whole blocks
    per_block = bits.reshape(nnz, BLOCK_TOKENS)
    masks = (per_block.astype(np.uint32) << np.arange(BLOCK_TOKENS, dtype=np.uint32)).sum(axis=1).astype(np.uint16)
    # invalid tail bits of a non-refined last block are set: the kernels ignore them
    masks = np.where(~refined[rows] | whole, FULL_MASK, masks)
    alive = masks != 0
    counts = np.bincount(rows[alive], minlength=nrows)
    indptr = np.zeros(nrows + 1, np.int32)
    np.cumsum(counts, out=indptr[1:])
    out = BlockSelection(indptr, selection.sel_blocks[alive], selection.num_kv_heads, masks[alive])
    tokens_kept = np.bincount(row_t, weights=(bits & valid.ravel()), minlength=nrows).astype(np.int64)
    return TokenRefinement(out, tokens_kept, refined)


def hierarchical_select(q: np.ndarray, k: np.ndarray, pyramid: MetadataPyramid, config: SparseConfig, *,
                        scale: float | None = None,
                        options: HierarchicalOptions = HierarchicalOptions()) -> TokenRefinement:
    """AsyncTLS on one (request, layer): coarse filter by Quest bounds, then top tokens inside.

    The token budget per KV head is ``SparseConfig.budget`` of the context, sinks and
    window included (kept whole); every candidate row is refined.
    """
    t, hkv = pyramid.num_tokens, pyramid.num_kv_heads
    hq, d = q.shape
    nb = num_blocks(t)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    f = options.coarse_factor
    lvl = pyramid.level(f)
    forced = forced_blocks(t, config.sink_tokens, config.recent_tokens)
    coarse = quest_scores(q, pyramid.kmin[lvl], pyramid.kmax[lvl], scale)
    coarse = coarse.reshape(hkv, hq // hkv, -1).max(axis=1)  # [Hkv, nu]
    n_units = min(coarse.shape[1], int(np.ceil(options.candidate_ratio * config.budget * nb / f)))
    top = np.argsort(-coarse, axis=1, kind="stable")[:, :n_units]
    blk = (top[:, :, None] * f + np.arange(f)).reshape(hkv, -1)
    mask = np.repeat(forced[None, :], hkv, axis=0)
    rows = np.repeat(np.arange(hkv), blk.shape[1])
    ok = blk.ravel() < nb
    mask[rows[ok], blk.ravel()[ok]] = True
    cand = selection_from_mask(mask)
    whole = forced[cand.sel_blocks]
    forced_tok = int(np.minimum(BLOCK_TOKENS, t - np.flatnonzero(forced) * BLOCK_TOKENS).sum())
    cap = np.full(hkv, max(int(np.ceil(config.budget * t)) - forced_tok, 0))
    scores = token_scores(q, k, cand, scale)
    return refine_tokens(cand, scores, t, keep_whole=whole, token_mass=options.token_mass,
                         max_keep_fraction=1.0, token_cap=cap)
