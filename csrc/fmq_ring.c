/*
 * fmq_ring.c -- the slot ring: a bounded MPMC queue of fixed slots.
 *
 * Algorithm (Vyukov's bounded queue, claimed on the slot word itself). Ticket
 * t lives in slot t % slot_count on lap t / slot_count. Each slot word holds
 * stamp = 4*lap + phase and the owner tag of whoever holds it (fmq_layout.h).
 *
 *   producer: find the first ticket whose slot is EMPTY for its lap and CAS it
 *             to WRITING(me); fill; CAS WRITING(me) -> READY       (commit)
 *   consumer: find the first ticket whose slot is READY for its lap and CAS it
 *             to READING(me); copy; CAS READING(me) -> EMPTY(lap+1) (release)
 *
 * Because a claim is a CAS on the slot word, every held slot names its holder
 * (the crash-recovery reaper needs that), and commit/release are CASes too: if
 * a reaper took the slot from a holder it believed dead, the late holder gets
 * FMQ_ELOST instead of overwriting the reaper's work.
 *
 * The tail/head counters are hints anyone may advance; a hint may lag (every
 * scan walks forward over claimed or consumed slots), so the runs of
 * put_many/get_many move them, and count their statistics, once per call
 * instead of once per message (fmq_ring_reserve_from, *_quiet). Producers claim
 * tickets strictly in order (a producer only passes a slot already claimed
 * for its lap), so "slot at the hint is EMPTY for its lap" means the ring is
 * empty there, and "slot still holds the previous lap" means it is full. The
 * head hint never passes a slot in READING: a claim can then be undone in
 * place (fmq_ring_unclaim) and the message is found again by the next scan.
 *
 * Stamps are 40-bit and compared modulo 2^40 (fmq_stamp_diff), so the laps
 * may wrap: only differences of a few laps are ever compared.
 *
 * Trust. The slot words are the truth; the hints are only where to start.
 * A hint that disagrees with the slot word under it in a way no interleaving
 * can produce (the slot a whole lap behind the hint: a scribbled hint) is
 * recomputed from the slot words (fmq_ring_repair_hints) instead of leaving
 * the queue Empty with messages in it, or Full while empty. A message whose
 * length or block fails validation is consumed -- its slot moves on to the
 * next lap, counted as abandoned -- and reported (FMQ_ECORRUPT), so one
 * damaged message never wedges the ring. Every field of a slot is read once
 * (FMQ_ONCE), checked, and only that local copy is used. A slot's block is
 * its message's only while the block records the slot's ticket (written by
 * the commit, checked when a consumer takes the ring's share:
 * fmq_block_holds_ticket): a slot damaged back into READY over a consumed
 * message names a block that may be queued again for another slot, and a
 * block freed and requeued while a consumer copied it carries a new ticket.
 *
 * Memory order (acquire/release pairs):
 *   [A-rsv]   producer reads EMPTY      <- [R-rel]    consumer's release CAS:
 *             the consumer's reads of the old payload happen before our writes.
 *   [R-commit] producer's commit CAS     -> [A-claim]  consumer's load/CAS:
 *             len, block and payload are visible before READY is.
 *   waiting:  the publishing CAS (commit, release, block push) and the
 *             waker's load of the waiter count are seq_cst; so are the
 *             sleeper's increment of the count and its re-check loads. In
 *             that single total order (Dekker) either the waker sees the
 *             sleeper or the sleeper sees the new state; never neither. The
 *             handshake itself is fmq_wait.h's (fmq_waitline_wake/sleep).
 *
 * Atomic batches. A batch of N messages is ONE record (fmq_layout.h): one
 * slot whose payload (inline or a block) frames the N messages, published by
 * the same commit CAS as any message, so consumers see all of it or none of
 * it whatever process dies where. Producers never hold more than that one
 * slot (claiming N slots and committing them together would let a producer
 * waiting for the Nth block every consumer behind the N-1 it holds). A
 * consumer takes the record whole (get_many), or one message at a time
 * through the slot's cursor: copy the message at the cursor, store the
 * cursor past it (the hand-over), give the slot back READY as an unclaim
 * does (fmq_ring_batch_advance); the last message frees the record as usual.
 * So the slot phases and their transitions are the ones above: a batch only
 * adds the cursor, which only a slot's holder writes. The messages of queued
 * batches beyond one per record are counted in ctl->batch_extra (qsize and a
 * batch's admission, which waits for room for all N: fmq_ring_queued).
 *
 * Failure model. A producer killed in WRITING leaves its slot WRITING: the
 * consumers stop there until crash recovery (fmq_recover.c, which asks
 * fmq_live.c whether the owner lives) skips it. A waiter that gets nowhere
 * calls recovery through r->up: recovery is a layer above the ring.
 * A consumer killed in READING likewise blocks producers one lap later until
 * recovered. A killed sleeper leaves a waiter count one too high, which costs
 * only a spurious futex wake.
 */
#include <limits.h>
#include <sched.h>
#include <string.h>

#include "fmq_internal.h"
#include "fmq_wait.h"

#define FMQ_SPIN_NS 30000ull        /* spin this long before sleeping            */
#define FMQ_SPIN_PAUSE_NS 5000ull   /* ... the first part with pause, then yield:
                                       where a thread's pause phase starts; it
                                       adapts (fmq_spin_state) between:         */
#define FMQ_SPIN_PAUSE_MIN_NS 250ull
#define FMQ_SPIN_PAUSE_MAX_NS 20000ull
#define FMQ_SPIN_PAUSES 4           /* pauses between two looks in that first part */
#define FMQ_YIELD_KEPT_NS 1000ull   /* a sched_yield this short gave the CPU to nobody */
#define FMQ_QUICK_WAKE_NS 60000ull  /* a sleep that ended this soon: traffic is dense */
#define FMQ_LONG_WAITS 2            /* this many long sleeps in a row: sleep at once */
#define FMQ_STALL_NS 100000000ull   /* a slot unchanged this long: check its owner */
#define FMQ_RECOVER_EVERY_NS 1000000000ull  /* a stuck waiter's full recovery pass */

/* ======================================================================== */
/* slot words                                                               */
/* ======================================================================== */

/* A producer about to touch ticket t of the first lap makes sure the ring's
 * memory reaches t + FMQ_RING_MARGIN (fmq_pool.c grows it). */
static inline int fmq_ring_ensure(fmq_region *r, uint64_t t) {
    return __builtin_expect(t + FMQ_RING_MARGIN < r->ring_ready, 1) ? FMQ_OK
                                                                   : fmq_ring_grow(r, t);
}

/* The slot word accessors (fmq_word, fmq_stamp, fmq_stamp_diff) are in
 * fmq_words.h, the slot addresses (fmq_slot_at, fmq_lap_stamp) in
 * fmq_internal.h: recovery uses the same ones. */

static inline void fmq_advance_max(_Atomic uint64_t *hint, uint64_t v) {
    uint64_t cur = atomic_load_explicit(hint, memory_order_relaxed);
    while (cur < v && !atomic_compare_exchange_weak_explicit(hint, &cur, v, memory_order_relaxed,
                                                             memory_order_relaxed))
        ;
}

/* Move the head hint over every fully consumed slot at its position: scan
 * the run of them, then one CAS over all of it (a slot once fully consumed
 * stays so for its ticket: its stamp only moves on). A CAS that fails means
 * someone else moved the hint; they carry on. */
