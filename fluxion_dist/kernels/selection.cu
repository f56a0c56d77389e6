// Top-k and top-p block selection on the GPU, no host round trip, one launch.
//
// -D BLOCK_TOKENS, -D SELECT_THREADS (threads per CTA: 256 to 1024), -D BY_MASS (0: top-k,
// 1: top-p). The two rules are built apart: top-k's kernel then carries none of top-p's 64-bit
// mass code or shared memory, which makes it faster (docs/benchmarks.md, GPU kernels).
//
// One CTA per row (request, head). Both rules are one radix select over the scores' 32-bit
// order-preserving keys, held in shared memory: top-k counts elements, top-p sums their
// estimated softmax mass as fixed-point integers (exp(s - max) in units of 2^-40), so the
// sums, and therefore the selection, are deterministic whatever order the atomics land in.
//
// The radix starts at the highest bit where the row's keys differ, 11 bits a pass. Passes
// sweep the whole row only while the bin holding the threshold has more than CAND_LIMIT
// keys (one pass for most rows); then that bin is copied out and the passes that resolve
// the rest read only it. At the end the exact threshold key T is known and elements equal
// to it are taken lowest id first, as the float64 reference does. Selected coarse blocks
// are expanded to base block ids and written ascending straight into the CSR lists: each
// row finds its offset from the counts the rows before it publish (look_back.cuh), and the
// last CTA to finish (an arrival counter, left at zero again) resets that scratch.
#include "common.cuh"

#define DIGIT_BITS 11
#define RADIX_BINS (1 << DIGIT_BITS)
#define BINS_PER_THREAD (RADIX_BINS / SELECT_THREADS)
#define CAND_LIMIT 1024  // the threshold's bin is copied out once it holds at most this many keys
#define MASS_ONE 1099511627776.0f  // 2^40
#define LOAD_UNROLL 8  // global loads a thread keeps in flight at once

#include "block_reduce.cuh"
#include "look_back.cuh"

static_assert(BY_MASS == 0 || BY_MASS == 1, "BY_MASS must be 0 or 1");
static_assert(SELECT_THREADS >= 256 && SELECT_THREADS <= 1024 && RADIX_BINS % SELECT_THREADS == 0,
              "SELECT_THREADS must be 256, 512 or 1024");

