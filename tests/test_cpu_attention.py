"""The CPU sparse partial attention against the float64 reference.

Awkward sizes (1, 15, 16, 17, 1000+ tokens), GQA groups 1, 4 and 8, empty /
one-block / all-block / random selections, pages scattered through a larger
arena whose unused bytes are NaN, both kernel bodies, several thread counts.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fluxion_dist.attention import reference as ref
from fluxion_dist.cpu._checks import ISA_HEAD_DIM
from fluxion_dist.cpu.attention import sparse_partial_attention
from tests.cpu_util import ISAS
from fluxion_dist.cpu.synthetic_arena import paged_batch, random_selection



def rows_of(indptr, blocks, hkv, b):
    return [blocks[indptr[b * hkv + kh]:indptr[b * hkv + kh + 1]] for kh in range(hkv)]


def assert_matches_reference(batch, indptr, blocks, out, scale, masks=None):
    hkv = batch.kv_pages.shape[1]
    for b in range(len(batch.seq_lens)):
        k, v = batch.request_kv(b)
        sel = rows_of(indptr, blocks, hkv, b)
        if masks is None:
            want = ref.partial_attention(batch.q[b], k, v, sel, scale=scale)
        else:  # token granularity: the reference with 1-token blocks over the kept tokens
            mrows = rows_of(indptr, masks, hkv, b)
            toks = [np.array([blk * 16 + t for blk, mk in zip(s, mr) for t in range(16) if mk >> t & 1],
                             dtype=np.int64) for s, mr in zip(sel, mrows)]
            want = ref.partial_attention(batch.q[b], k, v, toks, block_tokens=1, scale=scale)
        o, m, l = out.o[b], out.m[b], out.l[b]
        empty = ~np.isfinite(want.m)
        assert np.all(m[empty] == -np.inf) and np.all(l[empty] == 0) and np.all(o[empty] == 0)
        live = ~empty
        np.testing.assert_allclose(m[live], want.m[live], rtol=1e-5, atol=1e-5)
        # o and l are relative to exp(m): compare them normalised to the same max.
        np.testing.assert_allclose(l[live], want.l[live], rtol=2e-5)
        np.testing.assert_allclose(o[live] / l[live, None], want.o[live] / want.l[live, None],
                                   rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batch_matches_reference(isa, group, threads):
    rng = np.random.default_rng([group, threads, len(isa)])
    hkv, d = 2, 128
    lens = [1, 15, 17, 1000, 16, 1037]
    batch = paged_batch(rng, lens, hkv, group, d, spare_pages=9, spare_columns=3)
    # per row: every kind of list, long and short mixed
    kinds = ["empty", "one", "all", 0.3, "all", 0.5, 0.05, "one", "all", "all", "one", 0.7]
    indptr, blocks = random_selection(rng, batch.seq_lens, hkv, kinds)
    scale = 1 / np.sqrt(d)
    out = sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens,
                                   indptr, blocks, scale, num_threads=threads, isa=isa)
    assert_matches_reference(batch, indptr, blocks, out, scale)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 1000, 4111])
@pytest.mark.parametrize("budget", ["one", "all", 0.25])
def test_single_request_sizes(isa, seq_len, budget):
    rng = np.random.default_rng([seq_len, len(str(budget))])
    batch = paged_batch(rng, [seq_len], 8, 4, 128, spare_pages=5)
    indptr, blocks = random_selection(rng, batch.seq_lens, 8, budget)
    out = sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens,
                                   indptr, blocks, 0.1, num_threads=2, isa=isa)
    assert_matches_reference(batch, indptr, blocks, out, 0.1)


def _head_dim_cases():
    """(isa, head_dim) pairs a body supports (its width divides head_dim), each with the
    body's CPU-feature skip; ``auto`` takes every head_dim."""
    cases = []
    for head_dim in (16, 48, 64, 256):
        for isa in ISAS + ["auto"]:
            name, marks = (isa, ()) if isinstance(isa, str) else (isa.values[0], isa.marks)
            if name == "auto" or head_dim % ISA_HEAD_DIM[name] == 0:
                cases.append(pytest.param(name, head_dim, marks=marks, id=f"{name}-{head_dim}"))
    return cases