static void fmq_advance_head(fmq_region *r) {
    uint64_t h0 = atomic_load_explicit(&r->ctl->head.v, memory_order_relaxed), h = h0;
    for (uint64_t n = 0; n < r->g.slot_count; n++, h++) {
        uint64_t w = atomic_load_explicit(&fmq_slot_at(r, h)->word, memory_order_relaxed);
        if (fmq_stamp_diff(fmq_stamp(w), fmq_lap_stamp(r, h) + FMQ_PH_READY) < 2)
            break;
    }
    if (h != h0)
        atomic_compare_exchange_strong_explicit(&r->ctl->head.v, &h0, h, memory_order_relaxed,
                                                memory_order_relaxed);
}

/* Full ticket of a 38-bit lap number, taken nearest to the reference lap
 * (tickets only matter modulo 2^38 laps: that is all a stamp carries). */
static uint64_t fmq_lap_near(uint64_t stamp_lap, uint64_t ref_lap) {
    const uint64_t m = FMQ_LAP_MASK;
    int64_t d = (int64_t)(((stamp_lap - ref_lap) & m) << (64 - (FMQ_STAMP_BITS - 2))) >>
                (64 - (FMQ_STAMP_BITS - 2));
    return d < 0 && (uint64_t)-d > ref_lap ? stamp_lap : ref_lap + (uint64_t)d;
}

/* The hints, recomputed from the slot words: the head is the oldest ticket
 * any slot still holds (unread, being read, or not yet written), the tail
 * the oldest ticket not yet claimed. Under concurrent traffic the result is
 * at most behind the truth, which the scans then walk forward over. */
static void fmq_ring_scan_hints(fmq_region *r, uint64_t ref, uint64_t *head_out,
                                uint64_t *tail_out);

void fmq_ring_repair_hints(fmq_region *r) {
    uint64_t head, tail;
    fmq_ring_scan_hints(r, atomic_load_explicit(&r->ctl->tail.v, memory_order_relaxed), &head,
                        &tail);
    /* Plain stores: both were wrong, and every user of a hint re-checks the
     * slot word under it. */
    atomic_store_explicit(&r->ctl->head.v, head, memory_order_relaxed);
    atomic_store_explicit(&r->ctl->tail.v, tail, memory_order_relaxed);
    fmq_wake_data(r, 1);
    fmq_wake_space(r);
}

/* A hint that passed a slot it can never pass (a head past an unconsumed
 * message, a tail past an unclaimed slot) leaves no trace at the hint itself:
 * only a scan shows it. Waiters that get nowhere run this once a second. The
 * hints are loaded BEFORE the scan: slot words only move forward, so a
 * correct hint is never above what the scan computes. */
static void fmq_ring_check_hints(fmq_region *r) {
    uint64_t h0 = atomic_load_explicit(&r->ctl->head.v, memory_order_acquire);
    uint64_t t0 = atomic_load_explicit(&r->ctl->tail.v, memory_order_acquire);
    uint64_t head, tail;
    fmq_ring_scan_hints(r, t0, &head, &tail);
    if (tail < t0) {
        /* Tickets below the tail hint that nobody claimed: producers claim in
         * order, so these are holes a scribbled tail made producers jump
         * over, and consumers would wait at the first one forever. Each is
         * closed as an empty turn (EMPTY for its lap -> EMPTY for the next),
         * by a CAS from exactly EMPTY: a producer that claims it meanwhile
         * wins, and the hole was not one. */
        uint64_t reserved = fmq_ring_committed(r);
        for (uint64_t x = tail, k = 0; x < t0 && k < r->g.slot_count; x++, k++) {
            if (x % r->g.slot_count >= reserved)
                break;   /* never touched: no hole there, and no page to touch */
            _Atomic uint64_t *sw = &fmq_slot_at(r, x)->word;
            uint64_t w = fmq_word(fmq_lap_stamp(r, x) + FMQ_PH_EMPTY, 0);
            atomic_compare_exchange_strong_explicit(
                sw, &w, fmq_word(fmq_lap_stamp(r, x) + 4, 0), memory_order_seq_cst,
                memory_order_relaxed);
        }
    }
    if (head < h0 || tail < t0)
        fmq_ring_repair_hints(r);
}

static void fmq_ring_scan_hints(fmq_region *r, uint64_t ref_ticket, uint64_t *head_out,
                                uint64_t *tail_out) {
    uint64_t n = r->g.slot_count;
    uint64_t ref = ref_ticket / n;
    uint64_t head = ~0ull, tail = ~0ull;
    /* Slots past the reserved prefix were never touched (all zero: EMPTY for
     * lap 0), and reading their pages would allocate them (fmq_pool.c). */
    uint64_t reserved = fmq_ring_committed(r);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t w = i < reserved
                         ? atomic_load_explicit(&fmq_slot_at(r, i)->word, memory_order_acquire)
                         : 0;
        uint64_t st = fmq_stamp(w);
        uint64_t lap = fmq_lap_near(fmq_stamp_lap(st), ref);
        uint64_t t = lap * n + i;
        uint64_t unclaimed = fmq_stamp_phase(st) == FMQ_PH_EMPTY ? t : t + n;
        if (t < head)
            head = t;
        if (unclaimed < tail)
            tail = unclaimed;
    }
    *head_out = head;
    *tail_out = tail;
}

/* ======================================================================== */
/* writing                                                                  */
/* ======================================================================== */

/* A scan found its hint impossible (a slot a lap or more behind it) or ran a
 * whole lap without an answer: recompute both hints from the slot words, once
 * per scan, and restart at the repaired hint (or at from, if that is further).
 * Used by reserve (tail) and claim (head) alike. */
static uint64_t fmq_ring_rescan(fmq_region *r, _Atomic uint64_t *hint, uint64_t from,
                                int *repaired, uint64_t *scanned) {
    fmq_ring_repair_hints(r);
    *repaired = 1;
    *scanned = 0;
    uint64_t t = atomic_load_explicit(hint, memory_order_relaxed);
    return from > t ? from : t;
}

/* model: ring.reserve */
/* One body for fmq_ring_reserve and fmq_ring_reserve_from; always inlined,
 * so each compiles with its constants. A run of reserves (put_many) starts
 * each one past the previous ticket and leaves the tail hint where it was:
 * it moves once, at the end of the run (fmq_ring_advance_tail). A hint that
 * lags is always allowed (scans walk forward over claimed slots); a lock
 * CAS per message on it is not free. */
