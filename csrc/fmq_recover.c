/*
 * fmq_recover.c -- crash recovery: taking back what a dead process held.
 *
 * When. A waiter whose progress is blocked by one slot for FMQ_STALL_NS (a
 * WRITING slot at the consumers' head, a READING/WRITING slot at the
 * producers' tail) checks that slot's owner; a producer waiting on an
 * exhausted pool checks everyone; registration reaps the previous occupant of
 * the entry it takes. Nothing is ever reaped on a timeout alone: only an owner
 * whose participant lock the kernel has dropped (fmq_live.c) is dead. A live
 * but frozen owner (SIGSTOP, a debugger) is recorded in ctl->stall and shown
 * by stats() instead.
 *
 * Who. The reaper first takes the dead participant's lock itself, so no other
 * process can register into that entry (or reap it twice) meanwhile; if the
 * reaper dies too, the lock drops again and the next one redoes the work.
 * Every repair below is a CAS from the exact state the dead process left, so
 * repeating it is harmless and a late live owner gets FMQ_ELOST, never a
 * corrupted slot.
 *
 * What (for the dead participant's tag T):
 *  1. Slots. WRITING(T): the message was never published -> the slot is
 *     skipped (stamp moved to the next lap's EMPTY) and counted as abandoned.
 *     READING(T): the consumer died before the hand-over (the release CAS) ->
 *     the block's share goes back to the ring and the slot back to READY in
 *     place; the head hint never passes a READING slot, so the next claim
 *     finds it again. No loss, no duplicate: the application never saw it.
 *  0. In-flight entries of T (fmq_lease_reap): leases become orphaned and
 *     due, dead letters being taken are parked again.
 *  2. Blocks. Every block naming T as writer or reader loses that share. A
 *     block that T marked IN_RING but whose slot was never published (T died
 *     inside fmq_ring_commit) is recognised by not being named by any
 *     READY/READING slot nor by any in-flight entry, and loses that share
 *     too. Blocks whose word reaches zero go back to their free stacks
 *     (counted as reclaimed).
 *
 * Memory order. Every repair is an acq_rel CAS (the slot repairs seq_cst, as
 * the ring's publishing CASes they stand in for: see fmq_ring.c "waiting")
 * from the word read with acquire: [A-reap] the load of a slot/block/entry
 * word pairs with the dead holder's last release of it ([R-commit],
 * [R-rel], [R-lease], [R-free]), so the fields it wrote before are seen.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fmq_internal.h"


static int fmq_entry_lock(fmq_region *r, uint32_t idx, short type) {
    return fmq_live_lock_byte(r->fd, F_OFD_SETLK, type, FMQ_LOCK_BASE + idx, NULL);
}

static inline fmq_slot *fmq_rslot(fmq_region *r, uint64_t i) {
    return (fmq_slot *)(r->ring + i * r->g.slot_stride);
}

/* Index of a block across all classes, for the "published" bitmap. */
int64_t fmq_block_ordinal(fmq_region *r, uint32_t block) {
    uint32_t c = FMQ_BLOCK_CLASS(block);
    if (c >= r->g.nclasses || FMQ_BLOCK_INDEX(block) >= r->g.classes[c].nblocks)
        return -1;
    int64_t base = 0;
    for (uint32_t k = 0; k < c; k++)
        base += (int64_t)r->g.classes[k].nblocks;
    return base + FMQ_BLOCK_INDEX(block);
}

/* Was the message in slot i (at the lap its stamp says) moved into an entry? */
static int fmq_was_taken(fmq_region *r, const fmq_taken *t, uint64_t i, uint64_t stamp) {
    uint64_t lap = stamp >> 2, mask = (1ull << (FMQ_STAMP_BITS - 2)) - 1;
    for (size_t k = 0; k < t->n; k++)
        if (t->tickets[k] % r->g.slot_count == i &&
            ((t->tickets[k] / r->g.slot_count) & mask) == lap)
            return 1;
    return 0;
}

