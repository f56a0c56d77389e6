# Declarations of attention_job.h (the chunk plan, claim loop and merge shared by the OpenMP
# path in _attention.pyx and the worker team in _team.pyx), cimported by both.

from libc.stdint cimport int32_t, int64_t, uint16_t

cdef extern from "attention_job.h" nogil:
    ctypedef struct fx_arena:
        const uint16_t *kv
        int64_t num_pages
        int64_t page_stride
        int64_t head_stride
        int d
        int g
    ctypedef struct fx_attn_job:
        fx_arena a
        const float *q
        const int32_t *bt
        int64_t bt_stride
        const int32_t *seq_lens
        const int32_t *indptr
        const int32_t *blocks
        const uint16_t *masks
        int64_t B, hq, hkv, rows, nnz
        float *o
        float *m
        float *l
        int isa, prefetch
        int64_t nc  # chunks, once planned
    float FX_LOG2E
    int fx_cpu_isa()
    void *fx_alloc(size_t bytes)
    void fx_prepare_q(const float *q, float *dst, int64_t heads, int d, float scale, int isa)
    void fx_token_scores(const float *q, const uint16_t *K, int d, int g, int32_t blk,
                         int32_t seq_len, float *out, float *sp, int isa)
    void fx_block_lse(const float *q, const uint16_t *K, int d, int g, int32_t blk,
                      int32_t seq_len, float *out, float *sp, int isa)
    void fx_job_scratch(int64_t rows, int64_t parts, int64_t q_floats, int g, int d, int members,
                        int64_t *n_i64, int64_t *n_f32)
    int64_t fx_csr_bad_row(const int32_t *indptr, int64_t rows, int64_t nnz)
    void fx_job_plan(fx_attn_job *j, int64_t parts, int members, float scale2, int64_t *i64, float *f32)
    void fx_job_work(fx_attn_job *j, int member)
    int64_t fx_job_first_bad(const fx_attn_job *j)