struct SelectShared {
    unsigned int count[RADIX_BINS];
    unsigned long long mass[BY_MASS ? RADIX_BINS : 1];  // top-p only
    unsigned int cand_key[CAND_LIMIT];  // the threshold's bin, once it is small
    unsigned long long scan_tmp[SELECT_WARPS];
    unsigned int red_lo[SELECT_WARPS], red_hi[SELECT_WARPS];
    unsigned int digit, digit_count, n_cand, thresh, row;
    unsigned long long rem, start;
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

// The target weight of a top-p row (p < 1) from its total mass. The reference stops at
// p * (1 - 1e-12), so a cumulative mass within rounding of p reaches it.
__device__ __forceinline__ unsigned long long mass_target(float p, unsigned long long total) {
    const unsigned long long t = (unsigned long long)ceil((double)p * (1.0 - 1e-12) * (double)total);
    return min(max(t, 1ull), total);
}

// Finds the bin holding the threshold: the bins above it weigh less than `remaining`, with
// it at least `remaining`. Thread t owns BINS_PER_THREAD bins counted down from the top, so
// a scan in thread order is a sum from the top. Sets sh.digit, sh.digit_count and sh.rem
// (what is still needed from inside that bin). With `p` >= 0 (top-p's first pass) the
// target comes from the total first.
__device__ void find_digit(SelectShared& sh, bool by_mass, unsigned long long remaining, float p) {
    const int b_top = RADIX_BINS - 1 - BINS_PER_THREAD * threadIdx.x;
    unsigned long long w[BINS_PER_THREAD], mine = 0ull;
#pragma unroll
    for (int j = 0; j < BINS_PER_THREAD; ++j) {
        w[j] = by_mass ? sh.mass[b_top - j] : sh.count[b_top - j];
        mine += w[j];
    }
    unsigned long long total;
    unsigned long long above = block_exclusive_scan(mine, sh.scan_tmp, total);
    if (p >= 0.f) remaining = mass_target(p, total);
    if (above < remaining && remaining <= above + mine) {
#pragma unroll
        for (int j = 0; j < BINS_PER_THREAD; ++j) {
            if (above + w[j] >= remaining) {
                sh.digit = b_top - j;
                sh.digit_count = sh.count[b_top - j];
                sh.rem = remaining - above;
                break;
            }
            above += w[j];
        }
    }
    __syncthreads();
}

// One radix pass over the keys in src[0, len) that match `prefix` under `prefix_mask`: a
// histogram of the next digit (bits top..lo), the bin holding the threshold found, prefix
// and mask extended by it. `remaining` (the weight still needed) becomes what is needed
// from inside that bin, `in_bin` its element count; returns the next top bit (lo - 1).
__device__ int radix_pass(SelectShared& sh, const unsigned int* src, int len, int top, unsigned int& prefix,
                          unsigned int& prefix_mask, bool by_mass, float smax, float p,
                          unsigned long long& remaining, unsigned int& in_bin) {
    const int lo = max(top - (DIGIT_BITS - 1), 0);
    const unsigned int digit_mask = (2u << (top - lo)) - 1u;
    for (int i = threadIdx.x; i < RADIX_BINS; i += SELECT_THREADS) {
        sh.count[i] = 0u;
        if (by_mass) sh.mass[i] = 0ull;
    }
    __syncthreads();
    if (!by_mass) {
        for (int i = threadIdx.x; i < len; i += SELECT_THREADS) {
            const unsigned int key = src[i];
            if ((key & prefix_mask) == prefix) atomicAdd(&sh.count[(key >> lo) & digit_mask], 1u);
        }
    } else {
        // Top-p: the lanes of a warp that hit one bin add their count and mass once, through
        // their leader. Real scores crowd into a few bins of a digit, and 64-bit same-address
        // shared atomics serialise, which gave the predictor's pass long tails without this
        // (the match costs more than it saves on top-k's 32-bit counts).
        const unsigned int lane = threadIdx.x & 31;
        for (int base = 0; base < len; base += SELECT_THREADS) {  // uniform trip count: whole warps
            const int i = base + threadIdx.x;
            const unsigned int key = i < len ? src[i] : 0u;
            const bool hit = i < len && (key & prefix_mask) == prefix;
            const unsigned int hits = __ballot_sync(FULL_MASK, hit);
            if (!hit) continue;
            const unsigned int bin = (key >> lo) & digit_mask;
            const unsigned int peers = __match_any_sync(hits, bin);
            const unsigned long long w = mass_weight(key, smax);
            unsigned long long sum = 0ull;
            for (unsigned int m = peers; m; m &= m - 1u) sum += __shfl_sync(peers, w, __ffs(m) - 1);
            if (lane == (unsigned int)(__ffs(peers) - 1)) {
                atomicAdd(&sh.count[bin], (unsigned int)__popc(peers));
                atomicAdd(&sh.mass[bin], sum);
            }
        }
    }
    __syncthreads();
    find_digit(sh, by_mass, remaining, p);
    prefix |= sh.digit << lo;
    prefix_mask |= digit_mask << lo;
    remaining = sh.rem;
    in_bin = sh.digit_count;
    return lo - 1;
}

// Where a row's selection ends: keys above `thresh` are taken, and of the keys equal to it
// the `need_eq` with the lowest ids. `thresh` = ~0u with need_eq = 0 takes nothing.
struct Cut {
    unsigned int thresh;
    unsigned long long need_eq;  // ~0: every key equal to T
};

// Loads the row's n > 0 keys into keys[] and finds its cut.
__device__ Cut find_cut(SelectShared& sh, unsigned int* keys, const float* row, int n, bool by_mass,
                        int k, float p) {
    const int tid = threadIdx.x;
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

    // remaining: the weight the selection must still reach; weights are 1 (top-k) or mass
    // units, whose target comes from the row's total (summed by the first pass).
    unsigned long long remaining = by_mass ? 0ull : (unsigned long long)max(min(k, n), 0);
    if (!by_mass && remaining == 0ull) return Cut{~0u, 0ull};
    // p = 1 takes every entry, as the reference does: the fixed-point weights round masses
    // under 2^-41 of the row's maximum to zero, so a mass sum cannot tell them apart.
    const bool take_all = by_mass ? p >= 1.f : remaining >= (unsigned long long)n;

    // Radix select of the threshold key T: the weight of keys > T is below the target, that
    // of keys >= T reaches it; `remaining` ends as the weight still needed from keys == T.
    const unsigned int diff = klo ^ khi;
    int top = diff ? 31 - __clz(diff) : -1;
    unsigned int prefix_mask = top >= 0 ? ~((2u << top) - 1u) : ~0u;
    unsigned int prefix = khi & prefix_mask;
    unsigned int in_bin = (unsigned int)n;  // keys matching the prefix
    unsigned int thresh = 0u;
    unsigned long long need_eq = ~0ull;  // how many keys == T to take, lowest ids first
    if (!take_all) {
        bool summed = false;  // top-p: the target weight is known
        if (by_mass && top < 0) {  // one key throughout
            remaining = mass_target(p, (unsigned long long)n * mass_weight(khi, smax));
            summed = true;
        }
        while (top >= 0 && in_bin > CAND_LIMIT) {
            top = radix_pass(sh, keys, n, top, prefix, prefix_mask, by_mass, smax,
                             by_mass && !summed ? p : -1.f, remaining, in_bin);
            summed = true;
        }
        if (by_mass && !summed) {  // a short row had no pass to sum its mass
            unsigned long long w = 0ull, total;
            for (int i = tid; i < n; i += SELECT_THREADS) w += mass_weight(keys[i], smax);
            block_exclusive_scan(w, sh.scan_tmp, total);
            remaining = mass_target(p, total);
        }
        if (top >= 0) {
            // The threshold's bin is copied out; the passes that resolve the rest of T read
            // it, a few keys per thread, instead of sweeping the row.
            if (tid == 0) sh.n_cand = 0u;
            __syncthreads();
            const unsigned int lane = tid & 31;
            for (int base = 0; base < n; base += SELECT_THREADS) {  // one counter bump per warp
                const int i = base + tid;
                const unsigned int key = i < n ? keys[i] : 0u;
                const bool in = i < n && (key & prefix_mask) == prefix;
                const unsigned int ins = __ballot_sync(FULL_MASK, in);
                if (ins == 0u) continue;
                unsigned int at = 0u;
                if (lane == (unsigned int)(__ffs(ins) - 1)) at = atomicAdd(&sh.n_cand, (unsigned int)__popc(ins));
                at = __shfl_sync(FULL_MASK, at, __ffs(ins) - 1);
                if (in) sh.cand_key[at + __popc(ins & ((1u << lane) - 1u))] = key;
            }
            __syncthreads();
            const int m = (int)sh.n_cand;
            while (top >= 0 && in_bin > 1)
                top = radix_pass(sh, sh.cand_key, m, top, prefix, prefix_mask, by_mass, smax, -1.f,
                                 remaining, in_bin);
            if (top >= 0) {  // one key left in the bin: it is T, whatever its low bits
                for (int i = tid; i < m; i += SELECT_THREADS)
                    if ((sh.cand_key[i] & prefix_mask) == prefix) sh.thresh = sh.cand_key[i];
                __syncthreads();
                prefix = sh.thresh;
            }
        }
        thresh = prefix;
        const unsigned long long w_t = by_mass ? mass_weight(thresh, smax) : 1ull;
        // in_bin keys equal T (one, if T was found among the candidates): when all of them
        // are taken, which is the usual case, nothing needs counting them in id order.
        if (w_t > 0ull && (remaining + w_t - 1) / w_t < (unsigned long long)in_bin)
            need_eq = (remaining + w_t - 1) / w_t;
    }
    return Cut{thresh, need_eq};
}

// Writes the row's selected base blocks, ascending, at its place in the CSR lists. Warp w
// owns a contiguous run of the row, read 32 keys at a time (no bank conflicts); a key's
// place comes from ballots inside the warp and from scans over the warps' totals: first of
// the keys == T, when only the lowest ids of those are taken, then of the base blocks
// written. Between the two passes the row learns where it starts (look_back).
__device__ void write_row(SelectShared& sh, const unsigned int* keys, int n, int nb, int factor, Cut cut,
                          int cap, int r, unsigned long long* status, int* indptr, int* blocks_out) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int seg = ((n + SELECT_WARPS - 1) / SELECT_WARPS + 31) & ~31;
    const int w0 = min(warp * seg, n), w1 = min(w0 + seg, n);
    const unsigned int lanes_below = (1u << lane) - 1u;
    const bool some_eq = cut.need_eq != ~0ull;  // uniform: the CTA's cut
    const unsigned int need_eq = (unsigned int)min(cut.need_eq, 0xffffffffull);
    unsigned long long unused, total;
    unsigned int eq_base = 0u;
    if (some_eq) {
        unsigned int eq_w = 0u;
        for (int base = w0; base < w1; base += 32) {
            const int i = base + lane;
            eq_w += __popc(__ballot_sync(FULL_MASK, i < w1 && keys[i] == cut.thresh));
        }
        eq_base = (unsigned int)__shfl_sync(
            FULL_MASK, block_exclusive_scan(lane == 0 ? eq_w : 0u, sh.scan_tmp, unused), 0);
    }