void fmq_reap_tag(fmq_region *r, uint32_t tag) {
    uint64_t total = 0;
    for (uint32_t c = 0; c < r->g.nclasses; c++)
        total += r->g.classes[c].nblocks;
    unsigned char *published = calloc(total ? total : 1, 1);
    uint64_t abandoned = 0, reclaimed = 0;

    /* 0. in-flight entries first: they decide whether a READING slot of the
     *    dead tag is a message to put back or one already moved to an entry. */
    fmq_taken taken = {calloc(r->g.slot_count, sizeof(uint64_t)), 0};
    fmq_lease_reap(r, tag, &taken);

    /* 1. slots (model: recover.slot_pass; only reserved ones exist: fmq_pool.c) */
    uint64_t nslots = fmq_ring_committed(r);
    for (uint64_t i = 0; i < nslots; i++) {
        fmq_slot *s = fmq_rslot(r, i);
        uint64_t w = atomic_load_explicit(&s->word, memory_order_acquire);   /* [A-reap] */
        uint64_t stamp = w >> FMQ_OWNER_BITS;
        uint32_t phase = (uint32_t)(stamp & 3);
        uint32_t owner = (uint32_t)(w & FMQ_OWNER_MASK);
        uint32_t sb = FMQ_ONCE(s->block);   /* one load: checked, then used */
        if ((phase == FMQ_PH_READY || phase == FMQ_PH_READING) && sb != FMQ_NO_BLOCK) {
            int64_t o = fmq_block_ordinal(r, sb);
            if (o >= 0 && published)
                published[o] = 1;
        }
        if (owner != tag || owner == 0)
            continue;
        if (phase == FMQ_PH_WRITING) {
            uint64_t next = ((stamp - FMQ_PH_WRITING + 4) & ((1ull << FMQ_STAMP_BITS) - 1))
                            << FMQ_OWNER_BITS;
            FMQ_CRASHPOINT("recover.before_skip");
            if (atomic_compare_exchange_strong_explicit(&s->word, &w, next,
                                                        memory_order_seq_cst,
                                                        memory_order_relaxed))
                abandoned++;
        } else if (phase == FMQ_PH_READING && fmq_was_taken(r, &taken, i, stamp)) {
            /* moved into an in-flight entry that now owns the block: free it */
            uint64_t next = ((stamp - FMQ_PH_READING + 4) & ((1ull << FMQ_STAMP_BITS) - 1))
                            << FMQ_OWNER_BITS;
            atomic_compare_exchange_strong_explicit(&s->word, &w, next, memory_order_seq_cst,
                                                    memory_order_relaxed);
        } else if (phase == FMQ_PH_READING) {
            uint32_t b = sb;
            if (b != FMQ_NO_BLOCK && fmq_block_ordinal(r, b) >= 0) {
                /* reader share (if it got that far) back to the ring */
                fmq_pool_transition(r, b, FMQ_BLK_IN_RING | FMQ_READER_MASK,
                                    (uint64_t)tag << 24, FMQ_BLK_IN_RING);
            }
            uint64_t ready = ((stamp - FMQ_PH_READING + FMQ_PH_READY) &
                              ((1ull << FMQ_STAMP_BITS) - 1)) << FMQ_OWNER_BITS;
            FMQ_CRASHPOINT("recover.before_unclaim");
            atomic_compare_exchange_strong_explicit(&s->word, &w, ready, memory_order_seq_cst,
                                                    memory_order_relaxed);
        }
    }

    /* 2. blocks (model: recover.block_pass). Blocks that in-flight entries
     * name count as published too:
     *    an entry parked, orphaned or dead-lettered holds the IN_RING share
     *    of a message that has left the ring, and when its producer kept a
     *    reservation view after commit, the dead producer's writer tag is
     *    still on that block -- it must lose the writer share only. Marked
     *    after the slot pass: a message moving from a slot into an entry
     *    meanwhile is seen in one place or the other. */
    if (published)
        fmq_lease_mark_blocks(r, published);
    for (uint32_t c = 0; c < r->g.nclasses; c++) {
        fmq_block_meta *meta = (fmq_block_meta *)(r->base + r->g.classes[c].meta_offset);
        int64_t base = fmq_block_ordinal(r, FMQ_BLOCK_REF(c, 0));
        uint64_t carved = fmq_pool_carved(r, c);
        for (uint64_t i = 0; i < carved; i++) {
            _Atomic uint64_t *st = &meta[i].state;
            uint64_t cur = atomic_load_explicit(st, memory_order_acquire);
            for (;;) {
                uint64_t want = cur;
                if (FMQ_BLK_WRITER(cur) == tag) {
                    want &= ~FMQ_WRITER_MASK;
                    if ((cur & FMQ_BLK_IN_RING) && published && !published[base + (int64_t)i])
                        want &= ~FMQ_BLK_IN_RING;   /* died inside commit */
                }
                if (FMQ_BLK_READER(cur) == tag)
                    want &= ~FMQ_READER_MASK;
                if (want == cur)
                    break;
                if (atomic_compare_exchange_weak_explicit(st, &cur, want, memory_order_acq_rel,
                                                          memory_order_acquire)) {
                    if (want == 0) {
                        fmq_pool_free_block(r, c, (uint32_t)i);
                        reclaimed++;
                    }
                    break;
                }
            }
        }
    }
    free(published);
    free(taken.tickets);
    /* Straight into the segment's totals: the reaper may not be registered
     * yet (fmq_live_register reaps its entry's predecessor first). */
    if (abandoned)
        atomic_fetch_add_explicit(&r->ctl->retired[FMQ_ST_ABANDONED], abandoned,
                                  memory_order_relaxed);
    if (reclaimed)
        atomic_fetch_add_explicit(&r->ctl->retired[FMQ_ST_RECLAIMED], reclaimed,
                                  memory_order_relaxed);
    fmq_ring_wake_consumers(r, 1);
    fmq_ring_wake_producers(r);
}