static inline __attribute__((always_inline)) int
fmq_ring_reserve_as(fmq_region *r, fmq_msg *m, uint64_t from, int advance) {
    fmq_set_role(r, FMQ_ROLE_PRODUCER);
    uint64_t t = atomic_load_explicit(&r->ctl->tail.v, memory_order_relaxed);
    int repaired = 0;
    int at_hint = from <= t;   /* t is the tail hint itself (the scribble test) */
    if (from > t)
        t = from;
    for (uint64_t scanned = 0;; scanned++) {
        int grc = fmq_ring_ensure(r, t);   /* reserve the slot's page first */
        if (grc != FMQ_OK)
            return grc;
        fmq_slot *s = fmq_slot_at(r, t);
        uint64_t want = fmq_lap_stamp(r, t) + FMQ_PH_EMPTY;
        uint64_t w = atomic_load_explicit(&s->word, memory_order_acquire);   /* [A-rsv] */
        int64_t d = fmq_stamp_diff(fmq_stamp(w), want);
        if (d == 0) {
            uint64_t mine = fmq_word(want + FMQ_PH_WRITING, r->owner_tag);
            if (atomic_compare_exchange_strong_explicit(&s->word, &w, mine,
                                                        memory_order_acquire,
                                                        memory_order_relaxed)) {
                FMQ_CRASHPOINT("ring.reserve.claimed");
                if (advance)
                    fmq_advance_max(&r->ctl->tail.v, t + 1);
                m->ticket = t;
                m->word = mine;
                m->detached = 0;
                m->block = FMQ_NO_BLOCK;
                m->deliveries = 0;   /* a redelivery sets its count before commit */
                return FMQ_OK;
            }
            continue;   /* lost the race for this ticket: look again */
        }
        if (d < -3 && !repaired && scanned == 0 && at_hint) {
            /* The slot is a whole lap (or more) behind the ticket: a tail
             * hint cannot get there (it only ever passes claimed slots), so
             * the hint was scribbled. Recompute it and look again. */
            t = fmq_ring_rescan(r, &r->ctl->tail.v, from, &repaired, &scanned);
            continue;
        }
        if (d < 0)
            return FMQ_FULL;   /* the previous lap's message is still here */
        t++;                   /* already claimed for this lap: the next one */
        if (scanned > r->g.slot_count + 2 * FMQ_MAX_PARTICIPANTS) {
            if (!repaired) {   /* a hint laps behind the truth: recompute it */
                t = fmq_ring_rescan(r, &r->ctl->tail.v, from, &repaired, &scanned);
                continue;
            }
            return fmq_fail(FMQ_ECORRUPT, "ring slot words are corrupted (no free slot "
                                          "found after a full scan)");
        }
        uint64_t hint = atomic_load_explicit(&r->ctl->tail.v, memory_order_relaxed);
        if (hint > t)
            t = hint;
    }
}

int fmq_ring_reserve(fmq_region *r, fmq_msg *m) { return fmq_ring_reserve_as(r, m, 0, 1); }

int fmq_ring_reserve_from(fmq_region *r, fmq_msg *m, uint64_t from_ticket) {
    /* A run that consumers keep up with never waits, and may go on for laps:
     * the hint catches up every 64 tickets (every one in a small ring), so
     * it lags by less than a lap and other producers' scans stay short. */
    if ((from_ticket & 63) == 0 || r->g.slot_count <= 64)
        fmq_advance_max(&r->ctl->tail.v, from_ticket);
    return fmq_ring_reserve_as(r, m, from_ticket, 0);
}

void fmq_ring_advance_tail(fmq_region *r, uint64_t ticket) {
    fmq_advance_max(&r->ctl->tail.v, ticket);
}

unsigned char *fmq_ring_inline_ptr(fmq_region *r, const fmq_msg *m) {
    return (unsigned char *)fmq_slot_at(r, m->ticket) + FMQ_SLOT_HEADER;
}

static void fmq_ring_skip_damaged(fmq_region *r, fmq_slot *s, uint64_t ticket,
                                  uint64_t mine);

/* A commit that fails before its publish: the slot we hold WRITING is moved
 * on to the next lap as skipped (counted as abandoned), as crash recovery
 * does for a dead producer's. Left WRITING by a live owner, it would stop
 * every consumer there for good. A cold path: callers only get here when
 * a block word or a length was damaged, or the binding is wrong. */
static void __attribute__((noinline, cold)) fmq_ring_skip_unpublished(fmq_region *r,
                                                                       fmq_msg *m) {
    fmq_ring_skip_damaged(r, fmq_slot_at(r, m->ticket), m->ticket, m->word);
}

/* model: ring.commit */
/* One body for plain messages and atomic batches; always inlined, so with
 * flags and count constant at each call the plain path compiles as before
 * (callgrind: +0 instructions per put). */
static inline __attribute__((always_inline)) int
fmq_ring_commit_as(fmq_region *r, fmq_msg *m, uint32_t len, uint32_t block, int wake,
                   int keep_writer, uint32_t flags, uint32_t count, int counted) {
    fmq_slot *s = fmq_slot_at(r, m->ticket);
    int rc;
    /* len is 32 bits in the slot: fmq_pool_alloc refuses larger blocks and
     * the binding refuses larger messages (FMQ_TOOBIG), so nothing is cut. */
    if (block == FMQ_NO_BLOCK ? len > r->inline_max : len > fmq_pool_block_size(r, block)) {
        fmq_ring_skip_unpublished(r, m);
        return fmq_fail(FMQ_EINVAL, "commit of %u bytes into a %s that holds fewer", len,
                        block == FMQ_NO_BLOCK ? "slot" : "block");
    }
    s->len = len;
    s->block = block;
    s->deliveries = m->deliveries;
    /* The batch mark lives in the cursor word (fmq_layout.h), and a plain
     * record clears it: slots are reused. */
    s->cursor = flags ? FMQ_CURSOR(FMQ_BATCH_HEADER, 0) : 0;
    /* The ring takes its share of the block before the message is visible;
     * a producer killed between here and the publish leaves a WRITING slot
     * and a block marked IN_RING that no published slot names: recovery tells
     * exactly that apart (fmq_recover.c) and frees both. */
    if (block != FMQ_NO_BLOCK) {
        /* The block records its slot's ticket (FMQ_BLK_NEXT_IS_TICKET): we
         * hold it alone (writer), and the acq_rel CAS below publishes it. */
        atomic_store_explicit(&fmq_pool_meta(r, FMQ_BLOCK_CLASS(block))[FMQ_BLOCK_INDEX(block)]
                                   .next,
                              (uint32_t)m->ticket, memory_order_relaxed);
        if ((rc = fmq_pool_transition(r, block, FMQ_BLK_IN_RING, 0, FMQ_BLK_IN_RING)) !=
            FMQ_OK) {
            fmq_ring_skip_unpublished(r, m);   /* a block word that is not ours alone */
            return rc;
        }
    }
    /* A durable queue's record carries its checksum, written before the
     * publish like every other field (fmq_durable.c); a batch's covers its
     * whole framing, so a batch is checked as the one record it is. */
    if (r->durable)
        s->crc = fmq_record_crc(len, block == FMQ_NO_BLOCK ? (const unsigned char *)s +
                                 FMQ_SLOT_HEADER : fmq_pool_ptr(r, block));
    FMQ_CRASHPOINT(flags ? "ring.batch.before_publish" : "ring.commit.before_publish");
    uint64_t expect = m->word;
    uint64_t ready = fmq_word(fmq_lap_stamp(r, m->ticket) + FMQ_PH_READY, 0);
    if (!atomic_compare_exchange_strong_explicit(&s->word, &expect, ready,
                                                 memory_order_seq_cst,       /* [R-commit] */
                                                 memory_order_relaxed)) {
        if (block != FMQ_NO_BLOCK)
            fmq_pool_transition(r, block, FMQ_BLK_IN_RING, FMQ_BLK_IN_RING, 0);
        return fmq_fail(FMQ_ELOST, "the slot being written was reclaimed by crash recovery");
    }
    FMQ_CRASHPOINT(flags ? "ring.batch.published" : "ring.commit.published");
    if (flags && count > 1)   /* after the publish: a kill in between leaves it low */
        atomic_fetch_add_explicit(&r->ctl->batch_extra.v, count - 1, memory_order_relaxed);
    if (block != FMQ_NO_BLOCK && !keep_writer)
        fmq_pool_transition(r, block, FMQ_WRITER_MASK, r->owner_tag, 0);
    if (counted) {
        fmq_count(r, FMQ_ST_ENQUEUED, count);
        fmq_count(r, FMQ_ST_BYTES_IN, len);
    }
    if (wake)
        fmq_wake_data(r, flags != 0);   /* a batch: work for many */
    return FMQ_OK;
}

