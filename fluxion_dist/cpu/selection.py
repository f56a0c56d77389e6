"""Block scoring and selection on the CPU: Quest bounds, top-k / top-p, and block -> token.

CPU-only mode selects blocks here; the hierarchical (AsyncTLS-style) path
filters blocks by their Quest bound, then scores the tokens of the surviving
blocks exactly and keeps the best of them as per-block token masks:

    s = quest_scores_paged(q, kmin, kmax, block_tables, seq_lens, scale, num_threads=t)
    sel = select_topk(kv_head_max(s, hkv).reshape(B * hkv, -1), k_blocks,
                      row_lens=np.repeat(block_counts(seq_lens), hkv), num_threads=t)
    tok = token_scores(q, kv_pages, block_tables, seq_lens, sel.indptr, sel.ids, scale, num_threads=t)
    masks = select_tokens_topk(tok, sel.indptr, k_tokens, num_threads=t)
    sparse_partial_attention(..., sel.indptr, sel.ids, scale, sel_masks=masks, num_threads=t)

Rankings match ``reference.select_topk/select_topp`` exactly (ties to the lower
id); ``k`` and ``p`` may differ per row (per-head budgets).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.cpu import _attention, _checks, _selection
from fluxion_dist.cpu._checks import Isa
from fluxion_dist.cpu.team import AttentionTeam


class Selection(NamedTuple):
    indptr: np.ndarray  # i32 [rows + 1]
    ids: np.ndarray  # i32 [nnz], ascending within each row


def block_counts(seq_lens: np.ndarray) -> np.ndarray:
    """Blocks per sequence: ``ceil(seq_len / 16)`` as int32."""
    return (-(-np.asarray(seq_lens, dtype=np.int64) // BLOCK_TOKENS)).astype(np.int32)


def kv_head_max(scores: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """``[..., Hq, n] -> [..., Hkv, n]``: a KV head's score is the max over its query heads."""
    *lead, hq, n = scores.shape
    if hq % num_kv_heads:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({num_kv_heads})")
    return scores.reshape(*lead, num_kv_heads, hq // num_kv_heads, n).max(axis=-2)


def quest_scores_paged(q: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, block_tables: np.ndarray,
                       seq_lens: np.ndarray, scale: float, *, num_threads: int,
                       isa: Isa = "auto", team: AttentionTeam | None = None) -> np.ndarray:
    """Quest upper bounds ``f32 [B, Hq, max_blocks]`` from per-page ``kmin, kmax [P, Hkv, d]``
    (bf16 bits); entries past each sequence's last block are -inf. ``team``: run on that
    persistent team (the same bits) instead of an OpenMP region of ``num_threads``."""
    _checks.contiguous("q", _checks.array("q", q, np.float32, 3))
    b, hq, d = q.shape
    for name, x in (("kmin", kmin), ("kmax", kmax)):
        _checks.contiguous(name, _checks.array(name, x, np.uint16, 3))
    _checks.shape("kmax", kmax, kmin.shape)
    p, hkv, kd = kmin.shape
    if kd != d or hq % hkv:
        raise ValueError(f"kmin must be [P, Hkv, d={d}] with Hkv dividing {hq}; got {kmin.shape}")
    max_blocks = _checks.tables(block_tables, seq_lens, b)
    _checks.seq_len_values(seq_lens, max_blocks)
    num_threads = _checks.positive_int("num_threads", num_threads)
    out = np.empty((b, hq, max_blocks), dtype=np.float32)
    scale, avx2 = _checks.finite_scale(scale), _checks.resolve_isa(isa, d) >= 1
    bad = (_selection.quest_scores(q, kmin, kmax, block_tables, seq_lens, scale, num_threads, avx2, out)
           if team is None else team.native.quest_scores(q, kmin, kmax, block_tables, seq_lens, scale, avx2, out))
    if bad >= 0:
        rb, j = divmod(bad, max_blocks)
        raise IndexError(f"block_tables[{rb}, {j}] = {int(block_tables[rb, j])} is outside the "
                         f"metadata's {p} pages")
    return out


def quest_scores(q: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, scale: float, *,
                 num_threads: int, isa: Isa = "auto") -> np.ndarray:
    """KERNEL_API form: one request's ``q [Hq, d]`` and metadata ``[nb, Hkv, d]`` in logical
    order -> ``f32 [Hq, nb]``."""
    _checks.array("q", q, np.float32, 2)
    _checks.array("kmin", kmin, np.uint16, 3)
    nb = kmin.shape[0]
    table = np.arange(nb, dtype=np.int32)[None]
    lens = np.array([nb * BLOCK_TOKENS], dtype=np.int32)
    return quest_scores_paged(np.ascontiguousarray(q)[None], kmin, kmax, table, lens, scale,
                              num_threads=num_threads, isa=isa)[0]


def _per_row(name: str, value, rows: int, dtype) -> np.ndarray:
    arr = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=dtype), (rows,)))
    if arr.shape != (rows,):
        raise ValueError(f"{name} must be a scalar or have one value per row ({rows})")
    return arr