    // Whether the key at i is selected; eq_seen counts keys == T before the chunk.
    auto selected = [&](int i, unsigned int& eq_seen) -> bool {
        const unsigned int key = i < w1 ? keys[i] : 0u;
        const bool eq = i < w1 && key == cut.thresh;
        bool take_eq = eq;
        if (some_eq) {
            const unsigned int eq_bits = __ballot_sync(FULL_MASK, eq);
            take_eq = eq && eq_seen + __popc(eq_bits & lanes_below) < need_eq;
            eq_seen += __popc(eq_bits);
        }
        return i < w1 && (key > cut.thresh || take_eq);
    };
    // A selected entry adds `factor` base blocks, fewer at the row's end.
    auto adds = [&](int i) -> unsigned int { return (unsigned int)min(factor, nb - i * factor); };
    unsigned int eq_seen = eq_base, out_w = 0u;
    for (int base = w0; base < w1; base += 32) {
        const int i = base + lane;
        const bool sel = selected(i, eq_seen);
        out_w += factor == 1 ? __popc(__ballot_sync(FULL_MASK, sel))
                             : __reduce_add_sync(FULL_MASK, sel ? adds(i) : 0u);
    }
    unsigned long long pos = __shfl_sync(
        FULL_MASK, block_exclusive_scan(lane == 0 ? out_w : 0u, sh.scan_tmp, total), 0);
    const unsigned int count = (unsigned int)min(total, (unsigned long long)cap);
    const unsigned int start = (unsigned int)look_back(status, r, count, &sh.start);
    if (tid == 0) {
        indptr[r] = (int)start;
        if (r == (int)gridDim.x - 1) indptr[r + 1] = (int)(start + count);
    }

