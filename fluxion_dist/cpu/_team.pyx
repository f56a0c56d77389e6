# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The sparse partial attention on a persistent worker team (worker_team.h + attention_job.h).

``Team`` owns the native threads, the scratch (grown, never shrunk) and the
step's bound arena. Use it through ``fluxion_dist.cpu.team.AttentionTeam``,
whose ``bind`` checks the arena, the sequence lengths and the head layout once
per step in Python; ``attend``, once per layer, checks here in C only what a
layer changes (q, the block tables, the selection), so a layer call costs a
few microseconds before any KV is read. The job is the one the OpenMP path
runs, so both give the same bits for the same thread and chunk counts.
"""

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint16_t, uint64_t
from libc.math cimport fabsf
from libc.stdlib cimport free, malloc

import numpy as np

from fluxion_dist.cpu import _checks
from fluxion_dist.cpu.attention import BatchPartial

cnp.import_array()


from fluxion_dist.cpu._attention_job cimport (
    fx_arena, fx_attn_job, FX_LOG2E, fx_alloc, fx_job_scratch, fx_csr_bad_row, fx_job_plan, fx_job_work, fx_job_first_bad)


cdef extern from "worker_team.h" nogil:
    ctypedef struct fx_team:
        pass
    ctypedef void (*fx_task_fn)(void *arg, int member) noexcept nogil
    fx_team *fx_team_create(int n, int64_t spin_ns, int64_t pause_ns)
    void fx_team_destroy(fx_team *t)
    int fx_team_run(fx_team *t, fx_task_fn fn, void *arg, int64_t workers)
    void fx_team_hold(fx_team *t, int hold)


cdef extern from "host_job.h" nogil:
    ctypedef struct fx_host_job:
        fx_team *team
        fx_attn_job job
        const int32_t *counts
        int64_t capacity, parts
        int members
        float scale2
        int64_t *i64
        float *f32
        int64_t last_entries, last_ns
        int error
        int64_t detail
    void fx_host_job_run(void *arg) noexcept
    int FX_HOST_OK, FX_HOST_BUSY, FX_HOST_FORKED, FX_HOST_BAD_CSR, FX_HOST_BAD_BLOCK, FX_HOST_TOO_MANY


cdef extern from "read_fold.h" nogil:
    ctypedef struct fx_fold_job:
        const uint64_t *words
        const int64_t *starts
        int64_t n, run_words
        int pieces, next
        uint64_t acc
    void fx_fold_work(void *arg, int member) noexcept


cdef extern from "selection_job.h" nogil:
    ctypedef struct fx_cut:
        pass
    ctypedef struct fx_quest_job:
        const float *qs
        const float *qa
        const uint16_t *kmin
        const uint16_t *kmax
        const int32_t *bt
        int64_t bt_s0, bt_s1
        const int32_t *seq_lens
        float *out
        int64_t P, hkv, hq, d, maxb, tiles, items
        int avx2
        int64_t next
        int64_t *err
    ctypedef struct fx_rows_job:
        const float *x
        int64_t n, R
        const int32_t *row_lens
        const int64_t *k
        const double *p
        uint64_t *keys
        double *w
        fx_cut *cuts
        const int32_t *indptr
        int32_t *ids
        int phase
        int64_t next
    int FX_QUEST_TILE
    void fx_quest_work(void *arg, int member) noexcept
    void fx_rows_work(void *arg, int member) noexcept


cdef void _work(void *arg, int member) noexcept nogil:
    fx_job_work(<fx_attn_job *>arg, member)


cdef inline bint _is(cnp.ndarray x, int typenum, int ndim) noexcept:
    return cnp.PyArray_TYPE(x) == typenum and cnp.PyArray_NDIM(x) == ndim


def _what(x) -> str:
    return f"{x.dtype} {x.shape} (strides {x.strides})"


cdef class Team:
    """``num_threads`` members (the caller and num_threads - 1 native threads) waiting
    ``spin_us`` between tasks before they sleep, on the core for the first ``pause_us`` of it and
    yielding it for the rest. One caller at a time."""

    cdef fx_team *team
    cdef readonly int num_threads
    cdef int64_t parts
    cdef bint running
    # the bound step
    cdef object kv_pages
    cdef fx_arena arena
    cdef int64_t B, hq, hkv
    cdef int32_t *seq_lens
    cdef int32_t max_seq_len
    cdef int isa, prefetch
    cdef float scale2
    cdef bint bound
    # scratch
    cdef int64_t *i64
    cdef float *f32
    cdef int64_t cap_i64, cap_f32

    def __cinit__(self, int num_threads, double spin_us, double pause_us, int chunks_per_thread):
        if num_threads < 1 or chunks_per_thread < 1 or not 0 <= spin_us <= 1e6 or not 0 <= pause_us <= 1e6:
            raise ValueError("num_threads and chunks_per_thread must be >= 1, spin_us and pause_us in [0, 1e6]")
        self.num_threads = num_threads
        self.parts = 1 if num_threads == 1 else <int64_t>num_threads * chunks_per_thread
        self.team = fx_team_create(num_threads, <int64_t>(spin_us * 1000), <int64_t>(pause_us * 1000))
        if self.team == NULL:
            raise OSError(f"could not start a team of {num_threads - 1} worker threads")

    def __dealloc__(self):
        fx_team_destroy(self.team)
        free(self.seq_lens)
        free(self.i64)
        free(self.f32)

    @property
    def closed(self) -> bool:
        return self.team == NULL

    def close(self) -> None:
        """Stop and join the worker threads (idempotent); the team cannot run afterwards."""
        if self.running:
            raise RuntimeError("the team is running a call on another thread")
        fx_team_destroy(self.team)
        self.team = NULL

    def _bind(self, cnp.ndarray kv_pages not None, cnp.ndarray seq_lens not None, int num_q_heads,
              float scale, int isa, int prefetch):
        """The step's arena and lengths, already checked (team.AttentionTeam.bind). The lengths
        are copied, so the caller may reuse its array; the arena is referenced, not copied."""
        cdef int64_t b, n = seq_lens.shape[0]
        cdef const int32_t *src = <const int32_t *>cnp.PyArray_DATA(seq_lens)
        cdef int32_t *lens = <int32_t *>malloc(max(n, 1) * sizeof(int32_t))
        if lens == NULL:
            raise MemoryError("no memory for the bound sequence lengths")
        self.bound = False
        free(self.seq_lens)
        self.seq_lens = lens
        self.max_seq_len = 0
        for b in range(n):
            lens[b] = src[b]
            if src[b] > self.max_seq_len:
                self.max_seq_len = src[b]
        self.kv_pages = kv_pages
        self.arena.kv = <const uint16_t *>cnp.PyArray_DATA(kv_pages)
        self.arena.num_pages = kv_pages.shape[0]
        self.arena.page_stride = kv_pages.strides[0] // 2
        self.arena.head_stride = kv_pages.strides[1] // 2
        self.arena.d = <int>kv_pages.shape[4]
        self.hkv = kv_pages.shape[1]
        self.arena.g = <int>(num_q_heads // self.hkv)
        self.B, self.hq = n, num_q_heads
        self.scale2 = scale * FX_LOG2E
        self.isa, self.prefetch = isa, prefetch
        self.bound = True

    cdef int _grow(self, int64_t n_i64, int64_t n_f32) except -1:
        if n_i64 > self.cap_i64:
            free(self.i64)
            self.i64 = <int64_t *>malloc(2 * n_i64 * sizeof(int64_t))
            self.cap_i64 = 0 if self.i64 == NULL else 2 * n_i64
        if n_f32 > self.cap_f32:
            free(self.f32)
            self.f32 = <float *>fx_alloc(2 * n_f32 * sizeof(float))
            self.cap_f32 = 0 if self.f32 == NULL else 2 * n_f32
        if self.i64 == NULL or self.f32 == NULL:
            raise MemoryError("no memory for the team's scratch")
        return 0

    def attend(self, cnp.ndarray q not None, cnp.ndarray block_tables not None,
               cnp.ndarray sel_indptr not None, cnp.ndarray sel_blocks not None,
               cnp.ndarray sel_masks=None):
        """The BatchPartial of q [B, Hq, d] f32 over the CSR selection, for the bound arena and
        lengths with this layer's ``block_tables [B, max_blocks]`` i32 (rows may be strided)."""
        if not self.bound or self.team == NULL:
            raise RuntimeError("bind a step first" if self.team != NULL else "the team is closed")
        if self.running:
            raise RuntimeError("the team is running a call on another thread")
        cdef int d = self.arena.d
        cdef int64_t R = self.B * self.hkv
        cdef cnp.npy_intp *qs = cnp.PyArray_DIMS(q)
        if not _is(q, cnp.NPY_FLOAT32, 3) or not cnp.PyArray_IS_C_CONTIGUOUS(q) or qs[0] != self.B \
                or qs[1] != self.hq or qs[2] != d:
            raise ValueError(f"q must be C-contiguous float32 [{self.B}, {self.hq}, {d}] (the bound "
                             f"step's); got {_what(q)}")
        if not _is(block_tables, cnp.NPY_INT32, 2) or block_tables.shape[0] != self.B \
                or (block_tables.shape[1] > 1 and block_tables.strides[1] != 4) \
                or block_tables.strides[0] % 4:
            raise ValueError(f"block_tables must be int32 [B={self.B}, max_blocks] with contiguous "
                             f"rows; got {_what(block_tables)}")
        if self.max_seq_len > block_tables.shape[1] * 16:
            raise ValueError(f"block_tables has {block_tables.shape[1]} columns; the bound lengths "
                             f"reach {self.max_seq_len} tokens")
        if not _is(sel_indptr, cnp.NPY_INT32, 1) or not cnp.PyArray_IS_C_CONTIGUOUS(sel_indptr) \
                or sel_indptr.shape[0] != R + 1:
            raise ValueError(f"sel_indptr must be C-contiguous int32 [{R + 1}]; got "
                             f"{_what(sel_indptr)}")
        if not _is(sel_blocks, cnp.NPY_INT32, 1) or not cnp.PyArray_IS_C_CONTIGUOUS(sel_blocks):
            raise ValueError(f"sel_blocks must be C-contiguous int32 [nnz]; got "
                             f"{_what(sel_blocks)}")
        cdef int64_t nnz = sel_blocks.shape[0]
        if sel_masks is not None and (not _is(sel_masks, cnp.NPY_UINT16, 1) or sel_masks.shape[0] != nnz
                                      or not cnp.PyArray_IS_C_CONTIGUOUS(sel_masks)):
            raise ValueError(f"sel_masks must be C-contiguous uint16 [{nnz}]; got "
                             f"{_what(sel_masks)}")
        cdef const int32_t *indptr = <const int32_t *>cnp.PyArray_DATA(sel_indptr)
        cdef int64_t bad = fx_csr_bad_row(indptr, R, nnz)
        if bad != -1:
            raise ValueError(f"sel_indptr must rise from 0 to len(sel_blocks)={nnz}; got first "
                             f"{indptr[0]}, last {indptr[R]}" if bad == -2 else
                             f"sel_indptr must not decrease; row {bad} has {indptr[bad]} > {indptr[bad + 1]}")

        cdef cnp.npy_intp dims[3]
        dims[0], dims[1], dims[2] = self.B, self.hq, d
        cdef cnp.ndarray o = cnp.PyArray_EMPTY(3, dims, cnp.NPY_FLOAT32, 0)
        cdef cnp.ndarray m = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
        cdef cnp.ndarray l = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
        cdef int64_t n_i64, n_f32
        fx_job_scratch(R, self.parts, self.B * self.hq * d, self.arena.g, d, self.num_threads, &n_i64, &n_f32)
        self._grow(n_i64, n_f32)

        cdef fx_attn_job j
        j.a = self.arena
        j.q = <const float *>cnp.PyArray_DATA(q)
        j.bt = <const int32_t *>cnp.PyArray_DATA(block_tables)
        j.bt_stride = block_tables.strides[0] // 4
        j.seq_lens = self.seq_lens
        j.indptr = indptr
        j.blocks = <const int32_t *>cnp.PyArray_DATA(sel_blocks)
        j.masks = NULL
        if sel_masks is not None:
            j.masks = <const uint16_t *>cnp.PyArray_DATA(sel_masks)
        j.B, j.hq, j.hkv, j.rows, j.nnz = self.B, self.hq, self.hkv, R, nnz
        j.o = <float *>cnp.PyArray_DATA(o)
        j.m = <float *>cnp.PyArray_DATA(m)
        j.l = <float *>cnp.PyArray_DATA(l)
        j.isa, j.prefetch = self.isa, self.prefetch
        cdef int ran
        self.running = True
        with nogil:
            fx_job_plan(&j, self.parts, self.num_threads, self.scale2, self.i64, self.f32)
            ran = fx_team_run(self.team, _work, &j, j.nc - 1)
            bad = fx_job_first_bad(&j) if ran == 0 else -1
        self.running = False
        if ran != 0:
            raise RuntimeError("the team's threads belong to the process it was made in (this one forked "
                               "since): make a team here" if ran == -2 else "the team is running a call")
        if bad >= 0:
            dims_ = _checks.ArenaDims(self.B, self.hq, self.hkv, d, self.arena.num_pages, block_tables.shape[1])
            lens = cnp.PyArray_SimpleNew(1, dims, cnp.NPY_INT32)
            for b in range(self.B):
                lens[b] = self.seq_lens[b]
            raise _checks.bad_block(sel_indptr, sel_blocks, bad, dims_, block_tables, lens)
        return tuple.__new__(BatchPartial, (o, m, l))  # skips the NamedTuple's Python __new__

    def scattered_read(self, const uint64_t[::1] words not None, const int64_t[::1] starts not None,
                       int64_t run_words):
        """XOR-fold the runs of ``run_words`` words at ``starts`` on this team, each member a
        contiguous share (read_fold.h): the attention kernel's reads with no arithmetic, made
        by the same threads, for benchmarks. Returns the fold."""
        cdef int64_t e, n = starts.shape[0]
        if run_words < 0:
            raise ValueError(f"run_words must be >= 0; got {run_words}")
        for e in range(n):
            if starts[e] < 0 or starts[e] + run_words > words.shape[0]:
                raise ValueError(f"run {e} [{starts[e]}, {starts[e] + run_words}) lies outside the "
                                 f"{words.shape[0]} words")
        if n == 0:
            return 0
        cdef fx_fold_job j
        j.words, j.starts, j.n, j.run_words = &words[0], &starts[0], n, run_words
        j.pieces, j.next, j.acc = self.parts, 0, 0
        self._run(fx_fold_work, &j, j.pieces - 1)
        return j.acc

    def _host_job(self, cnp.ndarray kv_pages, cnp.ndarray seq_lens, cnp.ndarray block_tables, cnp.ndarray q,
                  cnp.ndarray indptr, cnp.ndarray blocks, cnp.ndarray counts, cnp.ndarray o, cnp.ndarray m,
                  cnp.ndarray l, float scale, int isa, int prefetch):
        """A HostJob on this team over checked buffers (team.AttentionTeam.host_job)."""
        if self.team == NULL:
            raise RuntimeError("the team is closed")
        return HostJob(self, kv_pages, seq_lens, block_tables, q, indptr, blocks, counts, o, m, l, scale, isa,
                       prefetch)

    def hold_workers(self, bint hold):
        """Tests: while held, the workers join no call, as if the scheduler never ran them; the
        caller then does all the work."""
        if self.team == NULL:
            raise RuntimeError("the team is closed")
        fx_team_hold(self.team, hold)

    # ---- selection (selection_job.h): the OpenMP drivers' kernels, on this team -------------

    cdef int _run(self, fx_task_fn fn, void *job, int64_t workers) except -1:
        if self.team == NULL:
            raise RuntimeError("the team is closed")
        if self.running:
            raise RuntimeError("the team is running a call on another thread")
        cdef int ran
        self.running = True
        with nogil:
            ran = fx_team_run(self.team, fn, job, workers)
        self.running = False
        if ran != 0:
            raise RuntimeError("the team's threads belong to the process it was made in (this one forked "
                               "since): make a team here" if ran == -2 else "the team is running a call")
        return 0

    def quest_scores(self, const float[:, :, ::1] q, const uint16_t[:, :, ::1] kmin,
                     const uint16_t[:, :, ::1] kmax, const int32_t[:, :] block_tables,
                     const int32_t[::1] seq_lens, float scale, bint avx2, float[:, :, ::1] out):
        """_selection.quest_scores on this team (unchecked: call it through
        cpu.selection.quest_scores_paged). Returns -1 or b * max_blocks + j of a block whose
        page lies outside the arena."""
        cdef int64_t B = q.shape[0], hq = q.shape[1], d = q.shape[2], n = B * hq * d, i
        cdef fx_quest_job j
        j.maxb = block_tables.shape[1]
        j.tiles = (j.maxb + FX_QUEST_TILE - 1) // FX_QUEST_TILE
        j.hkv, j.hq, j.d, j.P = kmin.shape[1], hq, d, kmin.shape[0]
        j.items = B * j.hkv * j.tiles
        if j.items == 0:
            return -1
        cdef float[::1] qs = np.empty(2 * n, dtype=np.float32)
        cdef int64_t[::1] err = np.empty(j.items, dtype=np.int64)
        cdef const float *qp = &q[0, 0, 0]
        for i in range(n):
            qs[i] = qp[i] * scale
            qs[n + i] = fabsf(qs[i])
        j.qs, j.qa = &qs[0], &qs[n]
        j.kmin, j.kmax = &kmin[0, 0, 0], &kmax[0, 0, 0]
        j.bt = &block_tables[0, 0]
        j.bt_s0, j.bt_s1 = block_tables.strides[0] // 4, block_tables.strides[1] // 4
        j.seq_lens, j.out, j.avx2, j.next, j.err = &seq_lens[0], &out[0, 0, 0], avx2, 0, &err[0]
        self._run(fx_quest_work, &j, j.items - 1)
        for i in range(j.items):
            if err[i] >= 0:
                return err[i]
        return -1

    def topk_rows(self, const float[:, ::1] x, const int32_t[::1] row_lens, const int64_t[::1] k,
                  int32_t[::1] indptr, int32_t[::1] ids):
        """_selection.topk_rows on this team (unchecked: cpu.selection.select_topk); returns nnz."""
        return self._rows(x, row_lens, &k[0] if k.shape[0] else NULL, NULL, indptr, ids)

    def topp_rows(self, const float[:, ::1] x, const int32_t[::1] row_lens, const double[::1] p,
                  int32_t[::1] indptr, int32_t[::1] ids):
        """_selection.topp_rows on this team (unchecked: cpu.selection.select_topp); returns nnz."""
        return self._rows(x, row_lens, NULL, &p[0] if p.shape[0] else NULL, indptr, ids)

    cdef int64_t _rows(self, const float[:, ::1] x, const int32_t[::1] row_lens, const int64_t *k,
                       const double *p, int32_t[::1] indptr, int32_t[::1] ids) except -1:
        cdef int64_t R = x.shape[0], n = x.shape[1], r
        indptr[0] = 0
        if R == 0:
            return 0
        cdef fx_rows_job j
        cdef uint64_t[::1] keys = np.empty(self.num_threads * n + 1, dtype=np.uint64)
        cdef double[::1] w = np.empty(self.num_threads * n + 1 if p != NULL else 1, dtype=np.float64)
        cdef int64_t[::1] cuts = np.empty(2 * R, dtype=np.int64)  # fx_cut: (threshold, count)
        j.x, j.n, j.R, j.row_lens, j.k, j.p = &x[0, 0], n, R, &row_lens[0], k, p
        j.keys, j.w, j.cuts = &keys[0], &w[0], <fx_cut *>&cuts[0]
        j.indptr, j.ids, j.phase, j.next = &indptr[0], NULL, 0, 0
        self._run(fx_rows_work, &j, R - 1)
        for r in range(R):
            indptr[r + 1] = <int32_t>(indptr[r] + cuts[2 * r + 1])
        if indptr[R] > 0:
            j.ids, j.phase, j.next = &ids[0], 1, 0
            self._run(fx_rows_work, &j, R - 1)
        return indptr[R]