def _rows(scores: np.ndarray, row_lens) -> tuple[np.ndarray, np.ndarray]:
    _checks.contiguous("scores", _checks.array("scores", scores, np.float32, 2))
    rows, n = scores.shape
    if row_lens is None:
        return scores, np.full(rows, n, dtype=np.int32)
    lens = _per_row("row_lens", row_lens, rows, np.int32)
    if np.any(lens < 0) or np.any(lens > n):
        raise ValueError(f"row_lens must lie in [0, {n}]")
    return scores, lens


def select_topk(scores: np.ndarray, k, *, num_threads: int, row_lens=None,
                team: AttentionTeam | None = None) -> Selection:
    """Per row of ``scores f32 [R, n]`` the ``k`` (scalar or ``[R]``) highest of the first
    ``row_lens[r]`` entries, as CSR with ids ascending (reference.select_topk); ``team`` as in
    ``quest_scores_paged``."""
    scores, lens = _rows(scores, row_lens)
    ks = _per_row("k", k, scores.shape[0], np.int64)
    if np.any(ks < 0):
        raise ValueError("k must be >= 0")
    indptr = np.empty(scores.shape[0] + 1, dtype=np.int32)
    ids = np.empty(int(np.minimum(ks, lens).sum()), dtype=np.int32)
    threads = _checks.positive_int("num_threads", num_threads)
    nnz = (_selection.topk_rows(scores, lens, ks, threads, indptr, ids) if team is None
           else team.native.topk_rows(scores, lens, ks, indptr, ids))
    return Selection(indptr, ids[:nnz])


def select_topp(scores: np.ndarray, p, *, num_threads: int, row_lens=None,
                team: AttentionTeam | None = None) -> Selection:
    """Per row the fewest highest entries whose softmax mass reaches ``p`` (scalar or ``[R]``,
    in (0, 1]), as CSR with ids ascending (reference.select_topp); ``team`` as in
    ``quest_scores_paged``."""
    scores, lens = _rows(scores, row_lens)
    ps = _per_row("p", p, scores.shape[0], np.float64)
    if np.any(~(ps > 0)) or np.any(ps > 1):
        raise ValueError(f"top-p mass must be in (0, 1]; got {ps.min()}..{ps.max()}")
    indptr = np.empty(scores.shape[0] + 1, dtype=np.int32)
    ids = np.empty(int(lens.sum()), dtype=np.int32)
    threads = _checks.positive_int("num_threads", num_threads)
    nnz = (_selection.topp_rows(scores, lens, ps, threads, indptr, ids) if team is None
           else team.native.topp_rows(scores, lens, ps, indptr, ids))
    return Selection(indptr, ids[:nnz])