int fmq_ring_commit(fmq_region *r, fmq_msg *m, uint32_t len, uint32_t block, int wake,
                    int keep_writer) {
    return fmq_ring_commit_as(r, m, len, block, wake, keep_writer, 0, 1, 1);
}

/* One commit of a run (put_many): no wake and no statistics here; the run
 * counts itself once at its end (fmq_ring_count_put). The counters are
 * statistics: a producer killed inside a run leaves them low by what it
 * committed of the run, as a kill right after a commit CAS always has by
 * one message. */
int fmq_ring_commit_quiet(fmq_region *r, fmq_msg *m, uint32_t len, uint32_t block) {
    return fmq_ring_commit_as(r, m, len, block, 0, 0, 0, 1, 0);
}

void fmq_ring_count_put(fmq_region *r, uint64_t n, uint64_t bytes) {
    fmq_count(r, FMQ_ST_ENQUEUED, n);
    fmq_count(r, FMQ_ST_BYTES_IN, bytes);
}

/* The framing of a batch payload of len bytes at p, checked whole: the
 * producer's own bytes, so this guards against a binding bug, not a
 * scribbler (consumers check each frame they read: fmq_ring_batch_frame). */
static int fmq_batch_framing_ok(const unsigned char *p, uint32_t len, uint32_t count) {
    uint32_t c, off = FMQ_BATCH_HEADER;
    if (len < FMQ_BATCH_HEADER)
        return 0;
    memcpy(&c, p, 4);
    if (c != count || count < 1 || count > FMQ_MAX_BATCH)
        return 0;
    for (uint32_t i = 0; i < count; i++) {
        uint32_t n;
        if (len - off < FMQ_FRAME_HEADER)
            return 0;
        memcpy(&n, p + off, 4);
        off += FMQ_FRAME_HEADER;
        if (len - off < n)
            return 0;
        off += n;
    }
    return off == len;
}

/* An atomic batch is one record: published by the same commit CAS (the
 * model's ring.commit; the framing is payload to it). */
int fmq_ring_commit_batch(fmq_region *r, fmq_msg *m, uint32_t len, uint32_t block,
                          uint32_t count) {
    const unsigned char *p = block == FMQ_NO_BLOCK ? fmq_ring_inline_ptr(r, m)
                                                   : fmq_pool_ptr(r, block);
    if (!p || (block == FMQ_NO_BLOCK ? len > r->inline_max
                                     : len > fmq_pool_block_size(r, block)) ||
        !fmq_batch_framing_ok(p, len, count)) {
        fmq_ring_skip_unpublished(r, m);
        return fmq_fail(FMQ_EINVAL, "an atomic batch of %u messages (%u bytes) is not framed "
                                    "as one", count, len);
    }
    return fmq_ring_commit_as(r, m, len, block, 1, 0, FMQ_MSG_BATCH, count, 1);
}

/* ======================================================================== */
/* reading                                                                  */
/* ======================================================================== */

int fmq_ring_claim(fmq_region *r, fmq_msg *m) {
    int rc = fmq_ring_claim_from(r, m, 0);
    if (rc == FMQ_EMPTY)
        fmq_pool_idle(r);   /* drained: memory beyond recent demand goes back */
    return rc;
}

/* Claim, scanning from ticket `from` if that is past the head hint. A batch
 * (get_many) holds its earlier claims while it takes more, and the head hint
 * does not pass READING slots: without this, each further claim would rescan
 * the batch so far (quadratic in the batch size). */
/* Our claimed slot (READING or WRITING, word mine) -> EMPTY for the next
 * lap, counted as abandoned: a message that can never be delivered sanely
 * (or never be published) leaves the ring. */
static void fmq_ring_skip_damaged(fmq_region *r, fmq_slot *s, uint64_t ticket,
                                  uint64_t mine) {
    uint64_t next = fmq_word(fmq_lap_stamp(r, ticket) + 4 /* EMPTY, next lap */, 0);
    if (atomic_compare_exchange_strong_explicit(&s->word, &mine, next,
                                                memory_order_seq_cst,        /* [R-rel] */
                                                memory_order_relaxed)) {
        fmq_count(r, FMQ_ST_ABANDONED, 1);
        fmq_advance_head(r);
        fmq_wake_space(r);
    }
}

/* A claimed message failed validation: consume it (the slot moves on to the
 * next lap, so the ring keeps moving) and count it as abandoned. Its block's
 * ring share is dropped only if the reference is valid and no other message
 * or entry names that block: a scribbled reference must never free another
 * message's block (a leaked block is the safe side). */
static void fmq_ring_discard(fmq_region *r, fmq_slot *s, uint64_t ticket, uint64_t mine,
                             uint32_t block) {
    if (block != FMQ_NO_BLOCK && fmq_pool_ptr(r, block) &&
        !r->up->lease_names_block(r, block) && !fmq_ring_names_block(r, block, ticket))
        fmq_pool_transition(r, block, FMQ_BLK_IN_RING | FMQ_READER_MASK, FMQ_BLK_IN_RING, 0);
    fmq_ring_skip_damaged(r, s, ticket, mine);
}

/* The next claim most likely takes the next slot, which a producer on
 * another core wrote: start fetching its line(s) now, while our caller
 * copies this message out, instead of a cache miss at the next claim's CAS
 * (a consumer that is behind otherwise pays one miss per slot, in series).
 * A prefetch is only a hint: it never faults, so a slot page not reserved
 * yet stays unallocated. Its header line with write intent: the claim is a
 * CAS on the word there. */
static inline void fmq_ring_prefetch_after(const fmq_region *r, const fmq_slot *s) {
    const unsigned char *nx = (const unsigned char *)s + r->g.slot_stride;
    if (nx >= r->ring + r->g.slot_count * r->g.slot_stride)
        nx = r->ring;
    __builtin_prefetch(nx, 1, 3);
    if (r->g.slot_stride > 64)   /* a 64-byte cache line: a small payload spills into the next */
        __builtin_prefetch(nx + 64, 0, 3);
}