    int* const dst = blocks_out + start;
    eq_seen = eq_base;
    for (int base = w0; base < w1; base += 32) {
        const int i = base + lane;
        const bool sel = selected(i, eq_seen);
        if (factor == 1) {
            const unsigned int bits = __ballot_sync(FULL_MASK, sel);
            const unsigned long long at = pos + __popc(bits & lanes_below);
            if (sel && at < (unsigned long long)cap) dst[at] = i;
            pos += __popc(bits);
            continue;
        }
        const unsigned int c = sel ? adds(i) : 0u;
        unsigned int incl = c;  // inclusive scan of the chunk's block counts
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const unsigned int v = __shfl_up_sync(FULL_MASK, incl, off);
            if (lane >= off) incl += v;
        }
        unsigned long long at = pos + incl - c;
        for (unsigned int j = 0; j < c; ++j, ++at)
            if (at < (unsigned long long)cap) dst[at] = i * factor + (int)j;
        pos += __shfl_sync(FULL_MASK, incl, 31);
    }
}

// One CTA per row; the minimum of one CTA per SM keeps ptxas from capping registers (at 32
// for 1024 threads).
__global__ void __launch_bounds__(SELECT_THREADS, 1) select_blocks(
    const float* __restrict__ scores,        // [B, heads, n_stride]; row r = b*heads + h
    int heads, int n_stride,
    const int* __restrict__ seq_lens,        // [B]
    int factor,                              // base blocks per score entry (1, 4, 16)
    const int* __restrict__ k_rows, int k_all,      // per-row k, or null -> k_all
    const float* __restrict__ p_rows, float p_all,  // per-row p, or null -> p_all
    int cap,                                 // at most this many base blocks per row
    unsigned long long* __restrict__ status, // [R] look-back scratch, zero at launch and left zero
    int* __restrict__ indptr,                // [R + 1]
    int* __restrict__ blocks_out,            // [>= total selected]
    unsigned int* __restrict__ counters)     // [2] (ticket, arrivals), zero at launch and left zero
{
    extern __shared__ unsigned int keys[];   // the row's keys
    __shared__ SelectShared sh;

    if (threadIdx.x == 0) sh.row = atomicAdd(&counters[0], 1u);
    __syncthreads();
    const int r = (int)sh.row;
    const int nb = (seq_lens[r / heads] + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
    const int n = min((nb + factor - 1) / factor, n_stride);
    Cut cut{~0u, 0ull};
    if (n > 0) {
        const int k = k_rows != nullptr ? k_rows[r] : k_all;
        const float p = p_rows != nullptr ? p_rows[r] : p_all;
        cut = find_cut(sh, keys, scores + (long long)r * n_stride, n, BY_MASS != 0, k, p);
    }
    write_row(sh, keys, n, nb, factor, cut, cap, r, status, indptr, blocks_out);

    __syncthreads();
    if (threadIdx.x == 0) sh.last = atomicAdd(&counters[1], 1u) == gridDim.x - 1;
    __syncthreads();
    if (!sh.last) return;
    // Every row has read what it needed: the scratch goes back to zero for the next launch.
    for (int i = threadIdx.x; i < (int)gridDim.x; i += SELECT_THREADS) status[i] = 0ull;
    if (threadIdx.x == 0) { counters[0] = 0u; counters[1] = 0u; }
}
