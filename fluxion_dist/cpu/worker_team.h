/* A persistent team of native worker threads that runs one task at a time.
 *
 * The caller is member 0 and works beside the n-1 workers, which are created
 * once and wait between tasks: they spin on the task counter for `spin_ns`
 * (a decode step calls once per layer, so the next task usually comes within
 * that window and no thread sleeps), then sleep on a condition variable. The
 * first `pause_ns` of a wait spin on the core; past it a waiter yields between
 * checks, because a core-holding spinner on a loaded machine keeps the very
 * thread it waits for off that core. There is no OpenMP here: no fork/join per
 * call and no interaction with the OpenMP runtime's own pool.
 *
 * Tasks split their work dynamically (members claim pieces from a counter), so
 * a task is done once the caller's own share returns and every worker that
 * JOINED it has finished. A worker joins through the task's gate (the task's
 * number and a count, one atomic word) and the caller closes the gate when its
 * share returns: a worker that was not on a core in time (another process on
 * its core, a worker asleep) finds the gate closed and touches nothing, so a
 * call never waits for a thread the scheduler has not run. The caller writes
 * the task before publishing it (seq_cst) and reads the joined workers'
 * results after their finish count (acquire), so each side sees the other's
 * writes.
 *
 * Sleep handshake: a worker counts itself among the sleepers and re-reads the
 * counter under the mutex; the caller bumps the counter and then reads the
 * sleeper count (both sequentially consistent), and broadcasts only when one
 * is asleep. Either the worker sees the new counter, or the caller sees the
 * sleeper and its broadcast finds it waiting.
 */
#ifndef FX_WORKER_TEAM_H
#define FX_WORKER_TEAM_H

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

typedef void (*fx_task_fn)(void *arg, int member);

#define FX_GATE_CLOSED ((uint64_t)1 << 31)

/* Bumped in a forked child: a team made before the fork has no threads there, and waiting on
 * them would hang, so fx_team_run refuses a team of another epoch. */
static int fx_fork_epoch;
static pthread_once_t fx_fork_once = PTHREAD_ONCE_INIT;
static void fx_on_fork_child(void) { fx_fork_epoch++; }
static void fx_watch_forks(void) { pthread_atfork(NULL, NULL, fx_on_fork_child); }

typedef struct fx_team fx_team;

typedef struct {
    fx_team *team;
    int member;
} fx_member;

struct fx_team {
    int n; /* members, the caller included */
    int64_t spin_ns, pause_ns;
    pthread_t *threads;
    fx_member *members;
    int started; /* workers created */
    int epoch;   /* fx_fork_epoch at creation */
    /* task */
    fx_task_fn fn;
    void *arg;
    uint64_t task;  /* atomic: bumped once per task */
    uint64_t gate;  /* atomic: the open task's number << 32 | FX_GATE_CLOSED | workers joined */
    int want;       /* workers the current task can use (joins past it are refused) */
    int finished;   /* atomic: joined workers done with the current task */
    int joined;     /* the caller's: workers in the current task once its gate closed */
    int hold;       /* atomic: workers join no task (tests: a team whose threads never get a core) */
    int busy;       /* atomic: a caller is inside fx_team_run */
    int stop;       /* atomic */
    int sleepers;   /* atomic */
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static inline int64_t fx_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void fx_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Wait for the task counter to move past `seen` (workers) or every joined worker to finish
 * (the caller): pause-spin `pause_ns` (on the core, ready within a few cycles), then spin with
 * yields, so a waiting thread gives its core to a runnable one (the caller, another process)
 * on a loaded machine; workers sleep once `spin_ns` is over. */
static inline int fx_team_waited(const fx_team *t, uint64_t seen, int caller) {
    return caller ? __atomic_load_n(&t->finished, __ATOMIC_ACQUIRE) == t->joined
                  : __atomic_load_n(&t->task, __ATOMIC_ACQUIRE) != seen;
}

static int fx_team_spin(const fx_team *t, uint64_t seen, int caller) {
    if (fx_team_waited(t, seen, caller)) return 1;
    const int64_t start = fx_now_ns();
    int yielding = t->pause_ns == 0;
    for (unsigned i = 1;; i++) {
        if (fx_team_waited(t, seen, caller)) return 1;
        if (yielding || (i & 31) == 0) { /* a clock read costs about what a pause does */
            const int64_t waited = fx_now_ns() - start;
            if (!caller && waited > t->spin_ns) return 0;
            yielding = waited >= t->pause_ns;
        }
        if (yielding)
            sched_yield();
        else
            fx_pause();
    }
}

static uint64_t fx_team_wait_task(fx_team *t, uint64_t seen) {
    uint64_t now;
    if (!fx_team_spin(t, seen, 0)) {
        pthread_mutex_lock(&t->mu);
        __atomic_fetch_add(&t->sleepers, 1, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&t->task, __ATOMIC_SEQ_CST) == seen) pthread_cond_wait(&t->cv, &t->mu);
        __atomic_fetch_sub(&t->sleepers, 1, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&t->mu);
    }
    now = __atomic_load_n(&t->task, __ATOMIC_ACQUIRE);
    return now;
}

