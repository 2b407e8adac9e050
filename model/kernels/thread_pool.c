/* The kernels' own thread pool: the OpenMP regions in these sources run here, not in libgomp.
 *
 * Why: libgomp keeps one pool of threads per thread that opens a parallel region, and once the
 * process holds more of its threads than it has CPUs (torch's pool for the main thread plus one
 * for any other Python thread that ran a torch op: a jam's, a job's, a replica's), every waiting
 * thread spins only 100 times before sleeping in the kernel. A decode step opens about 170
 * regions (24 layers of products and attention), and each then wakes its helper through a futex.
 * Measured on musicgen-small int8, 2 cores: 15-16 ms a step on the main thread, 22-24 ms on any
 * other (BENCHMARKS.md), and jams, `serve`'s jobs and replicas all step on other threads.
 *
 * GCC lowers `#pragma omp parallel` to GOMP_parallel, `barrier` to GOMP_barrier and `single` to
 * GOMP_single_start, and `for schedule(static)` splits its loop with omp_get_num_threads and
 * omp_get_thread_num. This file defines those five (and omp_get_max_threads), hidden, so that the
 * library's own regions bind to them: one pool for the whole process, whichever thread calls,
 * whose helpers spin for a while after each region (the regions of a step follow each other
 * within microseconds) and only then sleep. How many threads a region takes is still libgomp's
 * omp_get_max_threads() in the calling thread, so torch.set_num_threads and OMP_NUM_THREADS size
 * it as before.
 *
 * A region that finds the pool busy (another thread's step) or is opened inside a region runs on
 * the calling thread alone. Every kernel gives each output to one thread with the same arithmetic
 * whatever the split, so that changes no bit (tests/model/test_thread_pool.py).
 *
 * Other compilers (clang lowers OpenMP to libomp's __kmpc calls, which spins 200 ms by default)
 * and other systems (this pool sleeps on Linux futexes) keep their OpenMP runtime.
 */
#if defined(__GNUC__) && !defined(__clang__) && defined(__linux__)

#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define HIDDEN __attribute__((visibility("hidden")))
#define MAX_THREADS 256
/* How long a helper spins for the next region before it sleeps: longer than the gaps inside a
 * step and than most between two steps (sampling), short enough that an idle engine gives its
 * cores back at once. */
#ifndef SPIN_NS
#define SPIN_NS 200000L
#endif

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

typedef struct {
    _Atomic unsigned go;      /* bumped to hand this helper a region (its futex word) */
    _Atomic int sleeping;     /* the helper sleeps on `go` */
    unsigned start;           /* `go` when the helper was started: it waits for the next bump */
    char pad[64 - 3 * sizeof(int)];
} __attribute__((aligned(64))) helper_slot;

static helper_slot slots[MAX_THREADS];
static pthread_mutex_t grow_lock = PTHREAD_MUTEX_INITIALIZER;
static int helpers;                    /* helper threads started (ids 1..helpers) */
static _Atomic int busy;               /* a region is running on the pool */
static void (*job_fn)(void *);
static void *job_data;
static int job_threads;
static _Atomic int job_left;           /* helpers still in the current region */
static _Atomic int bar_count;          /* threads arrived at the current barrier */
static _Atomic unsigned bar_gen;       /* bumped when the barrier opens */

static __thread int my_id = 0, my_team = 1, in_region = 0;

static int (*runtime_max_threads)(void); /* libgomp's omp_get_max_threads, where torch loaded it */
static int default_threads;
static pthread_once_t looked_up = PTHREAD_ONCE_INIT;

/* libgomp is found by name, not linked against: a static link (the ARM64 checks) would pull in
 * its own definitions of the functions below. */
static void look_up_runtime(void) {
    void *gomp = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (gomp) runtime_max_threads = (int (*)(void))dlsym(gomp, "omp_get_max_threads");
    const char *env = getenv("OMP_NUM_THREADS");
    int n = env ? atoi(env) : 0;
    default_threads = n > 0 ? n : (int)sysconf(_SC_NPROCESSORS_ONLN);
}

/* What a region opened by this thread may use: what torch.set_num_threads (or OMP_NUM_THREADS)
 * set for it in libgomp, or, without libgomp loaded, OMP_NUM_THREADS or the CPUs online. */
HIDDEN int omp_get_max_threads(void) {
    pthread_once(&looked_up, look_up_runtime);
    int n = runtime_max_threads ? runtime_max_threads() : default_threads;
    return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
}

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void futex_wait(_Atomic unsigned *word, unsigned seen) {
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
}

