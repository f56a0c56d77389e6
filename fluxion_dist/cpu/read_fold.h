/* The reads the attention kernel is judged against, with no arithmetic: XOR folds of words.
 *
 * A share is one contiguous slice of `n` words (starts NULL) or of `n` runs of `run_words`
 * words at `starts`, member `member` of `members` taking the [n*m/M, n*(m+1)/M) part. The
 * OpenMP ceilings (_stream.pyx, a share per thread) and the worker team's (_team.pyx, shares
 * claimed as the attention job claims chunks) read the same runs, so a path's kernel is judged
 * against a read made by the same threads.
 */
#ifndef FX_READ_FOLD_H
#define FX_READ_FOLD_H

#include <stdint.h>

/* One run folded, a line of the next run requested per line read (as the attention kernel
 * spreads its prefetches over its work: a burst of them overflows the line-fill buffers). */
static inline uint64_t fx_fold_run(const uint64_t *p, const uint64_t *next, int64_t words) {
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (int64_t w = 0; w + 8 <= words; w += 8) {
        if (next) __builtin_prefetch(next + w, 0, 3);
        a ^= p[w] ^ p[w + 4];
        b ^= p[w + 1] ^ p[w + 5];
        c ^= p[w + 2] ^ p[w + 6];
        d ^= p[w + 3] ^ p[w + 7];
    }
    for (int64_t w = words & ~(int64_t)7; w < words; w++) a ^= p[w];
    return a ^ b ^ c ^ d;
}

static inline uint64_t fx_fold_share(const uint64_t *words, int64_t n, const int64_t *starts,
                                     int64_t run_words, int member, int members) {
    const int64_t lo = n * member / members, hi = n * (member + 1) / members;
    if (starts == NULL) return fx_fold_run(words + lo, NULL, hi - lo);
    uint64_t part = 0;
    for (int64_t e = lo; e < hi; e++)
        part ^= fx_fold_run(words + starts[e], e + 1 < hi ? words + starts[e + 1] : NULL, run_words);
    return part;
}

/* A fold as a team task (worker_team.h): members claim `pieces` shares from a counter, so any
 * set of members that joins covers them all. */
typedef struct {
    const uint64_t *words;
    const int64_t *starts;
    int64_t n, run_words;
    int pieces;
    int next;     /* atomic: the next share to claim */
    uint64_t acc; /* atomic: the XOR of the shares folded */
} fx_fold_job;

static inline void fx_fold_work(void *arg, int member) {
    fx_fold_job *j = (fx_fold_job *)arg;
    (void)member;
    for (int c; (c = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED)) < j->pieces;)
        __atomic_fetch_xor(&j->acc, fx_fold_share(j->words, j->n, j->starts, j->run_words, c, j->pieces),
                           __ATOMIC_RELAXED);
}

#endif
