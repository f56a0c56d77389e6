// Single-pass exclusive prefix sums across the CTAs of one launch (decoupled look-back, after
// Merrill & Garland), for kernels whose CTAs each produce a run of one output list.
// Pasted after common.cuh by the loader.
//
// CTA t (t = the order CTAs started in, from a ticket counter, not blockIdx) publishes its own
// total at once, then sums the totals the CTAs before it published, 32 at a time walking back,
// stopping at one that has published its inclusive prefix, and publishes its own inclusive
// prefix. Every CTA waited on took its ticket earlier, so it is running: no deadlock whatever
// the grid size. Totals may pack several counters (fields summed independently) as long as
// no field overflows.
//
// status[t]: 0 nothing yet, LB_AGGREGATE | total, or LB_INCLUSIVE | prefix (values < 2^62);
// zero at launch, and the kernel's last CTA sets it back to zero.
#define LB_AGGREGATE (1ull << 62)
#define LB_INCLUSIVE (1ull << 63)
#define LB_VALUE (LB_AGGREGATE - 1ull)

// Every thread must call, with the same `total`; returns the sum of CTAs 0..t-1's totals.
__device__ unsigned long long look_back(unsigned long long* status, int t, unsigned long long total,
                                        unsigned long long* shared_result) {
    volatile unsigned long long* vs = status;
    if (threadIdx.x == 0) vs[t] = (t == 0 ? LB_INCLUSIVE : LB_AGGREGATE) | total;
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        unsigned long long before = 0ull;
        for (int j0 = t - 1; j0 >= 0; j0 -= 32) {
            const int j = j0 - lane;
            unsigned long long st = 0ull;
            if (j >= 0)
                do { st = vs[j]; } while (st == 0ull);
            const unsigned int incl = __ballot_sync(FULL_MASK, j >= 0 && (st & LB_INCLUSIVE));
            const int stop = incl ? __ffs(incl) - 1 : 32;  // the nearest inclusive CTA ends the walk
            unsigned long long v = lane <= stop && j >= 0 ? st & LB_VALUE : 0ull;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
            before += v;
            if (incl) break;
        }
        if (lane == 0) {
            if (t > 0) vs[t] = LB_INCLUSIVE | (before + total);
            *shared_result = before;
        }
    }
    __syncthreads();
    return *shared_result;
}
