"""stage_inputs / stage_output on the GPU: the caller's tensors, named by address in the io
block, are read into the layer's buffers and the output written back in the caller's dtype,
bit for bit as torch casts them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import gpu_util

gpu_util.skip_unless_gpu()

import cupy as cp  # noqa: E402

from fluxion_dist.kernels.staging import io_words, stage_inputs, stage_output  # noqa: E402

pytestmark = pytest.mark.gpu


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.cpu().view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("q_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bsz,hkv,group,d", [(1, 8, 4, 128), (3, 2, 1, 64), (5, 1, 8, 128), (64, 8, 4, 128)])
def test_staging_round_trip(q_dtype, bsz, hkv, group, d):
    rng, seed = gpu_util.fresh_rng()
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q = (torch.randn(bsz, hq, d, generator=gen) * 3).to(getattr(torch, q_dtype)).cuda()
    k = torch.randn(bsz, hkv, d, generator=gen).bfloat16().cuda()
    v = torch.randn(bsz, hkv, d, generator=gen).bfloat16().cuda()
    out_t = torch.full((bsz, hq, d), float("nan"), dtype=getattr(torch, q_dtype), device="cuda")
    # poisoned landing buffers
    q_buf = cp.full((bsz, hq, d), np.nan, cp.float32)
    k_buf = cp.full((bsz, hkv, d), 0x7FC0, cp.uint16)
    v_buf = cp.full((bsz, hkv, d), 0x7FC0, cp.uint16)
    io = cp.asarray(np.array(io_words(q.data_ptr(), k.data_ptr(), v.data_ptr(), out_t.data_ptr(), q_dtype, q_dtype),
                             np.int64))
    torch.cuda.synchronize()
    stage_inputs(io, q_buf, k_buf, v_buf)
    np.testing.assert_array_equal(cp.asnumpy(q_buf), q.float().cpu().numpy(), err_msg=f"seed {seed}")
    np.testing.assert_array_equal(cp.asnumpy(k_buf), _bits(k), err_msg=f"seed {seed}")
    np.testing.assert_array_equal(cp.asnumpy(v_buf), _bits(v), err_msg=f"seed {seed}")

    out = cp.asarray(rng.standard_normal((bsz, hq, d)).astype(np.float32) * 7)
    out[0, 0, :3] = cp.asarray(np.array([np.inf, -0.0, 1e-40], np.float32))  # inf, signed zero, subnormal
    stage_output(io, out)
    cp.cuda.get_current_stream().synchronize()
    want = torch.from_numpy(cp.asnumpy(out)).to(getattr(torch, q_dtype))
    if q_dtype == "float32":
        np.testing.assert_array_equal(out_t.cpu().numpy(), want.numpy(), err_msg=f"seed {seed}")
    else:
        np.testing.assert_array_equal(_bits(out_t), _bits(want), err_msg=f"seed {seed}")
