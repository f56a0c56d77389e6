// CTA-wide scans and reductions for kernels of SELECT_THREADS threads (selection.cu).
// Pasted after common.cuh by the loader; every thread of the CTA must call these.

#define SELECT_WARPS (SELECT_THREADS / 32)

// Exclusive prefix sum in thread order; `total` gets the sum over the CTA.
__device__ unsigned long long block_exclusive_scan(unsigned long long v, unsigned long long* warp_tot,
                                                   unsigned long long& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long incl = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const unsigned long long n = __shfl_up_sync(FULL_MASK, incl, off);
        if (lane >= off) incl += n;
    }
    __syncthreads();  // warp_tot may still be read from a previous scan
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        unsigned long long t = lane < SELECT_WARPS ? warp_tot[lane] : 0ull;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const unsigned long long n = __shfl_up_sync(FULL_MASK, t, off);
            if (lane >= off) t += n;
        }
        if (lane < SELECT_WARPS) warp_tot[lane] = t;  // inclusive over warps
    }
    __syncthreads();
    total = warp_tot[SELECT_WARPS - 1];
    return (warp > 0 ? warp_tot[warp - 1] : 0ull) + incl - v;
}

// Min and max over the CTA; every thread gets both.
__device__ void block_min_max(unsigned int& lo, unsigned int& hi, unsigned int* red_lo, unsigned int* red_hi) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        lo = min(lo, __shfl_xor_sync(FULL_MASK, lo, off));
        hi = max(hi, __shfl_xor_sync(FULL_MASK, hi, off));
    }
    __syncthreads();  // red_* may still be read from a previous call
    if (lane == 0) { red_lo[warp] = lo; red_hi[warp] = hi; }
    __syncthreads();
#pragma unroll 8
    for (int w = 0; w < SELECT_WARPS; ++w) { lo = min(lo, red_lo[w]); hi = max(hi, red_hi[w]); }
}
