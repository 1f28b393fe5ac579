/*
 * fmq_wait.c -- futex shim; see fmq_wait.h for the contract.
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
    if (atomic_load(word) != expected)
        return FMQ_OK;
    struct timespec ts = {0, (long)step};
    if (nanosleep(&ts, NULL) != 0 && errno == EINTR)
        return FMQ_EINTR;
    return atomic_load(word) != expected ? FMQ_OK : FMQ_TIMEDOUT;
}

void fmq_wait_wake(_Atomic uint32_t *word, int n) {
    (void)word;
    (void)n;
}
#endif