/* model: ring.claim */
int fmq_ring_claim_from(fmq_region *r, fmq_msg *m, uint64_t from) {
    fmq_set_role(r, FMQ_ROLE_CONSUMER);
    uint64_t h = atomic_load_explicit(&r->ctl->head.v, memory_order_relaxed);
    int repaired = 0;
    int at_hint = from <= h;   /* h is the head hint itself (see below) */
    if (from > h)
        h = from;
    for (uint64_t scanned = 0;; scanned++) {
        fmq_slot *s = fmq_slot_at(r, h);
        uint64_t want = fmq_lap_stamp(r, h) + FMQ_PH_READY;
        uint64_t w = atomic_load_explicit(&s->word, memory_order_acquire);   /* [A-claim] */
        int64_t d = fmq_stamp_diff(fmq_stamp(w), want);
        if (d == 0) {
            uint64_t mine = fmq_word(want + 1 /* READING */, r->owner_tag);
            if (!atomic_compare_exchange_strong_explicit(&s->word, &w, mine,
                                                         memory_order_acquire,
                                                         memory_order_relaxed))
                continue;
            FMQ_CRASHPOINT("ring.claim.claimed");
            /* One load of each field: the length checked is the length used. */
            uint32_t len = FMQ_ONCE(s->len), block = FMQ_ONCE(s->block);
            m->ticket = h;
            m->word = mine;
            m->len = len;
            m->block = block;
            m->deliveries = FMQ_ONCE(s->deliveries);
            m->crc = FMQ_ONCE(s->crc);
            m->detached = 0;
            /* A batch's cursor is written only by the slot's holders, before
             * the CAS that gave the slot back ([R-rel] of the unclaim in
             * fmq_ring_batch_advance -> our [A-claim]); checked on use. */
            uint64_t cursor = FMQ_ONCE(s->cursor);
            m->flags = FMQ_CURSOR_IS_BATCH(cursor) ? FMQ_MSG_BATCH : 0;
            m->cursor = m->flags ? cursor : 0;
            if (block == FMQ_NO_BLOCK) {
                if (len > r->inline_max)
                    goto corrupt;
                m->data = (unsigned char *)s + FMQ_SLOT_HEADER;
            } else {
                m->data = fmq_pool_ptr(r, block);
                if (!m->data || len > fmq_pool_block_size(r, block))
                    goto corrupt;
            }
            fmq_ring_prefetch_after(r, s);
            return FMQ_OK;
        corrupt:
            /* It can never be delivered sanely: consume it and say so. */
            fmq_ring_discard(r, s, h, mine, block);
            return fmq_fail(FMQ_ECORRUPT, "message at ticket %llu has an invalid length or "
                                          "block (len %u, block %#x); it was skipped and "
                                          "counted in stats()[\"abandoned\"]",
                            (unsigned long long)h, len, block);
        }
        if (d < -2 && !repaired && scanned == 0 && at_hint) {
            /* The slot is a lap (or more) behind the head hint: the hint never
             * passes an unconsumed slot, so it was scribbled. Recompute it. */
            h = fmq_ring_rescan(r, &r->ctl->head.v, from, &repaired, &scanned);
            continue;
        }
        if (d < 0)
            return FMQ_EMPTY;   /* EMPTY or WRITING for this lap */
        if (d >= 2) {
            /* fully consumed: move the hint on if it is right here */
            uint64_t e = h;
            atomic_compare_exchange_strong_explicit(&r->ctl->head.v, &e, h + 1,
                                                    memory_order_relaxed, memory_order_relaxed);
        }
        h++;   /* d == 1: being read by someone else; look past it */
        if (scanned > r->g.slot_count + 2 * FMQ_MAX_PARTICIPANTS) {
            if (!repaired) {   /* a hint laps behind the truth: recompute it */
                h = fmq_ring_rescan(r, &r->ctl->head.v, from, &repaired, &scanned);
                continue;
            }
            return fmq_fail(FMQ_ECORRUPT, "ring slot words are corrupted");
        }
        uint64_t hint = atomic_load_explicit(&r->ctl->head.v, memory_order_relaxed);
        if (hint > h)
            h = hint;
    }
}

/* READING(me) -> EMPTY for the next lap [R-rel], then the bookkeeping of a
 * message that has left the ring. The block, if any, is the caller's business
 * (a reader share for get/recv, the in-flight entry's share for a lease). */
/* model: ring.retire */
/* quiet: one release of a run (get_many), which counts itself and moves the
 * head hint once at its end (fmq_ring_finish_get): no statistics, no head
 * move and no wake here. */
static inline __attribute__((always_inline)) int
fmq_ring_retire_slot(fmq_region *r, fmq_msg *m, int wake, int quiet) {
    fmq_slot *s = fmq_slot_at(r, m->ticket);
    uint64_t expect = m->word;
    uint64_t next = fmq_word(fmq_lap_stamp(r, m->ticket) + 4 /* EMPTY, next lap */, 0);
    if (!atomic_compare_exchange_strong_explicit(&s->word, &expect, next,
                                                 memory_order_seq_cst,        /* [R-rel] */
                                                 memory_order_relaxed))
        return fmq_fail(FMQ_ELOST, "the slot being read was reclaimed by crash recovery");
    FMQ_CRASHPOINT("ring.release.freed");
    m->detached = 1;
    if (quiet)
        return FMQ_OK;
    fmq_count(r, FMQ_ST_DEQUEUED, 1);
    fmq_count(r, FMQ_ST_BYTES_OUT, m->len);
    fmq_advance_head(r);
    if (wake)
        fmq_wake_space(r);
    return FMQ_OK;
}

int fmq_ring_drop_damaged(fmq_region *r, fmq_msg *m) {
    fmq_ring_skip_damaged(r, fmq_slot_at(r, m->ticket), m->ticket, m->word);
    uint32_t b = m->block;
    m->detached = 1;
    m->block = FMQ_NO_BLOCK;   /* we hold no share of it */
    return fmq_fail(FMQ_ECORRUPT, "message at ticket %llu names block %#x, which is not "
                                  "queued; it was skipped and counted in "
                                  "stats()[\"abandoned\"]", (unsigned long long)m->ticket, b);
}

/* cold and out of line: the free path it leaves stays as short as before */
__attribute__((noinline, cold)) int fmq_ring_drop_foreign(fmq_region *r, fmq_msg *m) {
    fmq_pool_transition(r, m->block, FMQ_BLK_IN_RING | FMQ_READER_MASK,
                        FMQ_BLK_AS_READER(r->owner_tag), FMQ_BLK_IN_RING);
    return fmq_ring_drop_damaged(r, m);
}

/* model: ring.free_slot */
/* Inlined into its callers (release, detach), as before the ticket check
 * made it big enough for the compiler to keep it out of line: a call on
 * every get. */
static inline __attribute__((always_inline)) int
fmq_ring_free_slot(fmq_region *r, fmq_msg *m, int wake, int quiet) {
    int rc;
    uint32_t block = m->block;
    /* The block's ring share becomes our reader share while we still hold the
     * slot: a consumer killed between the two steps leaves a READING slot whose
     * block names it as reader, and recovery turns both back (fmq_recover.c). */
    if (block != FMQ_NO_BLOCK) {
        rc = fmq_pool_transition(r, block, FMQ_BLK_IN_RING | FMQ_READER_MASK, FMQ_BLK_IN_RING,
                                 FMQ_BLK_AS_READER(r->owner_tag));
        if (rc != FMQ_OK)
            /* The block is not the queue's (a damaged slot, e.g. a phase
             * flipped back to READY over a consumed message): never deliver
             * it, and do not leave the slot READING, which would wedge the
             * ring a lap on. */
            return rc == FMQ_ELOST ? fmq_ring_drop_damaged(r, m) : rc;
        if (!fmq_block_holds_ticket(r, block, m->ticket))
            /* Queued, but for another slot (the same damage with the block
             * reused, or reused while we copied it): that message's share
             * goes back untouched, and ours is skipped. */
            return fmq_ring_drop_foreign(r, m);
    }
    FMQ_CRASHPOINT("ring.release.before_free");
    return fmq_ring_retire_slot(r, m, wake, quiet);
}