def token_scores(q: np.ndarray, kv_pages: np.ndarray, block_tables: np.ndarray,
                 seq_lens: np.ndarray, sel_indptr: np.ndarray, sel_blocks: np.ndarray,
                 scale: float, *, num_threads: int, isa: Isa = "auto") -> np.ndarray:
    """Exact token scores inside the candidate blocks: ``f32 [nnz, 16]``, entry ``[i, t]`` the
    max over the KV head's query heads of ``q.k * scale`` for token t of selected block i;
    -inf for padding past the sequence. Reads K only."""
    return _per_selected_block(_attention.token_scores, False, q, kv_pages, block_tables, seq_lens,
                               sel_indptr, sel_blocks, scale, num_threads, isa)


def candidate_lse(q: np.ndarray, kv_pages: np.ndarray, block_tables: np.ndarray,
                  seq_lens: np.ndarray, sel_indptr: np.ndarray, sel_blocks: np.ndarray,
                  scale: float, *, num_threads: int, isa: Isa = "auto") -> np.ndarray:
    """The rescoring stage's exact scores (``policy.select.candidate_lse``): ``f32 [nnz, g]``,
    entry ``[i, j]`` the log-sum-exp of ``q.k * scale`` over the tokens of selected block i for
    query head j of its KV head's group. Reads K only, once per block."""
    return _per_selected_block(_attention.candidate_lse, True, q, kv_pages, block_tables, seq_lens,
                               sel_indptr, sel_blocks, scale, num_threads, isa)


def _per_selected_block(kernel, per_query_head: bool, q, kv_pages, block_tables, seq_lens, sel_indptr,
                        sel_blocks, scale, num_threads, isa) -> np.ndarray:
    """``kernel``'s scores of the selected blocks, arguments checked first: ``f32 [nnz, g]``
    (``per_query_head``) or ``f32 [nnz, 16]``."""
    dims = _checks.arena(q, kv_pages, block_tables, seq_lens)
    _checks.selection(sel_indptr, sel_blocks, dims.batch * dims.num_kv_heads)
    width = q.shape[1] // dims.num_kv_heads if per_query_head else BLOCK_TOKENS
    out = np.empty((sel_blocks.shape[0], width), dtype=np.float32)
    bad = kernel(q, kv_pages, block_tables, seq_lens, sel_indptr, sel_blocks, _checks.finite_scale(scale),
                 _checks.positive_int("num_threads", num_threads), _checks.resolve_isa(isa, dims.head_dim), out)
    if bad >= 0:
        raise _checks.bad_block(sel_indptr, sel_blocks, bad, dims, block_tables, seq_lens)
    return out


def select_tokens_topk(tok_scores: np.ndarray, sel_indptr: np.ndarray, k, *,
                       num_threads: int) -> np.ndarray:
    """Per row the ``k`` (scalar or ``[R]``) best tokens among its candidate blocks' finite
    scores; returns ``uint16 [nnz]`` token masks for ``sparse_partial_attention(sel_masks=)``."""
    _checks.contiguous("tok_scores", _checks.array("tok_scores", tok_scores, np.float32, 2))
    if tok_scores.shape[1] != BLOCK_TOKENS:
        raise ValueError(f"tok_scores must be [nnz, {BLOCK_TOKENS}]; got {tok_scores.shape}")
    _checks.array("sel_indptr", sel_indptr, np.int32, 1)
    rows = max(sel_indptr.shape[0] - 1, 0)
    _checks.csr("sel", sel_indptr, rows, tok_scores.shape[0])
    ks = _per_row("k", k, rows, np.int64)
    if np.any(ks < 0):
        raise ValueError("k must be >= 0")
    masks = np.empty(tok_scores.shape[0], dtype=np.uint16)
    _selection.topk_tokens(tok_scores, sel_indptr, ks, _checks.positive_int("num_threads", num_threads),
                           masks)
    return masks
