"""Sparse partial attention on the GPU (device arena, UVA host arena, GPU block cache)
against the float64 reference, and the whole decode pipeline against full attention."""

from __future__ import annotations

import numpy as np
import pytest

from tests import gpu_util

gpu_util.skip_unless_gpu()

import cupy as cp  # noqa: E402

from fluxion_dist.attention import reference  # noqa: E402
from fluxion_dist.kernels.attention import sparse_partial_attention  # noqa: E402
from fluxion_dist.kernels.merge import merge_attention  # noqa: E402
from fluxion_dist.kernels.scoring import quest_scores  # noqa: E402
from fluxion_dist.kernels.selection import select_topk  # noqa: E402
from fluxion_dist.kernels.uva import map_host_array, pinned_empty  # noqa: E402

pytestmark = pytest.mark.gpu

HEADS = [(2, 1, 128), (2, 4, 128), (1, 8, 128), (2, 4, 64), (4, 2, 128)]


def _random_selection(rng, batch) -> list[list[np.ndarray]]:
    """Per request and KV head: empty, everything, the last (partial) block, or a random subset."""
    out = []
    for b in range(len(batch.seq_lens)):
        nb = batch.blocks(b)
        per_head = []
        for _ in range(batch.num_kv_heads):
            kind = rng.integers(4)
            if kind == 0:
                ids = np.zeros(0, np.int64)
            elif kind == 1:
                ids = np.arange(nb)
            else:
                ids = np.flatnonzero(rng.random(nb) < rng.uniform(0.05, 0.6))
                if kind == 3:
                    ids = np.union1d(ids, [nb - 1])
            per_head.append(ids.astype(np.int64))
        out.append(per_head)
    return out


def _csr(selection) -> tuple[np.ndarray, np.ndarray, int]:
    rows = [ids for per_head in selection for ids in per_head]
    indptr = np.zeros(len(rows) + 1, np.int32)
    indptr[1:] = np.cumsum([r.size for r in rows])
    blocks = np.concatenate(rows).astype(np.int32) if indptr[-1] else np.zeros(1, np.int32)
    return indptr, blocks, max(r.size for r in rows)


def _arena(batch, where: str) -> cp.ndarray:
    if where == "device":
        return cp.asarray(batch.kv_pages)
    host, dev = pinned_empty(batch.kv_pages.shape, np.uint16)
    host[...] = batch.kv_pages
    return dev


def _cache_some(rng, batch, selection, indptr, blocks):
    """Copy about half of the selected (block, head) runs into random cache slots and NaN
    their arena copies, so the result is right only if the kernel reads the cache."""
    nnz = int(indptr[-1])
    slots = np.full(blocks.shape, -1, np.int32)
    cached = np.flatnonzero(rng.random(nnz) < 0.5)
    pool = np.full((cached.size + 5, 2, 16, batch.kv_pages.shape[-1]), gpu_util.BF16_NAN, np.uint16)
    slot_ids = rng.permutation(pool.shape[0])[: cached.size].astype(np.int32)
    hkv = batch.num_kv_heads
    kv_pages = batch.kv_pages.copy()
    for e, slot in zip(cached, slot_ids):
        row = int(np.searchsorted(indptr, e, side="right") - 1)
        b, kh = divmod(row, hkv)
        page = batch.block_tables[b, blocks[e]]
        pool[slot] = batch.kv_pages[page, kh]
        kv_pages[page, kh] = gpu_util.BF16_NAN
        slots[e] = slot
    return slots, pool, kv_pages


def _check_partial(got, batch, q, selection, scale, msg):
    o, m, l = (cp.asnumpy(a) for a in got)
    g = q.shape[1] // batch.num_kv_heads
    for b in range(len(batch.seq_lens)):
        ref = reference.partial_attention(q[b], batch.k[b], batch.v[b], selection[b], scale=scale)
        for h in range(q.shape[1]):
            where = f"{msg} request={b} head={h} blocks={selection[b][h // g].size}"
            if ref.l[h] == 0:
                assert m[b, h] == -np.inf and l[b, h] == 0 and np.all(o[b, h] == 0), where
                continue
            assert abs(m[b, h] - ref.m[h]) <= 1e-5 * max(1.0, abs(ref.m[h])), where
            lse, ref_lse = m[b, h] + np.log(l[b, h]), ref.m[h] + np.log(ref.l[h])
            assert abs(lse - ref_lse) < 1e-4, f"{where}: lse {lse} vs {ref_lse}"
            err = gpu_util.rel_err(o[b, h] / l[b, h], ref.o[h] / ref.l[h])
            assert err < 1e-4, f"{where}: relative error {err}"