/* The message moved into the in-flight table (fmq_lease.c), which took over
 * the block share: free the slot without touching the block. */
int fmq_ring_free_moved(fmq_region *r, fmq_msg *m) {
    return fmq_ring_retire_slot(r, m, 1, 0);
}

int fmq_ring_detach(fmq_region *r, fmq_msg *m, int wake) {
    if (m->detached)
        return FMQ_OK;
    return fmq_ring_free_slot(r, m, wake, 0);
}

static inline __attribute__((always_inline)) int
fmq_ring_release_as(fmq_region *r, fmq_msg *m, int wake, int quiet) {
    int rc = FMQ_OK;
    if (!m->detached)
        rc = fmq_ring_free_slot(r, m, wake, quiet);
    if (m->block != FMQ_NO_BLOCK && rc == FMQ_OK) {
        uint32_t b = m->block;
        m->block = FMQ_NO_BLOCK;
        rc = fmq_pool_release_reader(r, b);
    }
    return rc;
}

int fmq_ring_release(fmq_region *r, fmq_msg *m, int wake) {
    return fmq_ring_release_as(r, m, wake, 0);
}

/* One release of a run (get_many): see fmq_ring_retire_slot's quiet. The
 * counters are statistics: a consumer killed inside a run leaves them low
 * by what it released of the run. The head hint lags meanwhile, which is
 * always allowed: claims walk forward over consumed slots. */
int fmq_ring_release_quiet(fmq_region *r, fmq_msg *m) {
    return fmq_ring_release_as(r, m, 0, 1);
}

void fmq_ring_finish_get(fmq_region *r, uint64_t n, uint64_t bytes) {
    fmq_count(r, FMQ_ST_DEQUEUED, n);
    fmq_count(r, FMQ_ST_BYTES_OUT, bytes);
    fmq_advance_head(r);
}

int fmq_ring_unclaim(fmq_region *r, fmq_msg *m) {
    if (m->detached)
        return fmq_fail(FMQ_ESTATE, "cannot unclaim a detached message");
    fmq_slot *s = fmq_slot_at(r, m->ticket);
    uint64_t expect = m->word;
    uint64_t ready = fmq_word(fmq_lap_stamp(r, m->ticket) + FMQ_PH_READY, 0);
    if (!atomic_compare_exchange_strong_explicit(&s->word, &expect, ready,
                                                 memory_order_seq_cst, memory_order_relaxed))
        return fmq_fail(FMQ_ELOST, "the slot was reclaimed by crash recovery");
    fmq_wake_data(r, 0);
    return FMQ_OK;
}

/* ======================================================================== */
/* atomic batches (one record, many messages: see fmq_layout.h)             */
/* ======================================================================== */

int fmq_ring_batch_frame(fmq_region *r, const fmq_msg *m, uint64_t cursor,
                         const unsigned char **data, uint32_t *len, uint32_t *count,
                         uint64_t *next) {
    (void)r;
    /* m->data and m->len were validated by the claim; the framing is the
     * producer's and is read once per field here, checked, then used. */
    uint32_t c, n, off = FMQ_CURSOR_OFF(cursor), idx = FMQ_CURSOR_IDX(cursor);
    if (!(m->flags & FMQ_MSG_BATCH) || m->len < FMQ_BATCH_HEADER)
        goto bad;
    memcpy(&c, m->data, 4);
    if (c < 1 || c > FMQ_MAX_BATCH || idx >= c || off < FMQ_BATCH_HEADER || off > m->len ||
        m->len - off < FMQ_FRAME_HEADER)
        goto bad;
    memcpy(&n, m->data + off, 4);
    if (m->len - off - FMQ_FRAME_HEADER < n)
        goto bad;
    uint32_t end = off + FMQ_FRAME_HEADER + n;
    if ((idx + 1 == c) != (end == m->len))
        goto bad;   /* the last frame must end the record, and only it */
    *data = m->data + off + FMQ_FRAME_HEADER;
    *len = n;
    *count = c;
    *next = FMQ_CURSOR(end, idx + 1);
    return FMQ_OK;
bad:
    return fmq_fail(FMQ_ECORRUPT, "atomic batch at ticket %llu has damaged framing (cursor "
                                  "%#llx, record of %u bytes)",
                    (unsigned long long)m->ticket, (unsigned long long)cursor, m->len);
}

uint32_t fmq_ring_batch_index(uint64_t cursor) { return FMQ_CURSOR_IDX(cursor); }

/* model: ring.batch_advance -- the slot goes back READY as in
 * fmq_ring_unclaim, with the cursor stored first: that store is the
 * hand-over (fmq_layout.h). */
int fmq_ring_batch_advance(fmq_region *r, fmq_msg *m, uint64_t next, uint32_t taken) {
    if (m->detached || !(m->flags & FMQ_MSG_BATCH))
        return fmq_fail(FMQ_ESTATE, "not a claimed batch");
    fmq_slot *s = fmq_slot_at(r, m->ticket);
    /* Before the hand-over: a kill in between leaves the count low. */
    atomic_fetch_sub_explicit(&r->ctl->batch_extra.v, taken, memory_order_relaxed);
    /* We hold the slot (READING(me)): nobody else writes the cursor. The
     * store is the hand-over of the `taken` messages (see fmq_layout.h); the
     * unclaim CAS below releases it to the next claimer [R-rel]. */
    s->cursor = next;
    FMQ_CRASHPOINT("ring.batch.advanced");
    uint64_t expect = m->word;
    uint64_t ready = fmq_word(fmq_lap_stamp(r, m->ticket) + FMQ_PH_READY, 0);
    if (!atomic_compare_exchange_strong_explicit(&s->word, &expect, ready,
                                                 memory_order_seq_cst,       /* [R-rel] */
                                                 memory_order_relaxed))
        return fmq_fail(FMQ_ELOST, "the slot was reclaimed by crash recovery");
    m->cursor = next;
    m->detached = 1;   /* no longer ours */
    fmq_count(r, FMQ_ST_DEQUEUED, taken);
    fmq_wake_data(r, 0);
    return FMQ_OK;
}

int fmq_ring_batch_release(fmq_region *r, fmq_msg *m, uint32_t taken) {
    if (taken > 1)   /* the last message was counted by the record itself */
        atomic_fetch_sub_explicit(&r->ctl->batch_extra.v, taken - 1, memory_order_relaxed);
    return fmq_ring_release(r, m, 1);
}

uint64_t fmq_ring_queued(fmq_region *r) {
    int64_t extra = (int64_t)atomic_load_explicit(&r->ctl->batch_extra.v, memory_order_relaxed);
    uint64_t d = fmq_ring_depth(r);
    return extra > 0 && d ? d + (uint64_t)extra : d;
}