/* model: recover.reap */
int fmq_recover(fmq_region *r) {
    int reaped = 0;
    for (uint32_t idx = 0; idx < r->g.nparticipants; idx++) {
        fmq_participant *p = &r->parts[idx];
        uint64_t id = atomic_load_explicit(&p->ident, memory_order_acquire);
        if ((id & 0xFFFF) != FMQ_PART_ACTIVE || idx == r->me)
            continue;
        if (fmq_live_is_alive(r, idx))
            continue;
        /* Take its lock: nobody registers here or reaps it meanwhile. */
        if (fmq_entry_lock(r, idx, F_WRLCK) != 0)
            continue;
        if (atomic_load_explicit(&p->ident, memory_order_acquire) == id) {
            uint32_t gen = (uint32_t)(id >> 16) & ((1u << FMQ_GEN_BITS) - 1);
            fmq_reap_tag(r, (idx << FMQ_GEN_BITS) | gen);
            atomic_store_explicit(&p->ident, (id & ~0xFFFFull) | FMQ_PART_FREE,
                                  memory_order_release);
            atomic_fetch_add_explicit(&r->ctl->recoveries.v, 1, memory_order_relaxed);
            reaped++;
        }
        fmq_entry_lock(r, idx, F_UNLCK);
    }
    return reaped;
}