@pytest.mark.parametrize("hkv,group,d", HEADS)
@pytest.mark.parametrize("where", ["device", "uva", "cache+uva"])
@pytest.mark.parametrize("chunk", [None, 4, 1024])
def test_sparse_partial_attention_matches_reference(hkv, group, d, where, chunk):
    rng, seed = gpu_util.fresh_rng()
    batch = gpu_util.make_paged_batch(rng, gpu_util.AWKWARD_SEQ_LENS, hkv, d)
    bsz, hq = len(batch.seq_lens), hkv * group
    q = rng.standard_normal((bsz, hq, d)).astype(np.float32)
    scale = float(reference.default_scale(d)) * rng.uniform(0.5, 2.0)
    selection = _random_selection(rng, batch)
    indptr, blocks, longest = _csr(selection)

    extra = {}
    if where == "cache+uva":
        slots, pool, kv_pages = _cache_some(rng, batch, selection, indptr, blocks)
        host, arena = pinned_empty(kv_pages.shape, np.uint16)
        host[...] = kv_pages
        extra = dict(sel_slot=cp.asarray(slots), cache_pool=cp.asarray(pool))
    else:
        arena = _arena(batch, where)
    out = (cp.full((bsz, hq, d), np.nan, cp.float32), cp.full((bsz, hq), np.nan, cp.float32),
           cp.full((bsz, hq), np.nan, cp.float32))
    got = sparse_partial_attention(
        cp.asarray(q), arena, cp.asarray(batch.block_tables), cp.asarray(batch.seq_lens),
        cp.asarray(indptr), cp.asarray(blocks), scale=scale, max_row_blocks=longest,
        chunk=chunk, out=out, **extra)
    _check_partial(got, batch, q, selection, scale, f"seed={seed} {where} chunk={chunk}")


def test_partial_over_mapped_numpy_arena():
    """An existing NumPy arena (as the KV store holds it), page-locked and read through UVA."""
    rng, seed = gpu_util.fresh_rng()
    batch = gpu_util.make_paged_batch(rng, [3000, 17], 2, 128)
    q = rng.standard_normal((2, 8, 128)).astype(np.float32)
    selection = _random_selection(rng, batch)
    indptr, blocks, longest = _csr(selection)
    arena = map_host_array(batch.kv_pages)
    got = sparse_partial_attention(
        cp.asarray(q), arena, cp.asarray(batch.block_tables), cp.asarray(batch.seq_lens),
        cp.asarray(indptr), cp.asarray(blocks), scale=0.09, max_row_blocks=longest)
    _check_partial(got, batch, q, selection, 0.09, f"seed={seed} mapped")


