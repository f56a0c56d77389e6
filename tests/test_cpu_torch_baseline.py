"""The benchmark's torch baseline computes the same partials as the kernel and the reference."""

from __future__ import annotations

import numpy as np

from fluxion_dist.cpu.attention import sparse_partial_attention
from fluxion_dist.cpu.synthetic_arena import paged_batch, random_selection
from fluxion_dist.cpu.torch_baseline import torch_sparse_partial_attention


def test_torch_baseline_agrees_with_kernel():
    rng = np.random.default_rng(17)
    batch = paged_batch(rng, [1000, 17, 1], 4, 4, 64, spare_pages=5)
    indptr, blocks = random_selection(rng, batch.seq_lens, 4, ["all", "empty", 0.3, "one"] * 3)
    args = (batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens, indptr, blocks, 0.125)
    ours = sparse_partial_attention(*args, num_threads=2)
    base = torch_sparse_partial_attention(*args, num_threads=2)
    np.testing.assert_array_equal(np.isfinite(base.m), np.isfinite(ours.m))
    live = np.isfinite(ours.m)
    np.testing.assert_allclose(base.m[live], ours.m[live], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(base.l[live], ours.l[live], rtol=1e-4)
    np.testing.assert_allclose(base.o[live] / base.l[live, None], ours.o[live] / ours.l[live, None],
                               rtol=1e-4, atol=2e-5)
    assert np.all(base.l[~live] == 0) and np.all(base.o[~live] == 0)