int fmq_ring_discard_claimed(fmq_region *r, fmq_msg *m) {
    if (!m->detached && (m->flags & FMQ_MSG_BATCH) && m->len >= FMQ_BATCH_HEADER) {
        uint32_t c, idx = FMQ_CURSOR_IDX(m->cursor);
        memcpy(&c, m->data, 4);
        if (c <= FMQ_MAX_BATCH && idx < c)   /* what the record still counted */
            atomic_fetch_sub_explicit(&r->ctl->batch_extra.v, c - idx - 1,
                                      memory_order_relaxed);
    }
    if (!m->detached) {
        fmq_ring_discard(r, fmq_slot_at(r, m->ticket), m->ticket, m->word, m->block);
        m->detached = 1;
        m->block = FMQ_NO_BLOCK;
    }
    return fmq_fail(FMQ_ECORRUPT, "message at ticket %llu is damaged (an atomic batch whose "
                                  "framing does not add up); it was skipped and counted in "
                                  "stats()[\"abandoned\"]", (unsigned long long)m->ticket);
}

/* Is ticket t's slot still READING by owner at t's lap? One load; a slot
 * never returns to that word once released (its stamp only moves on). */
int fmq_ring_is_reading(fmq_region *r, uint64_t t, uint32_t owner) {
    uint64_t w = atomic_load_explicit(&fmq_slot_at(r, t)->word, memory_order_acquire);
    return w == fmq_word(fmq_lap_stamp(r, t) + FMQ_PH_READING, owner);
}

uint64_t fmq_ring_depth(fmq_region *r) { return fmq_depth_hint(r); }

int fmq_ring_names_block(fmq_region *r, uint32_t block, uint64_t skip_ticket) {
    uint64_t nslots = fmq_ring_committed(r);   /* only reserved slots exist */
    for (uint64_t i = 0; i < nslots; i++) {
        if (skip_ticket != ~0ull && i == skip_ticket % r->g.slot_count)
            continue;
        fmq_slot *s = fmq_slot_at(r, i);
        /* [A-claim]-like: pairs with [R-commit], so the block field read
         * below is the one the slot was published with. */
        uint64_t w = atomic_load_explicit(&s->word, memory_order_acquire);
        uint32_t phase = fmq_slot_phase(w);
        if ((phase == FMQ_PH_READY || phase == FMQ_PH_READING) && FMQ_ONCE(s->block) == block)
            return 1;
    }
    return 0;
}

/* ======================================================================== */
/* waiting                                                                  */
/* ======================================================================== */

/* Callers have just published with a seq_cst RMW (commit, free, push): the
 * waker half of the handshake in fmq_wait.h (see the header's "waiting"). */
void fmq_ring_wake_consumers(fmq_region *r, int all) { fmq_wake_data(r, all); }
void fmq_ring_wake_producers(fmq_region *r) { fmq_wake_space(r); }

/* What a waiter is stuck behind: the slot that blocks progress and the word
 * it had (to notice that it has not changed), or ticket ~0 for "nothing in
 * particular" (an empty queue, a genuinely full one, an exhausted pool). */
typedef struct {
    uint64_t ticket, word;
} fmq_blocker;

/* Is some slot READY (a claim could succeed)? Same scan as fmq_ring_claim. */
static int fmq_has_data(fmq_region *r, uint64_t unused, fmq_blocker *b) {
    (void)unused;
    uint64_t h = atomic_load_explicit(&r->ctl->head.v, memory_order_relaxed);
    b->ticket = ~0ull;
    for (uint64_t n = 0; n <= r->g.slot_count; n++, h++) {
        uint64_t w = atomic_load_explicit(&fmq_slot_at(r, h)->word, memory_order_seq_cst);
        int64_t d = fmq_stamp_diff(fmq_stamp(w), fmq_lap_stamp(r, h) + FMQ_PH_READY);
        if (d == 0)
            return 1;
        if (d == 1 && b->ticket == ~0ull) {
            /* READING: a consumer holds it. Not in our way now, but if that
             * consumer died before the hand-over, this is the message we are
             * waiting for -- so it is what to check when nothing arrives. */
            b->ticket = h;
            b->word = w;
        }
        if (d < -2 && n == 0)
            return 1;               /* a scribbled hint: the claim repairs it */
        if (d < 0) {
            if (d == -1) {          /* WRITING: a producer has not committed yet */
                b->ticket = h;
                b->word = w;
            }
            return 0;
        }
    }
    return 1;   /* could not decide: let the caller try */
}

/* Is a slot (need == 0) or a block of need bytes free? */
static int fmq_has_space(fmq_region *r, uint64_t need, fmq_blocker *b) {
    b->ticket = ~0ull;
    if (need)
        return fmq_pool_available(r, need);
    uint64_t t = atomic_load_explicit(&r->ctl->tail.v, memory_order_relaxed);
    if (!fmq_ring_room(r, t))
        return 0;   /* no /dev/shm for the next slots: wait like a full ring */
    for (uint64_t n = 0; n <= r->g.slot_count; n++, t++) {
        uint64_t w = atomic_load_explicit(&fmq_slot_at(r, t)->word, memory_order_seq_cst);
        int64_t d = fmq_stamp_diff(fmq_stamp(w), fmq_lap_stamp(r, t) + FMQ_PH_EMPTY);
        if (d == 0 || (d < -3 && n == 0))
            return 1;               /* free (or a scribbled hint: reserve repairs it) */
        if (d < 0) {
            uint32_t ph = fmq_slot_phase(w);
            if (ph == FMQ_PH_READING || ph == FMQ_PH_WRITING) {
                b->ticket = t - r->g.slot_count;   /* the held message's ticket */
                b->word = w;
            }
            return 0;
        }
    }
    return 1;
}

/* Per thread: the blocker this thread has been waiting behind, and since when;
 * and when it last ran a full recovery pass while getting nowhere. */
static __thread uint64_t fmq_tl_stall_ticket = ~0ull, fmq_tl_stall_word, fmq_tl_stall_since;
static __thread uint64_t fmq_tl_last_recover, fmq_tl_last_hint_check;

static void fmq_note_blocker(fmq_region *r, const fmq_blocker *b, int pool_wait) {
    uint64_t now = fmq_now_ns();
    /* Whatever the visible blocker is (or whether there is one), a waiter
     * that has made no progress for a while looks for any dead participant
     * once a second: a dead holder may be behind a live one in the scan. */
    if (now - fmq_tl_last_recover >= FMQ_RECOVER_EVERY_NS) {
        fmq_tl_last_recover = now;
        r->up->recover(r);
        /* Or a scribbled hint hides what we wait for. The check reads every
         * slot word, so big rings run it less often: about one slot word per
         * 15 us of waiting (once a second up to 64 Ki slots). */
        uint64_t every = FMQ_RECOVER_EVERY_NS * (r->g.slot_count / 65536 + 1);
        if (now - fmq_tl_last_hint_check >= every) {
            fmq_tl_last_hint_check = now;
            fmq_ring_check_hints(r);
        }
    }
    if (b->ticket == ~0ull) {
        fmq_tl_stall_ticket = ~0ull;
        if (pool_wait)
            r->up->recover(r);   /* exhausted pool: a dead holder may be the reason */
        return;
    }
    if (b->ticket != fmq_tl_stall_ticket || b->word != fmq_tl_stall_word) {
        fmq_tl_stall_ticket = b->ticket;
        fmq_tl_stall_word = b->word;
        fmq_tl_stall_since = now;
        return;
    }
    if (now - fmq_tl_stall_since >= FMQ_STALL_NS)
        r->up->recover_stalled(r, b->ticket, b->word, fmq_tl_stall_since);
}

