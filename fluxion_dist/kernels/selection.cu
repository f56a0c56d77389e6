// Top-k and top-p block selection on the GPU, no host round trip, one launch.
//
// -D BLOCK_TOKENS.
//
// One CTA per row (request, head). Both rules are one radix select over the scores' 32-bit
// order-preserving keys, held in shared memory: top-k counts elements, top-p sums their
// estimated softmax mass as fixed-point integers (exp(s - max) in units of 2^-40), so the
// sums, and therefore the selection, are deterministic whatever order the atomics land in.
// The radix starts at the highest bit where the row's keys differ, 8 bits a pass; at the end
// the exact threshold key is known and elements equal to it are taken lowest id first, as
// the float64 reference does. Selected coarse blocks are expanded to base block ids and
// written ascending into a fixed-capacity scratch row. The last CTA to finish (an arrival
// counter, left at zero again) packs every row into the CSR lists.
#include "common.cuh"

#define SELECT_THREADS 1024
#define RADIX_BINS 256
#define HIST_COPIES 4  // warps spread their atomics over copies (padded apart in banks)
#define MASS_ONE 1099511627776.0f  // 2^40
#define LOAD_UNROLL 8  // global loads a thread keeps in flight at once

#include "block_reduce.cuh"

struct SelectShared {
    unsigned long long hist[HIST_COPIES][RADIX_BINS + 1];
    unsigned long long hist_total[RADIX_BINS];
    unsigned long long scan_tmp[SELECT_WARPS];
    unsigned int red_lo[SELECT_WARPS], red_hi[SELECT_WARPS];
    unsigned int digit;
    unsigned long long rem;
    bool last;
};

__device__ __forceinline__ unsigned int order_key(float f) {
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Computed from the key, so every element with one key gets the same weight.
__device__ __forceinline__ unsigned long long mass_weight(unsigned int key, float smax) {
    return (unsigned long long)__float2ll_rn(expf(key_value(key) - smax) * MASS_ONE);
}

// Folds the histogram copies and finds the digit whose bin holds the threshold: the bins
// above it weigh less than `remaining`, with it at least `remaining`. Sets sh.digit and
// sh.rem (what is still needed from inside that bin).
__device__ void find_digit(SelectShared& sh, unsigned long long remaining) {
    for (int bin = threadIdx.x; bin < RADIX_BINS; bin += SELECT_THREADS) {
        unsigned long long t = 0;
#pragma unroll
        for (int c = 0; c < HIST_COPIES; ++c) t += sh.hist[c][bin];
        sh.hist_total[bin] = t;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        // Lane l owns bins 255-8l .. 248-8l, walked from the top, held in registers.
        unsigned long long h[8], lane_sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) { h[j] = sh.hist_total[255 - 8 * lane - j]; lane_sum += h[j]; }
        unsigned long long incl = lane_sum;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const unsigned long long v = __shfl_up_sync(FULL_MASK, incl, off);
            if (lane >= off) incl += v;
        }
        const unsigned int hit = __ballot_sync(FULL_MASK, incl >= remaining);
        if (lane == (hit ? __ffs(hit) - 1 : 31)) {
            unsigned long long acc = incl - lane_sum;
            unsigned int digit = 248u - 8u * lane;
            bool found = false;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                if (found) continue;
                if (acc + h[j] >= remaining) { digit = 255u - 8u * lane - j; found = true; }
                else acc += h[j];
            }
            sh.digit = digit;
            sh.rem = remaining > acc ? remaining - acc : 0ull;
        }
    }
    __syncthreads();
}