void fmq_recover_stalled(fmq_region *r, uint64_t ticket, uint64_t word, uint64_t since_ns) {
    uint32_t owner = (uint32_t)(word & FMQ_OWNER_MASK);
    uint32_t idx = owner >> FMQ_GEN_BITS;
    uint32_t gen = owner & ((1u << FMQ_GEN_BITS) - 1);
    if (owner == 0 || idx >= r->g.nparticipants)
        return;
    fmq_participant *p = &r->parts[idx];
    uint64_t id = atomic_load_explicit(&p->ident, memory_order_acquire);
    int same_gen = ((uint32_t)(id >> 16) & ((1u << FMQ_GEN_BITS) - 1)) == gen;
    if (same_gen && (id & 0xFFFF) == FMQ_PART_ACTIVE && fmq_live_is_alive(r, idx)) {
        /* Alive but not moving (frozen): report, never reap. */
        atomic_store_explicit(&r->ctl->stall.pid, (uint32_t)(id >> 32), memory_order_relaxed);
        atomic_store_explicit(&r->ctl->stall.phase, (uint32_t)((word >> FMQ_OWNER_BITS) & 3),
                              memory_order_relaxed);
        atomic_store_explicit(&r->ctl->stall.since_ns, since_ns, memory_order_relaxed);
        atomic_store_explicit(&r->ctl->stall.word, word, memory_order_relaxed);
        atomic_store_explicit(&r->ctl->stall.ticket, ticket + 1, memory_order_release);
        return;
    }
    if (same_gen && (id & 0xFFFF) == FMQ_PART_ACTIVE) {
        fmq_recover(r);
    } else if (fmq_entry_lock(r, idx, F_WRLCK) == 0) {
        /* The entry was freed or reused since and nobody holds it now: reap
         * the old tag under the entry's lock, so that no registration into
         * the entry and no other reaper runs at the same time. */
        fmq_reap_tag(r, owner);
        fmq_entry_lock(r, idx, F_UNLCK);
    }
    /* Else a live new occupant holds the entry: it reaped the old tag under
     * that lock when it registered (fmq_live_register), and reaping again
     * without the lock could race another reaper. */
    uint64_t cur = atomic_load_explicit(&r->ctl->stall.ticket, memory_order_relaxed);
    if (cur == ticket + 1)
        atomic_store_explicit(&r->ctl->stall.ticket, 0, memory_order_relaxed);
}

/* The full audit, run by an opener that finds itself alone: every block must
 * be free (on its stack) or named by a holder. A block that is neither was
 * lost in one of the unnamed instants (fmq_pool.c) and goes back on its
 * stack; fmq_pool_audit also recomputes the pool's memory counters. Only safe with nobody else moving blocks, so it runs with the init
 * lock held and init_state switched away from READY: a process that opens
 * meanwhile waits (fmq_region_open re-checks READY after registering). */
static void fmq_alone_pass(fmq_region *r, int closing) {
    if (fmq_live_init_lock(r->fd, F_WRLCK) != 0)
        return;   /* someone else is initialising or auditing */
    uint32_t expect = FMQ_INIT_READY;
    if (!atomic_compare_exchange_strong(&r->hdr->init_state, &expect, FMQ_INIT_AUDITING)) {
        fmq_live_init_lock(r->fd, F_UNLCK);
        return;
    }
    fmq_ring_compact_finish(r);   /* one a killed process began */
    fmq_recover(r);
    int alone = 1;
    for (uint32_t idx = 0; idx < r->g.nparticipants && alone; idx++) {
        uint64_t id = atomic_load_explicit(&r->parts[idx].ident, memory_order_acquire);
        if (idx != r->me && (id & 0xFFFF) == FMQ_PART_ACTIVE && fmq_live_is_alive(r, idx))
            alone = 0;
    }
    uint64_t reclaimed = alone ? fmq_pool_audit(r) : 0;
    if (reclaimed)
        atomic_fetch_add_explicit(&r->ctl->retired[FMQ_ST_RECLAIMED], reclaimed,
                                  memory_order_relaxed);
    if (alone) {
        /* Nobody else can touch the ring: an empty one gives its pages back;
         * the last handle to close also gives back every warm block. */
        fmq_ring_compact(r);
        if (closing)
            fmq_pool_cool_all(r);
    }
    atomic_store_explicit(&r->hdr->init_state, FMQ_INIT_READY, memory_order_release);
    fmq_live_init_lock(r->fd, F_UNLCK);
}

void fmq_audit_if_alone(fmq_region *r) { fmq_alone_pass(r, 0); }

/* The handle is closing: if it is the last one, leave the segment as small
 * as a new queue's (a named queue outlives its handles). */
void fmq_release_if_alone(fmq_region *r) {
    if (r->self && r->fork_gen == fmq_fork_generation && r->fd >= 0)
        fmq_alone_pass(r, 1);
}
