// The GPU block cache's table and the per-layer routing of selected blocks, all on the device.
//
// -D BLOCK_TOKENS.
//
// The table maps a (page, KV head) run of the host arena, keyed page * Hkv + head, to a slot
// of the device pool (slot_of, -1: not cached) and back (owner, -1: free). Three kernels
// (and the ring's advance), one per layer call each, so a decode layer needs no host round
// trip at all:
//
// force_blocks      sinks and the recent window get the largest finite score, so a top-k
//                   with k >= their count always takes them (ties go to the lower id);
// classify_entries  each entry of the selection CSR becomes a cache hit (its slot), a UVA
//                   read (-1) or CPU work (SLOT_CPU, which the attention kernel skips): of
//                   the misses, an evenly spread `cpu_fraction` go to the CPU (spread, so no
//                   row is left all to one side), with their own CSR; cacheable misses (full
//                   blocks: a partial last block is still being written) are listed for
//                   admission, in entry order; with a `last_seen` stamp table, only those
//                   the layer also selected within its last `window` steps (a block read
//                   once and dropped is not worth its copy over the PCIe it shares with UVA
//                   reads);
// admit_blocks      copies the listed runs from the arena (pinned host memory, through UVA)
//                   into the next slots of the layer's ring, evicting their old owners
//                   (how many, and where the ring stands, are read on the device).
//
// classify gives each CTA a tile of SELECT_THREADS entries: an entry's lookups are a chain of
// dependent loads (indptr, blocks, the table, slot_of), so tiles run side by side, not one
// after another in one CTA; a tile's place in the CPU and admission lists comes from a scan
// inside it and a look-back over the tiles before it (look_back.cuh), so both lists stay in
// entry order (CSR-sorted) without a second pass.
#include "common.cuh"

#define SELECT_THREADS 256  // classify: entries per CTA
#include "block_reduce.cuh"
#include "look_back.cuh"

#define SLOT_UVA (-1)
#define FORCED_SCORE 3.0e38f  // finite: order keys and top-k ties still work on it

__global__ void force_blocks(float* __restrict__ scores,      // [B, heads, n_stride]
                             const int* __restrict__ seq_lens,  // [B]
                             int heads, int n_stride, int sink_blocks, int recent_blocks)
{
    const int r = blockIdx.x;
    const int nb = min((seq_lens[r / heads] + BLOCK_TOKENS - 1) / BLOCK_TOKENS, n_stride);
    float* const row = scores + (long long)r * n_stride;
    for (int i = threadIdx.x; i < sink_blocks + recent_blocks; i += blockDim.x) {
        const int j = i < sink_blocks ? i : nb - recent_blocks + (i - sink_blocks);
        if (j >= 0 && j < nb) row[j] = FORCED_SCORE;
    }
}