// Selects one row into dst[0, cap); returns how many base blocks it wrote.
__device__ int select_row(SelectShared& sh, unsigned int* keys, const float* row, int n, int nb,
                          int factor, bool by_mass, int k, float p, int* dst, int cap) {
    const int tid = threadIdx.x, lane = tid & 31, copy = (tid >> 5) % HIST_COPIES;
    // All of a thread's loads are issued before the first store: the scores sit in L2 and
    // one round trip, not eight in a row, is what this costs.
    unsigned int klo = 0xffffffffu, khi = 0u;
    for (int base = 0; base < n; base += LOAD_UNROLL * SELECT_THREADS) {
        float v[LOAD_UNROLL];
#pragma unroll
        for (int j = 0; j < LOAD_UNROLL; ++j) {
            const int i = base + j * SELECT_THREADS + tid;
            v[j] = i < n ? row[i] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < LOAD_UNROLL; ++j) {
            const int i = base + j * SELECT_THREADS + tid;
            if (i < n) {
                const unsigned int key = order_key(v[j]);
                keys[i] = key;
                klo = min(klo, key);
                khi = max(khi, key);
            }
        }
    }
    block_min_max(klo, khi, sh.red_lo, sh.red_hi);  // its barrier also publishes keys[]
    const float smax = key_value(khi);

    // target: the weight the selection must reach; weights are 1 (top-k) or mass units.
    unsigned long long target;
    if (by_mass) {
        unsigned long long w = 0, total;
        for (int i = tid; i < n; i += SELECT_THREADS) w += mass_weight(keys[i], smax);
        block_exclusive_scan(w, sh.scan_tmp, total);
        // The reference stops at p * (1 - 1e-12) so that p = 1 survives rounding.
        target = (unsigned long long)ceil((double)p * (1.0 - 1e-12) * (double)total);
        target = min(max(target, 1ull), total);
    } else {
        target = (unsigned long long)max(min(k, n), 0);
    }
    if (target == 0ull) return 0;

    // Radix select of the threshold key T: the weight of keys > T is below target, that of
    // keys >= T reaches it; `remaining` ends as the weight still needed from keys == T.
    const bool take_all = !by_mass && target >= (unsigned long long)n;
    const unsigned int diff = klo ^ khi;
    int top = diff ? 31 - __clz(diff) : -1;
    unsigned int prefix_mask = top >= 0 ? ~((2u << top) - 1u) : ~0u;
    unsigned int prefix = khi & prefix_mask;
    unsigned long long remaining = target;
    for (; !take_all && top >= 0; top -= 8) {
        const int lo = max(top - 7, 0);
        const unsigned int digit_mask = (2u << (top - lo)) - 1u;
        for (int i = tid; i < HIST_COPIES * (RADIX_BINS + 1); i += SELECT_THREADS) (&sh.hist[0][0])[i] = 0ull;
        __syncthreads();
        // Warp-uniform trip count: the match/reduce intrinsics need every lane.
        for (int base = 0; base < n; base += SELECT_THREADS) {
            const int i = base + tid;
            const unsigned int key = i < n ? keys[i] : 0u;
            const bool member = i < n && (key & prefix_mask) == prefix;
            const unsigned int bin = member ? (key >> lo) & digit_mask : 0xffffffffu;
            // One atomic per distinct bin per warp, not one per lane: a row's keys share
            // their exponent, so the first pass puts most of a warp in one bin.
            const unsigned int peers = __match_any_sync(FULL_MASK, bin);
            if (member) {
                unsigned long long sum = __popc(peers);
                if (by_mass) {  // weights <= 2^40: two 20-bit halves keep 32-lane sums in 32 bits
                    const unsigned long long w = mass_weight(key, smax);
                    const unsigned int s_lo = __reduce_add_sync(peers, (unsigned int)(w & 0xfffffu));
                    const unsigned int s_hi = __reduce_add_sync(peers, (unsigned int)(w >> 20));
                    sum = ((unsigned long long)s_hi << 20) + s_lo;
                }
                if (lane == __ffs(peers) - 1) atomicAdd(&sh.hist[copy][bin], sum);
            }
        }
        __syncthreads();
        find_digit(sh, remaining);
        prefix |= sh.digit << lo;
        prefix_mask |= digit_mask << lo;
        remaining = sh.rem;
    }
    const unsigned int thresh = take_all ? 0u : prefix;
    unsigned long long need_eq = ~0ull;  // how many keys == T to take, lowest ids first
    if (!take_all) {
        const unsigned long long w_t = by_mass ? mass_weight(thresh, smax) : 1ull;
        if (w_t > 0ull) need_eq = (remaining + w_t - 1) / w_t;
    }

    // Compaction in index order: each thread owns a contiguous span, so two scans (equal keys
    // seen before me; base blocks written before me) give ascending output.
    const int span = (n + SELECT_THREADS - 1) / SELECT_THREADS;
    const int i0 = min(tid * span, n), i1 = min(i0 + span, n);
    unsigned long long eq_mine = 0, unused;
    for (int i = i0; i < i1; ++i) eq_mine += keys[i] == thresh;
    const unsigned long long eq_before = block_exclusive_scan(eq_mine, sh.scan_tmp, unused);

    unsigned long long out_mine = 0, eq_seen = eq_before, total_out;
    for (int i = i0; i < i1; ++i) {
        bool sel = keys[i] > thresh;
        if (keys[i] == thresh) { sel = eq_seen < need_eq; ++eq_seen; }
        if (sel) out_mine += min(factor, nb - i * factor);
    }
    unsigned long long pos = block_exclusive_scan(out_mine, sh.scan_tmp, total_out);

    eq_seen = eq_before;
    for (int i = i0; i < i1; ++i) {
        bool sel = keys[i] > thresh;
        if (keys[i] == thresh) { sel = eq_seen < need_eq; ++eq_seen; }
        if (!sel) continue;
        const int j_end = min((i + 1) * factor, nb);
        for (int j = i * factor; j < j_end; ++j, ++pos)
            if (pos < (unsigned long long)cap) dst[pos] = j;
    }
    return (int)min(total_out, (unsigned long long)cap);
}

