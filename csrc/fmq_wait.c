/*
 * fmq_wait.c -- futex shim and the sleeper half of the waiter handshake; see
 * fmq_wait.h for the contract.
 *
 * Failure model: a sleeper that is killed leaves nothing behind (the kernel
 * drops its futex wait); a waker that dies before waking costs the sleeper at
 * most the rest of its slice, because every wait has a deadline.
 */
#include <errno.h>
#include <time.h>

#include "fmq.h"
#include "fmq_wait.h"

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

int fmq_wait_on(_Atomic uint32_t *word, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(timeout_ns / 1000000000ull);
    ts.tv_nsec = (long)(timeout_ns % 1000000000ull);
    /* FUTEX_WAIT's timeout is relative (CLOCK_MONOTONIC). Shared, not private. */
    long rc = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (rc == 0)
        return FMQ_OK;
    switch (errno) {
    case EAGAIN: return FMQ_OK;          /* the word changed before we slept */
    case ETIMEDOUT: return FMQ_TIMEDOUT;
    case EINTR: return FMQ_EINTR;
    default: return FMQ_OK;              /* never sleep-loop on an odd errno */
    }
}

void fmq_wait_wake(_Atomic uint32_t *word, int n) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, n, NULL, NULL, 0);
}

#else /* portable fallback: poll with a short sleep */

int fmq_wait_on(_Atomic uint32_t *word, uint32_t expected, uint64_t timeout_ns) {
    uint64_t step = 200000; /* 200 us */
    if (timeout_ns < step)
        step = timeout_ns;
    /* seq_cst, as FUTEX_WAIT's own check is against the waker's seq_cst
     * epoch increment (fmq_waitline_wake). */
    if (atomic_load_explicit(word, memory_order_seq_cst) != expected)
        return FMQ_OK;
    struct timespec ts = {0, (long)step};
    if (nanosleep(&ts, NULL) != 0 && errno == EINTR)
        return FMQ_EINTR;
    return atomic_load_explicit(word, memory_order_seq_cst) != expected ? FMQ_OK : FMQ_TIMEDOUT;
}

void fmq_wait_wake(_Atomic uint32_t *word, int n) {
    (void)word;
    (void)n;
}
#endif

/* The sleeper half of the handshake (fmq_wait.h). The increment and the epoch
 * load are seq_cst: they are the sleeper's half of the Dekker pair with the
 * waker's publish + waiters load (fmq_waitline_wake). The decrement is
 * relaxed: a count one too high for a moment costs only a futex wake. */
int fmq_waitline_sleep(fmq_waitline *wl, int (*ready)(void *ctx), void *ctx,
                       uint64_t deadline_ns) {
    atomic_fetch_add_explicit(&wl->waiters, 1, memory_order_seq_cst);
    uint32_t epoch = atomic_load_explicit(&wl->epoch, memory_order_seq_cst);
    int rc = FMQ_OK;
    if (!ready(ctx)) {
        uint64_t slice = FMQ_SLICE_NS;
        uint64_t now = deadline_ns ? fmq_now_ns() : 0;
        if (deadline_ns && now >= deadline_ns) {
            rc = FMQ_TIMEDOUT;
        } else {
            if (deadline_ns && deadline_ns - now < slice)
                slice = deadline_ns - now;
            rc = fmq_wait_on(&wl->epoch, epoch, slice);
            if (rc == FMQ_TIMEDOUT)
                rc = FMQ_AGAIN;
        }
    }
    atomic_fetch_sub_explicit(&wl->waiters, 1, memory_order_relaxed);
    return rc;
}
