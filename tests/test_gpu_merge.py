"""The exact log-sum-exp merge on the GPU against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from tests import gpu_util

gpu_util.skip_unless_gpu()

import cupy as cp  # noqa: E402

from fluxion_dist.attention import reference  # noqa: E402
from fluxion_dist.attention.layout import from_bf16_bits  # noqa: E402
from fluxion_dist.kernels.merge import merge_attention, merge_states  # noqa: E402
from fluxion_dist.kernels.uva import pinned_empty  # noqa: E402

pytestmark = pytest.mark.gpu


def _partials(rng, num, bsz, hq, d, empty_rate=0.25):
    """Random partial states; empty ones have m = -inf, l = 0 and NaN in o (must not count).
    With a nonzero empty_rate, row (0, 0) is empty in every partial."""
    m = (rng.standard_normal((num, bsz, hq)) * 6).astype(np.float32)
    l = rng.uniform(0.5, 40.0, size=(num, bsz, hq)).astype(np.float32)
    o = (rng.standard_normal((num, bsz, hq, d)) * l[..., None]).astype(np.float32)
    empty = rng.random((num, bsz, hq)) < empty_rate
    if empty_rate > 0:
        empty[:, 0, 0] = True
    m[empty], l[empty] = -np.inf, 0.0
    o[empty] = np.nan
    return o, m, l, empty


def _reference(o, m, l, b):
    parts = [reference.Partial(np.nan_to_num(o[p, b]) * (m[p, b] > -np.inf)[:, None], m[p, b], l[p, b])
             for p in range(o.shape[0])]
    return reference.merge_state(parts)


@pytest.mark.parametrize("num", [1, 2, 7])
@pytest.mark.parametrize("d", [128, 64])
def test_merge_states_and_attention(num: int, d: int):
    rng, seed = gpu_util.fresh_rng()
    bsz, hq = 3, 8
    o, m, l, empty = _partials(rng, num, bsz, hq, d)
    # Partials as every other slice of a bigger buffer: a stride along the stacking axis.
    big_o = cp.full((2 * num, bsz, hq, d), np.nan, cp.float32)
    big_m = cp.full((2 * num, bsz, hq), np.nan, cp.float32)
    big_l = cp.full((2 * num, bsz, hq), np.nan, cp.float32)
    big_o[::2], big_m[::2], big_l[::2] = cp.asarray(o), cp.asarray(m), cp.asarray(l)
    args = (big_o[::2], big_m[::2], big_l[::2])

    state_out = (cp.full((bsz, hq, d), np.nan, cp.float32), cp.full((bsz, hq), np.nan, cp.float32),
                 cp.full((bsz, hq), np.nan, cp.float32))
    so, sm, sl = (cp.asnumpy(a) for a in merge_states(*args, out=state_out))
    f32 = cp.asnumpy(merge_attention(*args, out_dtype="float32",
                                     out=cp.full((bsz, hq, d), np.nan, cp.float32)))
    bf16 = from_bf16_bits(cp.asnumpy(merge_attention(*args, out=cp.full((bsz, hq, d), 0x7FC0, cp.uint16))))

    for b in range(bsz):
        ref = _reference(o, m, l, b)
        for h in range(hq):
            where = f"seed={seed} b={b} h={h}"
            if empty[:, b, h].all():
                assert sm[b, h] == -np.inf and sl[b, h] == 0 and np.all(so[b, h] == 0), where
                assert np.all(np.isnan(f32[b, h])) and np.all(np.isnan(bf16[b, h])), where
                continue
            assert sm[b, h] == np.float32(ref.m[h]), where  # the max is exact
            assert abs(sl[b, h] / ref.l[h] - 1) < 1e-5, where
            assert gpu_util.rel_err(so[b, h], ref.o[h]) < 1e-5, where
            want = ref.o[h] / ref.l[h]
            assert gpu_util.rel_err(f32[b, h], want) < 1e-5, where
            # bf16 keeps 8 significant bits: each element within half an ulp plus fp32 noise.
            np.testing.assert_allclose(bf16[b, h], want, rtol=2 ** -8, atol=1e-6, err_msg=where)


def test_merge_reads_partials_in_pinned_host_memory():
    """A CPU partial written into pinned host memory merges without a copy (UVA)."""
    rng, seed = gpu_util.fresh_rng()
    o, m, l, _ = _partials(rng, 3, 2, 4, 128, empty_rate=0.0)
    ho, do = pinned_empty(o.shape, np.float32)
    hm, dm = pinned_empty(m.shape, np.float32)
    hl, dl = pinned_empty(l.shape, np.float32)
    ho[...], hm[...], hl[...] = o, m, l
    got = cp.asnumpy(merge_attention(do, dm, dl, out_dtype="float32"))
    for b in range(2):
        want = reference.merge_partials([reference.Partial(o[p, b], m[p, b], l[p, b]) for p in range(3)])
        assert gpu_util.rel_err(got[b], want) < 1e-5, f"seed={seed} b={b}"


def test_merge_needs_a_partial():
    with pytest.raises(ValueError, match="at least one"):
        merge_states(cp.zeros((0, 1, 2, 128), cp.float32), cp.zeros((0, 1, 2), cp.float32),
                     cp.zeros((0, 1, 2), cp.float32))
