"""append_kv on the GPU: the token lands in its cache slot and arena page, the page's Quest
metadata equals the reference's over the block so far, and seq_lens moves by one."""

from __future__ import annotations

import numpy as np
import pytest

from tests import gpu_util

gpu_util.skip_unless_gpu()

import cupy as cp  # noqa: E402

from fluxion_dist.attention import reference  # noqa: E402
from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks, to_bf16_bits  # noqa: E402
from fluxion_dist.kernels.append import append_kv  # noqa: E402
from fluxion_dist.kernels.uva import pinned_empty  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("hkv,d", [(2, 128), (8, 128), (1, 64)])
@pytest.mark.parametrize("arena_in", ["uva", "device"])
def test_append_steps(hkv: int, d: int, arena_in: str):
    rng, seed = gpu_util.fresh_rng()
    start = np.array([0, 15, 16, 1000, 33], np.int32)  # empty, block ends, block starts
    steps = 19
    batch = gpu_util.make_paged_batch(rng, np.maximum(start, 1), hkv, d, spare_pages=0)
    bsz = start.size
    final = start + steps
    # Map every block the appends will reach to fresh pages that hold garbage (NaN), and give
    # every (request, block, head) a cache slot that also holds garbage.
    total_blocks = max(num_blocks(int(t)) for t in final)
    tables = np.full((bsz, total_blocks + 1), gpu_util.UNMAPPED_PAGE, np.int32)
    pages = batch.kv_pages.shape[0]
    grown = np.full((pages + bsz * total_blocks, hkv, 2, BLOCK_TOKENS, d), gpu_util.BF16_NAN, np.uint16)
    grown[:pages] = batch.kv_pages
    kmin = np.full((grown.shape[0], hkv, d), gpu_util.BF16_NAN, np.uint16)
    kmax = kmin.copy()
    kmin[:pages], kmax[:pages] = batch.kmin, batch.kmax
    nxt = pages
    for b in range(bsz):
        have = num_blocks(int(start[b]))
        tables[b, :have] = batch.block_tables[b, :have]
        for j in range(have, num_blocks(int(final[b]))):
            tables[b, j] = nxt
            nxt += 1
    slot_of = rng.permutation(bsz * total_blocks * hkv).reshape(bsz, total_blocks, hkv).astype(np.int32)
    pool = cp.full((slot_of.size, 2, BLOCK_TOKENS, d), gpu_util.BF16_NAN, cp.uint16)

    if arena_in == "uva":
        host, arena = pinned_empty(grown.shape, np.uint16)
        host[...] = grown
    else:
        host, arena = None, cp.asarray(grown)
    d_kmin, d_kmax = cp.asarray(kmin), cp.asarray(kmax)
    d_tables, d_lens = cp.asarray(tables), cp.asarray(start)

    keys = [list(batch.k[b][: start[b]]) for b in range(bsz)]
    vals = [list(batch.v[b][: start[b]]) for b in range(bsz)]
    for _ in range(steps):
        k_new = gpu_util.bf16_round(rng.standard_normal((bsz, hkv, d)).astype(np.float32))
        v_new = gpu_util.bf16_round(rng.standard_normal((bsz, hkv, d)).astype(np.float32))
        pos = cp.asnumpy(d_lens)
        slots = np.stack([slot_of[b, pos[b] // BLOCK_TOKENS] for b in range(bsz)])
        append_kv(cp.asarray(to_bf16_bits(k_new)), cp.asarray(to_bf16_bits(v_new)), d_lens, d_tables,
                  d_kmin, d_kmax, slots=cp.asarray(slots), cache_pool=pool, kv_pages=arena)
        for b in range(bsz):
            keys[b].append(k_new[b])
            vals[b].append(v_new[b])

    assert cp.asnumpy(d_lens).tolist() == final.tolist(), f"seed={seed}"
    cp.cuda.Device().synchronize()  # the host view of a UVA arena is read directly
    got_arena = host if host is not None else cp.asnumpy(arena)
    got_pool, got_min, got_max = cp.asnumpy(pool), cp.asnumpy(d_kmin), cp.asnumpy(d_kmax)
    for b in range(bsz):
        k = np.stack(keys[b])
        v = np.stack(vals[b])
        lo, hi = reference.block_metadata(k)
        for j in range(num_blocks(int(final[b]))):
            page = tables[b, j]
            t0, t1 = j * BLOCK_TOKENS, min((j + 1) * BLOCK_TOKENS, int(final[b]))
            where = f"seed={seed} request={b} block={j}"
            np.testing.assert_array_equal(got_arena[page, :, 0, : t1 - t0], to_bf16_bits(k[t0:t1]).transpose(1, 0, 2), where)
            np.testing.assert_array_equal(got_arena[page, :, 1, : t1 - t0], to_bf16_bits(v[t0:t1]).transpose(1, 0, 2), where)
            np.testing.assert_array_equal(got_min[page], to_bf16_bits(lo[j]), where)
            np.testing.assert_array_equal(got_max[page], to_bf16_bits(hi[j]), where)
            # The cache slot holds exactly the tokens appended into it.
            a0 = max(t0, int(start[b]))
            if a0 < t1:
                for kh in range(hkv):
                    run = got_pool[slot_of[b, j, kh]]
                    np.testing.assert_array_equal(run[0, a0 - t0: t1 - t0], to_bf16_bits(k[a0:t1, kh]), where)
                    np.testing.assert_array_equal(run[1, a0 - t0: t1 - t0], to_bf16_bits(v[a0:t1, kh]), where)