cdef class HostJob:
    """A layer's CPU share, run from a CUDA host node (host_job.h) or by ``run`` (tests, and
    the host's own call). Holds the buffers it reads and writes, and the team."""

    cdef fx_host_job *h
    cdef object refs

    def __cinit__(self, Team team, cnp.ndarray kv_pages, cnp.ndarray seq_lens, cnp.ndarray block_tables,
                  cnp.ndarray q, cnp.ndarray indptr, cnp.ndarray blocks, cnp.ndarray counts, cnp.ndarray o,
                  cnp.ndarray m, cnp.ndarray l, float scale, int isa, int prefetch):
        cdef int64_t n_i64, n_f32
        self.h = <fx_host_job *>malloc(sizeof(fx_host_job))
        if self.h == NULL:
            raise MemoryError("no memory for a host job")
        self.refs = (team, kv_pages, seq_lens, block_tables, q, indptr, blocks, counts, o, m, l)
        cdef fx_host_job *h = self.h
        h.i64, h.f32 = NULL, NULL
        h.team = team.team
        h.job.a.kv = <const uint16_t *>cnp.PyArray_DATA(kv_pages)
        h.job.a.num_pages = kv_pages.shape[0]
        h.job.a.page_stride = kv_pages.strides[0] // 2
        h.job.a.head_stride = kv_pages.strides[1] // 2
        h.job.a.d = <int>kv_pages.shape[4]
        h.job.hkv = kv_pages.shape[1]
        h.job.B, h.job.hq = q.shape[0], q.shape[1]
        h.job.a.g = <int>(h.job.hq // h.job.hkv)
        h.job.rows = h.job.B * h.job.hkv
        h.job.q = <const float *>cnp.PyArray_DATA(q)
        h.job.bt = <const int32_t *>cnp.PyArray_DATA(block_tables)
        h.job.bt_stride = block_tables.strides[0] // 4
        h.job.seq_lens = <const int32_t *>cnp.PyArray_DATA(seq_lens)
        h.job.indptr = <const int32_t *>cnp.PyArray_DATA(indptr)
        h.job.blocks = <const int32_t *>cnp.PyArray_DATA(blocks)
        h.job.masks = NULL
        h.job.nnz = 0
        h.job.o = <float *>cnp.PyArray_DATA(o)
        h.job.m = <float *>cnp.PyArray_DATA(m)
        h.job.l = <float *>cnp.PyArray_DATA(l)
        h.job.isa, h.job.prefetch = isa, prefetch
        h.counts = <const int32_t *>cnp.PyArray_DATA(counts)
        h.capacity = blocks.shape[0]
        h.parts, h.members = team.parts, team.num_threads
        h.scale2 = scale * FX_LOG2E
        h.last_entries, h.last_ns, h.error, h.detail = 0, 0, FX_HOST_OK, 0
        fx_job_scratch(h.job.rows, h.parts, h.job.B * h.job.hq * h.job.a.d, h.job.a.g, h.job.a.d, h.members,
                       &n_i64, &n_f32)
        h.i64 = <int64_t *>malloc(max(n_i64, 1) * sizeof(int64_t))
        h.f32 = <float *>fx_alloc(max(n_f32, 1) * sizeof(float))
        if h.i64 == NULL or h.f32 == NULL:
            raise MemoryError("no memory for a host job's scratch")

    def __dealloc__(self):
        if self.h != NULL:
            free(self.h.i64)
            free(self.h.f32)
            free(self.h)

    @property
    def function(self) -> int:
        """The address of the host function (a CUhostFn)."""
        return <size_t>&fx_host_job_run

    @property
    def address(self) -> int:
        """The host function's argument."""
        return <size_t>self.h

    @property
    def last_entries(self) -> int:
        """The CPU's (block, head) entries in the last call."""
        return self.h.last_entries

    @property
    def last_seconds(self) -> float:
        return self.h.last_ns * 1e-9

    def run(self):
        """Call the host function here, as a host node would."""
        with nogil:
            fx_host_job_run(self.h)

    def take_error(self):
        """None, or the error latched since the last take (an exception to raise), cleared."""
        cdef int err = self.h.error
        cdef int64_t detail = self.h.detail
        self.h.error, self.h.detail = FX_HOST_OK, 0
        if err == FX_HOST_OK:
            return None
        if err == FX_HOST_BAD_BLOCK:
            team, kv, lens, bt, q, indptr, blocks = self.refs[:7]
            dims = _checks.ArenaDims(q.shape[0], q.shape[1], kv.shape[1], kv.shape[4], kv.shape[0], bt.shape[1])
            return _checks.bad_block(indptr, blocks, detail, dims, bt, lens)
        if err == FX_HOST_BAD_CSR:
            return ValueError(f"the CPU share's CSR is malformed at row {detail}")
        if err == FX_HOST_TOO_MANY:
            return ValueError(f"the CPU share names {detail} entries; its buffer holds {self.h.capacity}")
        return RuntimeError("the team's threads belong to the process it was made in (this one forked since)"
                            if err == FX_HOST_FORKED else "the team was running another call")