__global__ void __launch_bounds__(SELECT_THREADS) classify_entries(
    const int* __restrict__ indptr,        // [rows + 1] the selection, row = b * heads + h
    const int* __restrict__ blocks,        // [nnz] logical block ids
    int rows, int heads,
    const int* __restrict__ block_tables,  // [B, max_blocks]
    int max_blocks,
    const int* __restrict__ seq_lens,      // [B], the new token included
    const int* __restrict__ slot_of,       // [P * heads], or null: nothing is cached
    const float* __restrict__ cpu_fraction,  // [1], read at run time (a graph replays it)
    int* __restrict__ sel_slot,            // [nnz] out: slot, SLOT_UVA or SLOT_CPU
    int* __restrict__ cpu_indptr,          // [rows + 1] out
    int* __restrict__ cpu_blocks,          // [>= nnz] out
    int* __restrict__ admit_keys,          // [>= nnz] out, or null with slot_of null
    int* __restrict__ counts,              // [4] out: hits, UVA reads, CPU, admissions
    unsigned int* __restrict__ counters,   // [2] (ticket, arrivals), zero at launch and left zero
    unsigned long long* __restrict__ status,  // [gridDim.x] look-back scratch, likewise
    int* __restrict__ row_cpu,             // [rows] CPU entries per row, likewise
    int* __restrict__ last_seen,           // [P * heads] step each key was last selected, or null
    const int* __restrict__ stamp,         // [1] this step (read at run time), null with last_seen
    int window)                            // steps back a selection still counts as reuse
{
    __shared__ unsigned long long scan_tmp[SELECT_WARPS];
    __shared__ unsigned long long before_sh;
    __shared__ unsigned int tile_sh;
    __shared__ bool last;
    const int tid = threadIdx.x;
    if (tid == 0) tile_sh = atomicAdd(&counters[0], 1u);
    __syncthreads();
    const int tile = (int)tile_sh;  // tiles in start order: the look-back needs it

    const int nnz = indptr[rows];
    const double frac = *cpu_fraction;
    const int e = tile * SELECT_THREADS + tid;
    const bool live = e < nnz;
    int row = 0, blk = 0, key = 0, slot = SLOT_UVA;
    bool cacheable = false;  // a full block (a partial last one is still being written), reused if asked
    if (live) {
        int lo = 0, hi = rows;  // the last row starting at or before e: indptr[lo] <= e < indptr[hi]
        while (hi - lo > 1) {
            const int mid = (lo + hi) >> 1;
            if (indptr[mid] <= e) lo = mid; else hi = mid;
        }
        row = lo;
        const int b = row / heads;
        blk = blocks[e];
        key = block_tables[(long long)b * max_blocks + blk] * heads + row % heads;
        if (slot_of != nullptr) slot = slot_of[key];
        cacheable = (blk + 1) * BLOCK_TOKENS <= seq_lens[b];
        if (last_seen != nullptr) cacheable = cacheable && *stamp - last_seen[key] <= window;
    }
    const bool miss = live && slot < 0;
    const bool admit = miss && cacheable && slot_of != nullptr;
    // Misses in the low 32 bits, admissions in the high: one scan and one look-back for both.
    // The CPU's share needs no count of its own: of the first r misses, floor(r * frac) go
    // to the CPU (the per-miss rule below telescopes to that).
    unsigned long long tile_total;
    const unsigned long long mine = block_exclusive_scan((miss ? 1ull : 0ull) | (admit ? 1ull << 32 : 0ull),
                                                         scan_tmp, tile_total);
    const unsigned long long at = look_back(status, tile, tile_total, &before_sh) + mine;
    const unsigned long long r = at & 0xffffffffull;  // misses before this entry
    const long long cpu_before = (long long)((double)r * frac);
    const bool to_cpu = miss && (long long)((double)(r + 1) * frac) > cpu_before;
    if (live) {
        sel_slot[e] = to_cpu ? SLOT_CPU : slot;
        if (to_cpu) {
            cpu_blocks[cpu_before] = blk;
            atomicAdd(&row_cpu[row], 1);
        }
        if (admit) admit_keys[at >> 32] = key;
        if (last_seen != nullptr) last_seen[key] = *stamp;  // a key is selected at most once per call: no race
    }

    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(&counters[1], 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Every tile is done: the CPU lists' row offsets, the counts, and the scratch back to zero.
    unsigned long long carry = 0;
    for (int base = 0; base < rows; base += SELECT_THREADS) {
        const int i = base + tid;
        const int c = i < rows ? __ldcg(row_cpu + i) : 0;
        unsigned long long tot;
        const unsigned long long ex = block_exclusive_scan((unsigned long long)c, scan_tmp, tot);
        if (i < rows) { cpu_indptr[i] = (int)(carry + ex); row_cpu[i] = 0; }
        carry += tot;
    }
    const unsigned long long all = __ldcg(status + gridDim.x - 1) & LB_VALUE;
    __syncthreads();  // every thread has read the last tile's status
    for (int i = tid; i < (int)gridDim.x; i += SELECT_THREADS) status[i] = 0ull;
    if (tid == 0) {
        const long long misses = (long long)(all & 0xffffffffull);
        cpu_indptr[rows] = (int)carry;
        counts[0] = nnz - (int)misses;
        counts[1] = (int)(misses - (long long)carry);
        counts[2] = (int)carry;
        counts[3] = (int)(all >> 32);
        counters[0] = 0u;
        counters[1] = 0u;
    }
}

// The count and the ring position are read on the device, so a layer queues its admission
// without a host round trip: n = min(counts[3], slot_count) runs, spread over a fixed grid.
// n <= slot_count, so every run owns a distinct slot, and an admitted key is a miss, so it is
// nobody's old owner: no two CTAs race.
__global__ void admit_blocks(const int* __restrict__ admit_keys,  // [>= n] page * heads + head
                             const int* __restrict__ counts,      // [4]: counts[3] runs listed
                             int slot_base, int slot_count,
                             const int* __restrict__ ring,        // [1] next slot of the ring
                             int* __restrict__ slot_of,           // [P * heads]
                             int* __restrict__ owner,             // [>= slot_base + slot_count]
                             const uint4* __restrict__ kv_pages,  // arena runs, [P * heads, run_vec]
                             uint4* __restrict__ pool,            // [S, run_vec]
                             int run_vec)                         // 16-byte words per run
{
    const int n = min(counts[3], slot_count);
    const int r0 = ring[0];
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const int key = admit_keys[i];
        const int slot = slot_base + (r0 + i) % slot_count;
        const uint4* src = kv_pages + (long long)key * run_vec;
        uint4* dst = pool + (long long)slot * run_vec;
        for (int t = threadIdx.x; t < run_vec; t += blockDim.x) dst[t] = src[t];
        if (threadIdx.x == 0) {
            const int old = owner[slot];
            if (old >= 0 && slot_of[old] == slot) slot_of[old] = -1;
            owner[slot] = key;
            slot_of[key] = slot;
        }
    }
}

// After admit_blocks (stream order): the ring moves past the slots it filled.
__global__ void advance_ring(const int* __restrict__ counts, int slot_count, int* __restrict__ ring)
{
    ring[0] = (ring[0] + min(counts[3], slot_count)) % slot_count;
}