/* Join task `seen` unless its gate has closed (or moved on to a later task). */
static int fx_team_join(fx_team *t, uint64_t seen) {
    if (__atomic_load_n(&t->hold, __ATOMIC_ACQUIRE)) return 0;
    uint64_t g = __atomic_load_n(&t->gate, __ATOMIC_ACQUIRE);
    for (;;) {
        if ((g >> 32) != (uint32_t)seen || (g & FX_GATE_CLOSED) || (int)(g & (FX_GATE_CLOSED - 1)) >= t->want)
            return 0;
        if (__atomic_compare_exchange_n(&t->gate, &g, g + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return 1;
    }
}

static void *fx_team_worker(void *p) {
    fx_member *me = (fx_member *)p;
    fx_team *t = me->team;
    uint64_t seen = 0;
    for (;;) {
        seen = fx_team_wait_task(t, seen);
        if (__atomic_load_n(&t->stop, __ATOMIC_ACQUIRE)) return NULL;
        if (!fx_team_join(t, seen)) continue;
        t->fn(t->arg, me->member);
        __atomic_fetch_add(&t->finished, 1, __ATOMIC_RELEASE);
    }
}

static void fx_team_publish(fx_team *t) {
    __atomic_fetch_add(&t->task, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&t->sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&t->mu);
        pthread_cond_broadcast(&t->cv);
        pthread_mutex_unlock(&t->mu);
    }
}

/* Stop and join every worker, then free the team. NULL is a no-op. */
static void fx_team_destroy(fx_team *t) {
    if (!t) return;
    if (t->epoch == fx_fork_epoch) { /* in a forked child the threads and the lock are the parent's */
        __atomic_store_n(&t->stop, 1, __ATOMIC_RELEASE);
        fx_team_publish(t);
        for (int i = 0; i < t->started; i++) pthread_join(t->threads[i], NULL);
        pthread_cond_destroy(&t->cv);
        pthread_mutex_destroy(&t->mu);
    }
    free(t->threads);
    free(t->members);
    free(t);
}

/* A team of n members (n-1 threads); NULL with errno set when a thread or memory is refused.
 * The workers block every signal, so the interpreter's handlers keep running on its own thread. */
static fx_team *fx_team_create(int n, int64_t spin_ns, int64_t pause_ns) {
    pthread_once(&fx_fork_once, fx_watch_forks);
    fx_team *t = (fx_team *)calloc(1, sizeof *t);
    if (!t) return NULL;
    t->epoch = fx_fork_epoch;
    t->n = n;
    t->spin_ns = spin_ns;
    t->pause_ns = pause_ns;
    t->threads = (pthread_t *)calloc((size_t)(n > 1 ? n - 1 : 1), sizeof(pthread_t));
    t->members = (fx_member *)calloc((size_t)(n > 1 ? n - 1 : 1), sizeof(fx_member));
    if (!t->threads || !t->members || pthread_mutex_init(&t->mu, NULL)) {
        free(t->threads);
        free(t->members);
        free(t);
        errno = ENOMEM;
        return NULL;
    }
    pthread_cond_init(&t->cv, NULL);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = 0;
    for (int i = 0; i < n - 1; i++) {
        t->members[i].team = t;
        t->members[i].member = i + 1;
        err = pthread_create(&t->threads[i], NULL, fx_team_worker, &t->members[i]);
        if (err) break;
        t->started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        fx_team_destroy(t);
        errno = err;
        return NULL;
    }
    return t;
}

/* Run fn(arg, member) on the caller (member 0) and on up to `workers` workers that join in
 * time; returns 0 when all of them are done. fn must split its work dynamically: the caller's
 * fn(arg, 0) returns only once no work is left to claim, so `workers` is how many more members
 * the work has pieces for (a small task wakes no one). Nothing runs and it returns -1 when
 * another caller is inside this team's fx_team_run, -2 in a process forked after the team was
 * made. */
static int fx_team_run(fx_team *t, fx_task_fn fn, void *arg, int64_t workers) {
    if (t->epoch != fx_fork_epoch) return -2;
    if (__atomic_exchange_n(&t->busy, 1, __ATOMIC_ACQUIRE)) return -1;
    t->fn = fn;
    t->arg = arg;
    t->joined = 0;
    t->want = (int)(workers < t->n - 1 ? (workers > 0 ? workers : 0) : t->n - 1);
    __atomic_store_n(&t->finished, 0, __ATOMIC_RELAXED);
    if (t->want > 0) {
        const uint64_t next = __atomic_load_n(&t->task, __ATOMIC_RELAXED) + 1;
        __atomic_store_n(&t->gate, (uint64_t)(uint32_t)next << 32, __ATOMIC_RELAXED);
        fx_team_publish(t);
    }
    fn(arg, 0);
    if (t->want > 0) {
        const uint64_t g = __atomic_fetch_or(&t->gate, FX_GATE_CLOSED, __ATOMIC_ACQ_REL);
        t->joined = (int)(g & (FX_GATE_CLOSED - 1));
        fx_team_spin(t, 0, 1);
    }
    __atomic_store_n(&t->busy, 0, __ATOMIC_RELEASE);
    return 0;
}

/* Tests: while held, workers join no task, as if the scheduler never ran them. */
static void fx_team_hold(fx_team *t, int hold) { __atomic_store_n(&t->hold, hold, __ATOMIC_RELEASE); }

#endif