/* fmq_waitline_sleep's re-check, in the ring's terms. */
typedef struct {
    fmq_region *r;
    int (*ready)(fmq_region *, uint64_t, fmq_blocker *);
    uint64_t arg;
    fmq_blocker *blk;
} fmq_ready_ctx;

static int fmq_ready_thunk(void *ctx) {
    fmq_ready_ctx *cx = ctx;
    return cx->ready(cx->r, cx->arg, cx->blk);
}

/* Per thread and direction (0: waits for data, 1: for space), how this
 * thread's recent waits went, so that its next wait spins as long as is worth
 * it. The pause phase (busy, on this CPU) only pays while the process we wait
 * for runs on another CPU: then it sees a message a fraction of a microsecond
 * after it lands. When both share a CPU (a loaded 2-core machine puts a
 * ping-pong pair on one), every pause only delays the other side, which
 * cannot run until we yield. So:
 *   - a pause phase that ran out halves the next one (down to _MIN): a pair
 *     on one CPU soon yields almost at once, handing the CPU over;
 *   - a wait that ended in the pause phase doubles the next one (up to _MAX),
 *     and one that ended after t ns in the yield phase while its yields kept
 *     the CPU (nobody else was runnable here, so the sender runs elsewhere)
 *     makes it at least 2t: a pair on two CPUs keeps spinning, and a rare
 *     late message (the sender was preempted) costs it one halving, undone
 *     by the next wait;
 *   - FMQ_LONG_WAITS waits in a row that went to sleep and were not woken
 *     soon (an idle queue, sparse traffic) skip spinning until a sleep ends
 *     quickly again: an idle consumer costs one look per slice, not a spin.
 * Thread-local: no shared state, and a thread's waits are one sequence. */
typedef struct {
    uint64_t pause_ns;
    unsigned long_waits;
} fmq_spin_state;
static __thread fmq_spin_state fmq_tl_spin[2] = {{FMQ_SPIN_PAUSE_NS, 0},
                                                 {FMQ_SPIN_PAUSE_NS, 0}};

/* A wait ended in the spin phases: in the pause phase (yields == 0), or
 * after about waited ns, yield_ns of them in yields sched_yield calls. */
static void fmq_spin_done(fmq_spin_state *st, uint64_t waited, uint64_t yield_ns,
                          unsigned yields) {
    st->long_waits = 0;
    if (yields && yield_ns > (uint64_t)yields * FMQ_YIELD_KEPT_NS)
        return;   /* a yield ran someone else here: a longer pause would not have helped */
    uint64_t want = 2 * (yields ? waited : st->pause_ns);
    if (want > FMQ_SPIN_PAUSE_MAX_NS)
        want = FMQ_SPIN_PAUSE_MAX_NS;
    if (want > st->pause_ns)
        st->pause_ns = want;
}

static int fmq_wait_for(fmq_region *r, fmq_waitline *wl,
                        int (*ready)(fmq_region *, uint64_t, fmq_blocker *), uint64_t arg,
                        uint64_t deadline_ns) {
    fmq_blocker blk;
    fmq_spin_state *st = &fmq_tl_spin[wl == &r->ctl->space];
    /* 1. Spin briefly: a message usually arrives within microseconds under
     *    load, and a futex round trip costs more than that. First with pause
     *    (as long as fmq_spin_state says it pays), then with sched_yield, so
     *    that on an oversubscribed machine the process we are waiting for
     *    gets the core. After long waits, only one look. */
    uint64_t start = fmq_now_ns(), now = start;
    uint64_t spin_until = start + (st->long_waits >= FMQ_LONG_WAITS ? 0 : FMQ_SPIN_NS);
    uint64_t pause_until = start + st->pause_ns;
    if (deadline_ns && spin_until > deadline_ns)
        spin_until = deadline_ns;
    uint64_t yield_ns = 0;
    unsigned yields = 0;
    int pausing = 1;
    for (;;) {
        if (ready(r, arg, &blk)) {
            fmq_spin_done(st, now - start, yield_ns, yields);   /* now: the last look's */
            return FMQ_OK;
        }
        /* One clock read per look (a vDSO read, a few tens of ns): the
         * pause phase may be a fraction of a microsecond long. */
        now = fmq_now_ns();
        if (now >= spin_until)
            break;
        if (pausing && now >= pause_until) {
            pausing = 0;   /* the pause phase ran out: the next one is shorter */
            st->pause_ns = st->pause_ns / 2 > FMQ_SPIN_PAUSE_MIN_NS ? st->pause_ns / 2
                                                                  : FMQ_SPIN_PAUSE_MIN_NS;
        }
        if (pausing) {
            /* A pause takes ~20-140 cycles depending on the core: a few of
             * them between two looks, so that a message that arrives is
             * seen within a fraction of a microsecond (it is half of every
             * hop of a round trip), not after ~16 of them. */
            for (int k = 0; k < FMQ_SPIN_PAUSES; k++)
                fmq_cpu_relax();
        } else {
            sched_yield();
            yield_ns += fmq_now_ns() - now;
            yields++;
        }
    }
    if (deadline_ns && now >= deadline_ns)
        return FMQ_TIMEDOUT;

    /* 2. Sleep on the epoch word, at most one slice (fmq_wait.h's handshake:
     *    the re-check there is ready() again, whose slot loads are seq_cst). */
    fmq_ready_ctx cx = {r, ready, arg, &blk};
    int rc = fmq_waitline_sleep(wl, fmq_ready_thunk, &cx, deadline_ns);
    if (rc == FMQ_OK && fmq_now_ns() - start < FMQ_QUICK_WAKE_NS)
        st->long_waits = 0;          /* dense traffic again: spin next time */
    else if (st->long_waits < FMQ_LONG_WAITS)
        st->long_waits++;
    if (rc == FMQ_AGAIN) {
        /* A whole slice without a wake: is a dead process the reason? */
        fmq_note_blocker(r, &blk, wl == &r->ctl->space && arg != 0);
        if (deadline_ns && fmq_now_ns() >= deadline_ns)
            return FMQ_TIMEDOUT;
        return FMQ_AGAIN;
    }
    return rc;
}

int fmq_ring_wait_data(fmq_region *r, uint64_t deadline_ns) {
    fmq_pool_idle(r);   /* once per wait slice: an idle queue gives memory back */
    if (r->up->redeliver_due(r, 0) > 0)
        return FMQ_OK;   /* something just came back: retry at once */
    return fmq_wait_for(r, &r->ctl->data, fmq_has_data, 0, deadline_ns);
}

int fmq_ring_wait_space(fmq_region *r, uint64_t deadline_ns, uint64_t need_bytes) {
    return fmq_wait_for(r, &r->ctl->space, fmq_has_space, need_bytes, deadline_ns);
}

/* Room for nslots more records: the admission test of an atomic batch (it
 * counts its messages toward maxsize when it goes in; see the binding). */
static int fmq_has_room(fmq_region *r, uint64_t nslots, fmq_blocker *b) {
    b->ticket = ~0ull;
    return fmq_ring_queued(r) + nslots <= r->g.slot_count;
}

int fmq_ring_wait_room(fmq_region *r, uint64_t deadline_ns, uint64_t nslots) {
    return fmq_wait_for(r, &r->ctl->space, fmq_has_room, nslots, deadline_ns);
}