@pytest.mark.parametrize("isa,head_dim", _head_dim_cases())
def test_other_head_dims(isa, head_dim):
    rng = np.random.default_rng(head_dim)
    batch = paged_batch(rng, [300, 33], 2, 3, head_dim, spare_pages=2)
    indptr, blocks = random_selection(rng, batch.seq_lens, 2, 0.6)
    out = sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens,
                                   indptr, blocks, 0.2, num_threads=2, isa=isa)
    assert_matches_reference(batch, indptr, blocks, out, 0.2)


def test_odd_head_dim_runs_portable_body():
    rng = np.random.default_rng(5)
    batch = paged_batch(rng, [40], 1, 2, 24)
    indptr, blocks = random_selection(rng, batch.seq_lens, 1, "all")
    out = sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens,
                                   indptr, blocks, 0.2, num_threads=1)  # auto picks scalar
    assert_matches_reference(batch, indptr, blocks, out, 0.2)


@pytest.mark.parametrize("isa", ISAS)
def test_thread_counts_and_chunking_agree(isa):
    rng = np.random.default_rng(11)
    batch = paged_batch(rng, [5000, 70, 2100], 8, 4, 128, spare_pages=17)
    indptr, blocks = random_selection(rng, batch.seq_lens, 8, 0.4)
    args = (batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens, indptr, blocks, 0.09)
    base = sparse_partial_attention(*args, num_threads=1, isa=isa)
    for threads, cpt in [(2, 4), (3, 1), (4, 4), (7, 16), (16, 2)]:
        got = sparse_partial_attention(*args, num_threads=threads, isa=isa, chunks_per_thread=cpt)
        np.testing.assert_allclose(got.m, base.m, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got.l, base.l, rtol=1e-5)
        np.testing.assert_allclose(got.o / got.l[..., None], base.o / base.l[..., None],
                                   rtol=1e-4, atol=1e-6)
    again = sparse_partial_attention(*args, num_threads=3, isa=isa)
    same = sparse_partial_attention(*args, num_threads=3, isa=isa)
    assert all(np.array_equal(x, y) for x, y in zip(again, same)), "fixed threads must be deterministic"


@pytest.mark.parametrize("isa", ISAS)
def test_token_masks(isa):
    rng = np.random.default_rng(3)
    batch = paged_batch(rng, [257, 1000], 4, 2, 64, spare_pages=3)
    indptr, blocks = random_selection(rng, batch.seq_lens, 4, 0.5)
    masks = rng.integers(0, 1 << 16, size=blocks.shape, dtype=np.uint16)
    masks[::7] = 0  # whole blocks dropped
    masks[1::7] = 0xFFFF
    out = sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens,
                                   indptr, blocks, 0.125, num_threads=2, sel_masks=masks, isa=isa)
    assert_matches_reference(batch, indptr, blocks, out, 0.125, masks=masks)


def test_all_rows_empty():
    rng = np.random.default_rng(0)
    batch = paged_batch(rng, [50, 0], 2, 4, 32)
    indptr = np.zeros(5, np.int32)
    out = sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens,
                                   indptr, np.zeros(0, np.int32), 0.1, num_threads=2)
    assert np.all(out.m == -np.inf) and np.all(out.l == 0) and np.all(out.o == 0)


