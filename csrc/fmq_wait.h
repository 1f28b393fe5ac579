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
 * never pass more than one slice (FMQ_SLICE_NS, 100 ms), so a lost wake-up can
 * cost at most one slice and Ctrl-C is seen within one slice. The waiter
 * handshake on a wait line (fmq_waitline_wake / fmq_waitline_sleep) is here
 * too, written once for every sleeper of the core; [S-wait] tags its seq_cst
 * operations where they stand in other files (a sleeper's re-check loads).
 */
#ifndef FMQ_WAIT_H
#define FMQ_WAIT_H

#include <stdatomic.h>
#include <stdint.h>

#include "fmq_layout.h"

/* The longest single sleep: a lost wake-up, Ctrl-C and close() are all seen
 * within one slice. */
#define FMQ_SLICE_NS 100000000ull

/* Sleep while *word == expected, at most timeout_ns. Returns FMQ_OK (woken, or
 * the word had already changed), FMQ_TIMEDOUT or FMQ_EINTR. */
int fmq_wait_on(_Atomic uint32_t *word, uint32_t expected, uint64_t timeout_ns);

/* Wake up to n sleepers on word. */
void fmq_wait_wake(_Atomic uint32_t *word, int n);

/* ---- the waiter handshake on a wait line (fmq_layout.h: epoch + waiters) ----
 *
 * The one handshake every sleeper and waker of the core uses. A waker has just
 * published its change (a slot, a block, an entry); a sleeper re-checks for
 * that change after announcing itself:
 *
 *   sleeper: waiters += 1 (seq_cst); e = epoch (seq_cst); re-check (seq_cst
 *            loads); sleep while epoch == e, at most one slice; waiters -= 1
 *   waker:   publish (seq_cst RMW); if waiters (seq_cst load) != 0:
 *            epoch += 1 (seq_cst); futex wake
 *
 * Where the publishing store and the re-check loads are seq_cst too, the four
 * operations are in one total order (Dekker): either the waker sees the
 * sleeper's count or the sleeper's re-check sees the new state; never
 * neither. Where the publisher uses only release (an entry freed by ack), a
 * wake can be missed and the slice bounds the cost. A sleeper killed between
 * its increment and decrement leaves the count one too high: that costs only
 * futex wakes nobody needed. */

/* Waker half: after publishing, wake up to n sleepers of wl, if any. Inline:
 * it runs on every commit and release, and with nobody asleep it is one load. */
static inline void fmq_waitline_wake(fmq_waitline *wl, int n) {
    if (atomic_load_explicit(&wl->waiters, memory_order_seq_cst) == 0)
        return;
    atomic_fetch_add_explicit(&wl->epoch, 1, memory_order_seq_cst);
    fmq_wait_wake(&wl->epoch, n);
}

/* Sleeper half: announce, re-check ready(ctx), then sleep on wl at most one
 * slice and never past deadline_ns (0 = none). Returns FMQ_OK (ready at the
 * re-check, woken, or the epoch had already moved: look again), FMQ_TIMEDOUT
 * (deadline_ns had passed before sleeping), FMQ_AGAIN (a whole slice went by
 * without a wake: the caller checks its deadline and what it is stuck
 * behind) or FMQ_EINTR. */
int fmq_waitline_sleep(fmq_waitline *wl, int (*ready)(void *ctx), void *ctx,
                       uint64_t deadline_ns);

#endif /* FMQ_WAIT_H */
