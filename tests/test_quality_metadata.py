"""The harness's int8-metadata variant (``policy:metadata=int8``): the arena holds the boxes of
the int8 mirror, which contain the bf16 ones; a sample decodes through it; a bad value is
refused naming the allowed ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxion_dist.attention.layout import from_bf16_bits
from fluxion_dist.hybrid import CostModel
from fluxion_dist.kernels.compact_metadata import mirror_boxes
from fluxion_dist.quality.fidelity import FidelityStats
from fluxion_dist.quality.harness import Prefilled, deployment_sparse, make_runners
from fluxion_dist.quality.model import TINY_QUALITY_ARCH, init_model


def _f32(bits: np.ndarray) -> np.ndarray:
    return from_bf16_bits(bits).reshape(bits.shape)


def test_int8_variant_decodes_over_the_mirror_boxes():
    model = init_model(TINY_QUALITY_ARCH, 0).eval()
    cost = CostModel.cpu_only(model.arch.head_dim, 5.0)
    prompt = torch.randint(5, 200, (333,), generator=torch.Generator().manual_seed(3))
    pre = Prefilled(model, prompt)
    bf16, int8 = pre.packed_as(), pre.packed_as("int8")
    assert pre.packed_as("int8") is int8, "made once per sample"
    for lo, hi, mlo, mhi in zip(bf16.kmin, bf16.kmax, int8.kmin, int8.kmax):
        want = mirror_boxes(lo, hi)
        assert np.array_equal(mlo, want[0]) and np.array_equal(mhi, want[1])
        assert np.all(_f32(mlo) <= _f32(lo)) and np.all(_f32(mhi) >= _f32(hi))
        assert np.any(_f32(mlo) < _f32(lo)), "the int8 steps widen some box"
    assert all(a is b for a, b in zip(bf16.pages, int8.pages)), "only the boxes differ"
    runners = make_runners(model, ["fluxion", "fluxion:metadata=int8"], deployment_sparse(0.2, {}), cost,
                           max_tokens=512, compute=torch.device("cpu"), device="cpu", cpu_threads=1)
    try:
        assert [r.metadata for r in runners] == ["bf16", "int8"]
        for r in runners:
            stats = FidelityStats(model.arch)
            got = r.run(model, pre, 4, stats)
            assert len(got) == 4 and np.all(stats.steps == 4)  # every layer scored every step
    finally:
        for r in runners:
            r.close()


def test_unknown_metadata_is_refused():
    model = init_model(TINY_QUALITY_ARCH, 0).eval()
    cost = CostModel.cpu_only(model.arch.head_dim, 5.0)
    with pytest.raises(ValueError, match="metadata='fp4'; allowed: bf16, int8"):
        make_runners(model, ["quest_gpu:metadata=fp4"], deployment_sparse(0.1, {}), cost, max_tokens=256,
                     compute=torch.device("cpu"), device="cpu", cpu_threads=1)
