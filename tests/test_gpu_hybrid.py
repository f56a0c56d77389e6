"""The hybrid operator on the GPU (CuPy path: UVA reads, block cache, copy stream, GPU merge)
against the float64 reference, the CuPy path against its CPU stand-in, and the calibration.
Skipped with a reason where no GPU runs kernels."""

from __future__ import annotations

import numpy as np
import pytest

from tests import gpu_util

gpu_util.skip_unless_gpu()

import cupy as cp  # noqa: E402

from fluxion_dist.hybrid import (CostModel, EmulatedGpuPath, LayerInputs, BlockCacheTable,  # noqa: E402
                                 calibrate, split_layer)
from fluxion_dist.hybrid.gpu_backend import CupyGpuPath  # noqa: E402
from fluxion_dist.sparse.selection import BlockSelection  # noqa: E402
from tests.test_hybrid_operator import POLICIES, Decode  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("hkv,group,d", [(2, 1, 128), (2, 4, 128), (1, 8, 128), (2, 4, 64)])
@pytest.mark.parametrize("policy", POLICIES)
def test_budget_one_is_full_attention_on_the_gpu(policy, hkv, group, d):
    dec = Decode([1, 15, 17, 1000, 1333], hkv, group, d=d, seed=hkv * 10 + group + d)
    op = dec.operator(policy, "gpu")
    for step in range(4):
        outs, report = dec.step(op)
        for got, ref in outs:
            np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
        assert report.measured_gpu_idle_fraction is not None
        if policy == "fluxion" and step >= 2:
            assert report.gpu_cached_blocks > 0
    op.close()


@pytest.mark.parametrize("policy", ["fixed_hybrid", "fluxion", "quest_gpu"])
def test_sparse_gpu_equals_emulated(policy):
    """Same steps, same selections: the CuPy path and its CPU stand-in agree."""
    outs = {}
    for device in ("gpu", "emulated"):
        dec = Decode([3000, 777], 2, 4, d=128, seed=5, steps=4)
        op = dec.operator(policy, device, budget=0.1, mass=0.9)
        outs[device] = [got for _ in range(4) for got, _ in dec.step(op)[0]]
        op.close()
    for a, b in zip(outs["gpu"], outs["emulated"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_cupy_path_reads_slots_and_uva_like_the_stand_in():
    rng = np.random.default_rng(11)
    dec = Decode([900, 45], 2, 4, d=128, layers=1, steps=1, seed=11)
    kv = dec.arena.kv_pages
    table = BlockCacheTable(kv.shape[0], 2, 256)
    paths = {"gpu": CupyGpuPath(kv, 256, 1), "emu": EmulatedGpuPath(kv, 256)}
    seq_lens = np.array([s.seq_len for s in dec.seqs], np.int32)
    tables = np.zeros((2, max(len(s.block_tables[0]) for s in dec.seqs)), np.int32)
    for b, s in enumerate(dec.seqs):
        tables[b, :len(s.block_tables[0])] = s.block_tables[0]
    rows = []
    for b, t in enumerate(seq_lens):
        nb = -(-int(t) // 16)
        for _ in range(2):
            rows.append(np.flatnonzero(rng.random(nb) < 0.5).astype(np.int32) if nb > 1 else np.array([0], np.int32))
    indptr = np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int32)
    sel = BlockSelection(indptr, np.concatenate(rows).astype(np.int32), 2)
    inputs = LayerInputs(rng.standard_normal((2, 8, 128)).astype(np.float32), tables, seq_lens, 128 ** -0.5)
    req = np.repeat(np.arange(sel.num_rows), sel.blocks_per_row()) // 2
    heads = np.repeat(np.arange(sel.num_rows), sel.blocks_per_row()) % 2
    full = (sel.sel_blocks + 1) * 16 <= seq_lens[req]
    cost = CostModel.from_rates(128, cpu_gb_per_s=20, uva_gb_per_s=20, cached_gb_per_s=200)
    for call in range(2):
        plan = table.plan(0, tables[req, sel.sel_blocks], heads, cacheable=full, pinned=np.zeros(full.size, bool),
                          score=np.zeros(full.size))
        split = split_layer(sel, cost, mode="gpu_only", cached_slot=plan.slots)
        got = {}
        for name, path in paths.items():
            path.copy_in(0, plan)
            got[name] = path.finish(path.launch(0, inputs, split.gpu, split.gpu_slot), None).out
        np.testing.assert_allclose(got["gpu"], got["emu"], rtol=1e-3, atol=1e-4)
        if call == 1:
            assert (plan.slots >= 0).sum() == full.sum()
            p = paths["gpu"]
            s, pg, hd = table.resident()
            np.testing.assert_array_equal(cp.asnumpy(p.pool[s]), kv[pg, hd])


def test_calibration_measures_gpu_rates():
    cost = calibrate(128, 8, 4, num_threads=2, blocks_per_row=256)
    assert cost.has_gpu and cost.uva_bytes_per_s > 1e9 and cost.cached_bytes_per_s > cost.uva_bytes_per_s
    assert cost.copy_bytes_per_s > 1e9