// Run by the last CTA: every row's count is final. Offsets by a scan over the rows, then a
// flat copy in which each output position finds its row by binary search.
__device__ void pack_csr(SelectShared& sh, unsigned int* offs, const int* counts, int rows,
                         const int* rows_out, int cap, int* indptr, int* blocks_out) {
    unsigned long long carry = 0;
    for (int base = 0; base < rows; base += SELECT_THREADS) {
        const int r = base + threadIdx.x;
        const unsigned long long c = r < rows ? (unsigned long long)__ldcg(counts + r) : 0ull;
        unsigned long long tot;
        const unsigned long long ex = block_exclusive_scan(c, sh.scan_tmp, tot);
        if (r < rows) { offs[r] = (unsigned int)(carry + ex); indptr[r] = (int)(carry + ex); }
        carry += tot;
    }
    if (threadIdx.x == 0) { offs[rows] = (unsigned int)carry; indptr[rows] = (int)carry; }
    __syncthreads();
    const unsigned int total = (unsigned int)carry;
    for (unsigned int base = 0; base < total; base += LOAD_UNROLL * SELECT_THREADS) {
        int v[LOAD_UNROLL];
#pragma unroll
        for (int j = 0; j < LOAD_UNROLL; ++j) {
            const unsigned int idx = base + j * SELECT_THREADS + threadIdx.x;
            v[j] = 0;
            if (idx < total) {
                int lo = 0, hi = rows;  // offs[lo] <= idx < offs[hi]
                while (hi - lo > 1) {
                    const int mid = (lo + hi) >> 1;
                    if (offs[mid] <= idx) lo = mid; else hi = mid;
                }
                v[j] = __ldcg(rows_out + (long long)lo * cap + (idx - offs[lo]));
            }
        }
#pragma unroll
        for (int j = 0; j < LOAD_UNROLL; ++j) {
            const unsigned int idx = base + j * SELECT_THREADS + threadIdx.x;
            if (idx < total) blocks_out[idx] = v[j];
        }
    }
}

// One CTA of 1024 threads per SM is the plan; without the 1 ptxas caps registers at 32.
__global__ void __launch_bounds__(SELECT_THREADS, 1) select_blocks(
    const float* __restrict__ scores,        // [B, heads, n_stride]; row r = b*heads + h
    int heads, int n_stride,
    const int* __restrict__ seq_lens,        // [B]
    int factor,                              // base blocks per score entry (1, 4, 16)
    int by_mass,                             // 0: top-k, 1: top-p
    const int* __restrict__ k_rows, int k_all,      // per-row k, or null -> k_all
    const float* __restrict__ p_rows, float p_all,  // per-row p, or null -> p_all
    int* __restrict__ rows_out,              // [R, cap] scratch: base block ids, ascending
    int cap,
    int* __restrict__ counts,                // [R] scratch
    int* __restrict__ indptr,                // [R + 1]
    int* __restrict__ blocks_out,            // [>= total selected]
    unsigned int* __restrict__ arrivals)     // [1], zero at launch and left zero
{
    extern __shared__ unsigned int dyn[];    // the row's keys; in the last CTA, the CSR offsets
    __shared__ SelectShared sh;

    const int r = blockIdx.x;
    const int nb = (seq_lens[r / heads] + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
    const int n = min((nb + factor - 1) / factor, n_stride);
    int count = 0;
    if (n > 0) {
        const int k = k_rows != nullptr ? k_rows[r] : k_all;
        const float p = p_rows != nullptr ? p_rows[r] : p_all;
        count = select_row(sh, dyn, scores + (long long)r * n_stride, n, nb, factor, by_mass != 0,
                           k, p, rows_out + (long long)r * cap, cap);
    }
    if (threadIdx.x == 0) counts[r] = count;

    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) sh.last = atomicAdd(arrivals, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!sh.last) return;
    __threadfence();
    pack_csr(sh, dyn, counts, gridDim.x, rows_out, cap, indptr, blocks_out);
    if (threadIdx.x == 0) *arrivals = 0u;
}
