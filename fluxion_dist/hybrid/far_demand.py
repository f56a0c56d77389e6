"""The predictor's demand on the GPU: per row of the top-p CSR, its blocks outside the kept ones.

The top-p pass (``kernels.selection.select_topp``) ranks every block, the kept sinks and
window included; what a row needs beyond them (``policy.budget``'s demand) is the count of
its set's blocks that are neither among the first ``sink_blocks`` nor the last
``recent_blocks``. One CTA per row, no host round trip (it runs inside the layer's CUDA
graph). NumPy twin: ``policy.select.far_demand``.

Imports CuPy: import only where ``kernels.device.gpu_unavailable_reason()`` is None.
"""

from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS

_THREADS = 256

_SOURCE = r"""
extern "C" __global__ void far_demand(const int* __restrict__ indptr, const int* __restrict__ blocks,
                                      const int* __restrict__ seq_lens, int heads, int sink_blocks,
                                      int recent_blocks, int* __restrict__ out)
{
    __shared__ int total;
    const int r = blockIdx.x;
    const int nb = (seq_lens[r / heads] + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
    if (threadIdx.x == 0) total = 0;
    __syncthreads();
    int mine = 0;
    for (int i = indptr[r] + threadIdx.x; i < indptr[r + 1]; i += blockDim.x) {
        const int j = blocks[i];
        mine += (j >= sink_blocks && j < nb - recent_blocks) ? 1 : 0;
    }
    if (mine) atomicAdd(&total, mine);
    __syncthreads();
    if (threadIdx.x == 0) out[r] = total;
}
"""


@functools.cache
def _kernel() -> cp.RawKernel:
    return cp.RawKernel(_SOURCE, "far_demand", options=("--std=c++17", f"-DBLOCK_TOKENS={BLOCK_TOKENS}"))


def far_demand(indptr: cp.ndarray, blocks: cp.ndarray, seq_lens: cp.ndarray, *, heads: int, sink_blocks: int,
               recent_blocks: int, out: cp.ndarray) -> None:
    """``out int32 [R]`` (R = B * heads): per row of the CSR ``(indptr [R + 1], blocks)``, its
    blocks outside the kept ones of its request (``seq_lens int32 [B]``, the new token included)."""
    rows = indptr.shape[0] - 1
    if out.shape != (rows,) or out.dtype != np.int32 or seq_lens.shape[0] * heads != rows:
        raise ValueError(f"far_demand: out must be int32 [{rows}] and seq_lens [{rows // max(heads, 1)}]; "
                         f"got {out.dtype} {out.shape}, {seq_lens.shape}")
    if rows == 0:
        return
    _kernel()((rows,), (_THREADS,), (indptr, blocks, seq_lens, np.int32(heads), np.int32(sink_blocks),
                                     np.int32(recent_blocks), out))