static void futex_wake(_Atomic unsigned *word) {
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Wait until *word differs from `seen`: spin, then yield the core (a team mate may have been
 * preempted onto ours), never sleep: used inside a region, where the others are working. */
static void spin_while(_Atomic unsigned *word, unsigned seen) {
    for (unsigned i = 1; atomic_load_explicit(word, memory_order_acquire) == seen; i++) {
        if (i % 4096 == 0) sched_yield();
        else cpu_relax();
    }
}

static void *helper_main(void *arg) {
    int id = (int)(intptr_t)arg;
    helper_slot *s = &slots[id];
    char name[16];
    snprintf(name, sizeof name, "mb-pool-%d", id); /* how top, perf and the tests tell them */
    pthread_setname_np(pthread_self(), name);
    unsigned seen = s->start;
    for (;;) {
        long t0 = 0;
        for (unsigned i = 0; atomic_load_explicit(&s->go, memory_order_acquire) == seen; i++) {
            if (i % 256 == 255) {
                long t = now_ns();
                if (!t0) t0 = t;
                else if (t - t0 > SPIN_NS) {
                    atomic_store(&s->sleeping, 1);
                    while (atomic_load(&s->go) == seen) futex_wait(&s->go, seen);
                    atomic_store(&s->sleeping, 0);
                    break;
                }
            }
            cpu_relax();
        }
        seen = atomic_load_explicit(&s->go, memory_order_acquire);
        my_id = id;
        my_team = job_threads;
        in_region = 1;
        job_fn(job_data);
        in_region = 0;
        my_id = 0;
        my_team = 1;
        atomic_fetch_sub_explicit(&job_left, 1, memory_order_release);
    }
    return NULL;
}

/* A forked child has none of the parent's helpers: it starts its own when it first needs them. */
static void after_fork_in_child(void) {
    pthread_mutex_init(&grow_lock, NULL); /* another parent thread may have held it */
    helpers = 0;
    atomic_store(&busy, 0);
    for (int i = 0; i < MAX_THREADS; i++) atomic_store(&slots[i].sleeping, 0);
}

/* Helpers 1..n-1 exist (as many as could be started); returns the team size there is. */
static int grow(int n) {
    static int registered = 0;
    if (n <= helpers + 1) return n;
    pthread_mutex_lock(&grow_lock);
    if (!registered) {
        pthread_atfork(NULL, NULL, after_fork_in_child);
        registered = 1;
    }
    while (helpers + 1 < n) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        slots[helpers + 1].start = atomic_load(&slots[helpers + 1].go);
        int failed = pthread_create(&t, &attr, helper_main, (void *)(intptr_t)(helpers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        helpers++;
    }
    int have = helpers + 1;
    pthread_mutex_unlock(&grow_lock);
    return n < have ? n : have;
}

static void run_alone(void (*fn)(void *), void *data) {
    int id = my_id, team = my_team, was = in_region;
    my_id = 0;
    my_team = 1;
    in_region = 1;
    fn(data);
    my_id = id;
    my_team = team;
    in_region = was;
}

HIDDEN void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags) {
    (void)flags;
    int n = omp_get_max_threads();
    if (num_threads && (int)num_threads < n) n = (int)num_threads;
    if (n <= 1 || in_region || atomic_exchange_explicit(&busy, 1, memory_order_acquire)) {
        run_alone(fn, data);
        return;
    }
    n = grow(n);
    job_fn = fn;
    job_data = data;
    job_threads = n;
    atomic_store_explicit(&bar_count, 0, memory_order_relaxed);
    atomic_store_explicit(&job_left, n - 1, memory_order_relaxed);
    for (int i = 1; i < n; i++) {
        atomic_fetch_add_explicit(&slots[i].go, 1, memory_order_seq_cst);
        if (atomic_load_explicit(&slots[i].sleeping, memory_order_seq_cst)) futex_wake(&slots[i].go);
    }
    my_team = n;
    in_region = 1;
    fn(data);
    in_region = 0;
    my_team = 1;
    for (unsigned i = 1; atomic_load_explicit(&job_left, memory_order_acquire) > 0; i++) {
        if (i % 4096 == 0) sched_yield();
        else cpu_relax();
    }
    atomic_store_explicit(&busy, 0, memory_order_release);
}

HIDDEN void GOMP_barrier(void) {
    if (my_team <= 1) return;
    unsigned gen = atomic_load_explicit(&bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&bar_count, 1, memory_order_acq_rel) == my_team - 1) {
        atomic_store_explicit(&bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&bar_gen, 1, memory_order_release);
    } else {
        spin_while(&bar_gen, gen);
    }
}

/* The block goes to thread 0; GCC follows it with the barrier `single` implies. */
HIDDEN bool GOMP_single_start(void) { return my_id == 0; }

HIDDEN int omp_get_thread_num(void) { return my_id; }

HIDDEN int omp_get_num_threads(void) { return my_team; }

int mb_thread_pool(void) { return 1; }

#else

int mb_thread_pool(void) { return 0; }

#endif
