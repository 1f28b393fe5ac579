/*
 * fmq_wait.h -- the one OS-specific piece: sleeping on a 32-bit word in shared
 * memory until another process changes it.
 *
 * Linux: FUTEX_WAIT / FUTEX_WAKE *without* FUTEX_PRIVATE_FLAG (the waiters are
 * in different processes; a private futex would key on the virtual address and
 * never be woken). Elsewhere: a short sleep, correct but slower -- a port
 * (macOS os_sync_wait_on_address with OS_SYNC_WAIT_ON_ADDRESS_SHARED) touches
 * only fmq_wait.c.
 *
 * Every wait has a deadline: fmq_wait_on() takes a relative timeout and callers
 * never pass more than one slice (100 ms), so a lost wake-up can cost at most
 * one slice and Ctrl-C is seen within one slice.
 */
#ifndef FMQ_WAIT_H
#define FMQ_WAIT_H

#include <stdatomic.h>
#include <stdint.h>

/* Sleep while *word == expected, at most timeout_ns. Returns FMQ_OK (woken, or
 * the word had already changed), FMQ_TIMEDOUT or FMQ_EINTR. */
int fmq_wait_on(_Atomic uint32_t *word, uint32_t expected, uint64_t timeout_ns);

/* Wake up to n sleepers on word. */
void fmq_wait_wake(_Atomic uint32_t *word, int n);

#endif /* FMQ_WAIT_H */