def test_rejects_bad_arguments():
    rng = np.random.default_rng(1)
    batch = paged_batch(rng, [40], 2, 2, 16, spare_pages=1)
    indptr, blocks = random_selection(rng, batch.seq_lens, 2, "all")
    args = dict(q=batch.q, kv_pages=batch.kv_pages, block_tables=batch.block_tables,
                seq_lens=batch.seq_lens, sel_indptr=indptr, sel_blocks=blocks, scale=0.1)

    def call(**change):
        return sparse_partial_attention(**{**args, **change}, num_threads=1)

    with pytest.raises(TypeError, match="kv_pages must have dtype uint16"):
        call(kv_pages=batch.kv_pages.view(np.float16))
    with pytest.raises(ValueError, match="q must be C-contiguous"):
        call(q=np.asfortranarray(batch.q))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        call(q=batch.q[:, :3].copy())
    with pytest.raises(ValueError, match="sel_indptr must rise"):
        call(sel_indptr=indptr[::-1].copy())
    zigzag = indptr.copy()
    zigzag[1] = zigzag[2] + 1
    with pytest.raises(ValueError, match="sel_indptr must not decrease"):
        call(sel_indptr=zigzag)
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 10000 is outside \[0, 48\]"):
        call(seq_lens=np.array([10_000], np.int32))
    with pytest.raises(ValueError, match="kv_pages pages must each be contiguous"):
        call(kv_pages=batch.kv_pages[:, :, :, ::-1])
    bad = blocks.copy()
    bad[-1] = 3  # 40 tokens are 3 blocks: id 3 is past the end
    with pytest.raises(IndexError, match="outside the sequence's 3 blocks"):
        call(sel_blocks=bad)
    table = batch.block_tables.copy()
    table[0, 1] = 99
    with pytest.raises(IndexError, match="maps to page 99, outside the arena's 4 pages"):
        call(block_tables=table)
    with pytest.raises(ValueError, match="isa must be one of"):
        sparse_partial_attention(**args, num_threads=1, isa="neon")
    with pytest.raises(ValueError, match="head_dim a multiple of 32"):
        sparse_partial_attention(**args, num_threads=1, isa="avx512")  # d=16; or no AVX-512 here
    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        sparse_partial_attention(**args, num_threads=0)


def test_strided_views_are_read_in_place():
    """A layer slice of a bigger arena and a sub-table of a bigger block table need no copy."""
    rng = np.random.default_rng(8)
    batch = paged_batch(rng, [300, 77], 2, 4, 32, spare_pages=4)
    layers = np.stack([batch.kv_pages, batch.kv_pages[::-1]], axis=1)  # [P, L, Hkv, 2, 16, d]
    wide = np.full((4, batch.block_tables.shape[1] + 5), -1, np.int32)
    wide[:2, :batch.block_tables.shape[1]] = batch.block_tables
    indptr, blocks = random_selection(rng, batch.seq_lens, 2, 0.5)
    out = sparse_partial_attention(batch.q, layers[:, 0], wide[:2], batch.seq_lens, indptr, blocks,
                                   0.1, num_threads=2)
    assert_matches_reference(batch, indptr, blocks, out, 0.1)


def test_gil_is_released_during_the_kernel():
    rng = np.random.default_rng(2)
    batch = paged_batch(rng, [1024], 8, 4, 128, poison=False)
    # Long lists that revisit the same blocks: a call of a few hundred ms from little memory.
    reps = 16000
    blocks = np.tile(np.arange(64, dtype=np.int32), 8 * reps // 64)
    indptr = (np.arange(9) * reps).astype(np.int32)
    args = (batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens, indptr, blocks, 0.1)
    ticks: list[float] = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(time.perf_counter())

    worker = threading.Thread(target=count)
    worker.start()
    try:
        time.sleep(0.02)
        t0 = time.perf_counter()
        sparse_partial_attention(*args, num_threads=1)
        t1 = time.perf_counter()
    finally:
        stop.set()
        worker.join()
    assert t1 - t0 > 0.02, "the call must be long enough to tell"
    # Only the kernel's middle: argument checks may hand the GIL over at their edges.
    mid = [t for t in ticks if t0 + 0.25 * (t1 - t0) < t < t0 + 0.75 * (t1 - t0)]
    assert len(mid) > 100, f"another thread ran only {len(mid)} times during a {t1 - t0:.3f} s call"
