"""The torch-CPU baseline of sparse partial attention: gather the selected pages, then bmm.

What a straightforward implementation does with the same inputs as
``fluxion_dist.cpu.attention.sparse_partial_attention``: one advanced-indexing
gather copies every selected (page, head) run out of the arena (bf16), rows are
padded to the longest selection, and two batched matmuls in fp32 (torch's CPU
bf16 matmul is slower without AMX) give scores and output. Same thread count,
same result. Used by scripts/bench_cpu_attention.py and checked in the tests.
"""

from __future__ import annotations

import numpy as np
import torch

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.cpu import _checks
from fluxion_dist.cpu.attention import BatchPartial


def torch_sparse_partial_attention(q: np.ndarray, kv_pages: np.ndarray, block_tables: np.ndarray,
                                   seq_lens: np.ndarray, sel_indptr: np.ndarray,
                                   sel_blocks: np.ndarray, scale: float, *,
                                   num_threads: int) -> BatchPartial:
    dims = _checks.arena(q, kv_pages, block_tables, seq_lens)
    b, hq, hkv, d = dims.batch, dims.num_q_heads, dims.num_kv_heads, dims.head_dim
    rows, g = b * hkv, hq // hkv
    _checks.selection(sel_indptr, sel_blocks, rows)
    previous = torch.get_num_threads()
    torch.set_num_threads(_checks.positive_int("num_threads", num_threads))
    try:
        lens = np.diff(sel_indptr)
        width = max(int(lens.max()), 1)
        slot = np.arange(width)[None, :]
        used = slot < lens[:, None]  # [rows, width]
        flat = np.where(used, sel_indptr[:-1, None] + slot, 0)
        blocks = np.where(used, sel_blocks[flat] if sel_blocks.size else 0, 0)
        req = np.arange(rows) // hkv
        pages = torch.from_numpy(block_tables[req[:, None], blocks].astype(np.int64))
        heads = torch.from_numpy((np.arange(rows) % hkv).astype(np.int64))[:, None]
        kv = torch.from_numpy(kv_pages).view(torch.bfloat16)[pages, heads]  # [rows, width, 2, 16, d]
        k = kv[:, :, 0].reshape(rows, width * BLOCK_TOKENS, d).float()
        v = kv[:, :, 1].reshape(rows, width * BLOCK_TOKENS, d).float()
        pos = torch.from_numpy(blocks)[:, :, None] * BLOCK_TOKENS + torch.arange(BLOCK_TOKENS)
        valid = torch.from_numpy(used)[:, :, None] & (pos < torch.from_numpy(seq_lens[req])[:, None, None])
        if not bool(valid.all()):  # padding may hold anything, NaN included: 0 * NaN is NaN
            v.masked_fill_(~valid.reshape(rows, -1, 1), 0.0)
        qg = torch.from_numpy(q).reshape(rows, g, d)
        s = torch.bmm(qg, k.transpose(1, 2)) * scale  # [rows, g, width*16]
        s.masked_fill_(~valid.reshape(rows, 1, -1), float("-inf"))
        m = s.amax(dim=-1)
        p = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0)[..., None])
        o = torch.bmm(p, v)
        return BatchPartial(o.reshape(b, hq, d).numpy(), m.reshape(b, hq).numpy(),
                            p.sum(dim=-1).reshape(b, hq).numpy())
    finally:
        torch.set_num_threads(previous)