@pytest.mark.parametrize("hkv,group", [(2, 4), (8, 1), (1, 8)])
def test_decode_pipeline_equals_full_attention(hkv, group):
    """Score -> top-k -> GPU partial over the selected blocks (half cached, half UVA) + a
    'CPU' partial (the reference) over every other block -> merge == full attention."""
    rng, seed = gpu_util.fresh_rng()
    d = 128
    batch = gpu_util.make_paged_batch(rng, [1, 17, 1000, 4099], hkv, d)
    bsz, hq = len(batch.seq_lens), hkv * group
    q = rng.standard_normal((bsz, hq, d)).astype(np.float32)
    scale = float(reference.default_scale(d))
    dev = dict(block_tables=cp.asarray(batch.block_tables), seq_lens=cp.asarray(batch.seq_lens))

    _, kv_scores = quest_scores(cp.asarray(q), cp.asarray(batch.kmin), cp.asarray(batch.kmax),
                                scale=scale, **dev)
    sel = select_topk(kv_scores, dev["seq_lens"], 13)
    indptr, blocks = cp.asnumpy(sel.indptr), cp.asnumpy(sel.blocks)
    gpu_rows = gpu_util.csr_rows(indptr, blocks)
    selection = [gpu_rows[b * hkv:(b + 1) * hkv] for b in range(bsz)]
    rest = [[np.setdiff1d(np.arange(batch.blocks(b)), ids) for ids in selection[b]] for b in range(bsz)]

    slots, pool, kv_pages = _cache_some(rng, batch, selection, indptr, blocks)
    host, arena = pinned_empty(kv_pages.shape, np.uint16)
    host[...] = kv_pages
    parts_o = cp.full((2, bsz, hq, d), np.nan, cp.float32)
    parts_m = cp.full((2, bsz, hq), np.nan, cp.float32)
    parts_l = cp.full((2, bsz, hq), np.nan, cp.float32)
    sparse_partial_attention(cp.asarray(q), arena, dev["block_tables"], dev["seq_lens"], sel.indptr,
                             sel.blocks, scale=scale, max_row_blocks=sel.max_row_blocks,
                             sel_slot=cp.asarray(slots), cache_pool=cp.asarray(pool),
                             out=(parts_o[0], parts_m[0], parts_l[0]))
    for b in range(bsz):
        cpu = reference.partial_attention(q[b], batch.k[b], batch.v[b], rest[b], scale=scale)
        parts_o[1, b] = cp.asarray(cpu.o.astype(np.float32))
        parts_m[1, b] = cp.asarray(cpu.m.astype(np.float32))
        parts_l[1, b] = cp.asarray(cpu.l.astype(np.float32))
    out = merge_attention(parts_o, parts_m, parts_l, out_dtype="float32",
                          out=cp.full((bsz, hq, d), np.nan, cp.float32))
    got = cp.asnumpy(out)
    for b in range(bsz):
        ref = reference.decode_attention(q[b], batch.k[b], batch.v[b], scale)
        err = gpu_util.rel_err(got[b], ref)
        assert err < 1e-4, f"seed={seed} request={b}: relative error {err}"


def test_repeated_split_launches_agree():
    """Split-K rows go through the chunk scratch and merge.cu's launch: back-to-back launches on
    one stream reuse that scratch and give the same answer."""
    rng, seed = gpu_util.fresh_rng()
    batch = gpu_util.make_paged_batch(rng, [5000, 333], 2, 128)
    q = cp.asarray(rng.standard_normal((2, 8, 128)).astype(np.float32))
    selection = [[np.arange(batch.blocks(b)) for _ in range(2)] for b in range(2)]
    indptr, blocks, longest = _csr(selection)
    args = (q, cp.asarray(batch.kv_pages), cp.asarray(batch.block_tables), cp.asarray(batch.seq_lens),
            cp.asarray(indptr), cp.asarray(blocks))
    first = [cp.asnumpy(a) for a in sparse_partial_attention(*args, scale=0.1, max_row_blocks=longest, chunk=4)]
    _check_partial([cp.asarray(a) for a in first], batch, cp.asnumpy(q), selection, 0.1, f"seed={seed}")
    for _ in range(3):
        again = sparse_partial_attention(*args, scale=0.1, max_row_blocks=longest, chunk=4)
        for a, b in zip(again, first):
            np.testing.assert_array_equal(cp.asnumpy(a), b)


def test_rejects_mismatched_cache_arguments():
    q = cp.zeros((1, 8, 128), cp.float32)
    arena = cp.zeros((2, 2, 2, 16, 128), cp.uint16)
    with pytest.raises(ValueError, match="come together"):
        sparse_partial_attention(q, arena, cp.zeros((1, 2), cp.int32), cp.ones(1, cp.int32),
                                 cp.zeros(3, cp.int32), cp.zeros(1, cp.int32), scale=1.0,
                                 max_row_blocks=1, sel_slot=cp.zeros(1, cp.int32))
