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
 *     An atomic batch goes back with its cursor as the dead holder left it:
 *     the messages before the cursor were handed over, the rest were not.
 *     READING(T) whose message at the cursor T had moved into an in-flight
 *     entry (get_message, killed before moving the cursor): the move is
 *     finished here (fmq_reap_batch_taken), so the entry alone redelivers it.
 *  0. In-flight entries of T (fmq_lease_reap): leases become orphaned and
 *     due, dead letters being taken are parked again.
 *  2. Blocks. Every block naming T as writer or reader loses that share. A
 *     block that T marked IN_RING but whose slot was never published (T died
 *     inside fmq_ring_commit) is recognised by not being named by any
 *     READY/READING slot nor by any in-flight entry, and loses that share
 *     too. Blocks whose word reaches zero go back to their free stacks
 *     (counted as reclaimed).
 *
 * Memory order (tags as at each use):
 *   [A-reap]  the acquire load of a slot/block/entry word pairs with the dead
 *             holder's last release of it ([R-commit], [R-rel] in fmq_ring.c;
 *             [R-lease], [R-free] in fmq_lease.c; the block word's acq_rel
 *             CASes in fmq_pool.c), so the fields it wrote before are seen.
 *   [R-reap]  every repair is a CAS from the word read: acq_rel on block
 *             words (as fmq_pool_transition), seq_cst on slot words, as the
 *             ring's publishing CASes they stand in for: the wakes that follow
 *             read the waiter count (fmq_wait.h's handshake).
 *   [A-ident] / [R-ident]  a participant's ident: acquire loads pair with the
 *             release stores of fmq_live.c (register, unregister) and ours
 *             (a reaped entry freed), so a registrant that sees FREE sees the
 *             reap done.
 *   [R-stall] the release store of ctl->stall.ticket publishes the stall
 *             record's relaxed fields to stats() ([A-stall], fmq_region.c).
 *   [S-audit] the audit's switch to AUDITING (seq_cst; see fmq_audit_if_alone).
 *   relaxed   counters, and clearing our own stall record.
 *
 * The entry pass (fmq_lease_reap) is fmq_lease.c's and uses its tags.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fmq_internal.h"


static int fmq_entry_lock(fmq_region *r, uint32_t idx, short type) {
    return fmq_live_lock_byte(r->fd, F_OFD_SETLK, type, FMQ_LOCK_BASE + idx, NULL);
}

/* Was the message in slot i (at the lap its stamp says) moved into an entry?
 * A taken ticket matches when it maps to that slot and its lap's stamp is the
 * slot's stamp without the phase (fmq_slot_at / fmq_lap_stamp, as the ring).
 * For an atomic batch it must also name the message at the cursor
 * (src_index = 1 + cursor index; 0 for a plain message): entries taken from
 * earlier messages of the same batch do not match, the cursor has moved past
 * them. */
static int fmq_was_taken(fmq_region *r, const fmq_taken *t, uint64_t i, uint64_t stamp,
                         uint32_t src_index) {
    uint64_t lap_stamp = stamp & ~3ull;
    for (size_t k = 0; k < t->n; k++)
        if (fmq_slot_at(r, t->tickets[k]) == fmq_slot_at(r, i) &&
            fmq_lap_stamp(r, t->tickets[k]) == lap_stamp && t->index[k] == src_index)
            return 1;
    return 0;
}

/* A dead consumer leased the message at the cursor of the batch in slot s
 * (READING(tag), word w) but died before moving the cursor past it: finish
 * that move for it, so the message is not delivered again from the slot
 * (its entry, now orphaned, redelivers it). The last message (or damaged
 * framing) ends the batch: the ring's block share is dropped and the slot
 * freed. Every step is a CAS from the word the dead holder left. */
/* model: recover.batch_taken */
static void fmq_reap_batch_taken(fmq_region *r, fmq_slot *s, uint64_t w, uint64_t stamp,
                                 uint32_t sb, uint64_t cursor) {
    fmq_msg m;
    memset(&m, 0, sizeof m);
    m.len = FMQ_ONCE(s->len);
    m.block = sb;
    m.flags = FMQ_MSG_BATCH;
    m.cursor = cursor;
    if (sb == FMQ_NO_BLOCK)
        m.data = m.len <= r->inline_max ? (unsigned char *)s + FMQ_SLOT_HEADER : NULL;
    else
        m.data = fmq_pool_ptr(r, sb) && m.len <= fmq_pool_block_size(r, sb)
                     ? fmq_pool_ptr(r, sb) : NULL;
    const unsigned char *d;
    uint32_t n, count;
    uint64_t next = 0;
    int done = !m.data || fmq_ring_batch_frame(r, &m, cursor, &d, &n, &count, &next) != FMQ_OK ||
               FMQ_CURSOR_IDX(next) == count;
    if (done) {
        /* The ring's share; a holder that died inside the release may have
         * turned it into its reader share already: the block pass drops that. */
        if (sb != FMQ_NO_BLOCK && fmq_block_ordinal(r, sb) >= 0)
            fmq_pool_transition(r, sb, FMQ_BLK_IN_RING | FMQ_READER_MASK, FMQ_BLK_IN_RING, 0);
        uint64_t empty = fmq_word(stamp - FMQ_PH_READING + 4, 0);   /* EMPTY, next lap */
        atomic_compare_exchange_strong_explicit(&s->word, &w, empty,
                                                memory_order_seq_cst,   /* [R-reap] */
                                                memory_order_relaxed);
    } else {
        atomic_fetch_sub_explicit(&r->ctl->batch_extra.v, 1, memory_order_relaxed);
        s->cursor = next;   /* the slot is still READING(tag): the dead holder's */
        FMQ_CRASHPOINT("recover.batch.advanced");
        uint64_t ready = fmq_word(stamp - FMQ_PH_READING + FMQ_PH_READY, 0);
        atomic_compare_exchange_strong_explicit(&s->word, &w, ready,
                                                memory_order_seq_cst,   /* [R-reap] */
                                                memory_order_relaxed);
    }
}

void fmq_reap_tag(fmq_region *r, uint32_t tag) {
    uint64_t total = 0;
    for (uint32_t c = 0; c < r->g.nclasses; c++)
        total += r->g.classes[c].nblocks;
    unsigned char *published = calloc(total ? total : 1, 1);
    uint64_t abandoned = 0, reclaimed = 0;

    /* 0. in-flight entries first: they decide whether a READING slot of the
     *    dead tag is a message to put back or one already moved to an entry. */
    fmq_taken taken = {calloc(r->g.slot_count, sizeof(uint64_t)),
                       calloc(r->g.slot_count, sizeof(uint32_t)), 0};
    if (!taken.tickets || !taken.index) {   /* then nothing is recorded */
        free(taken.tickets);
        free(taken.index);
        taken.tickets = NULL;
        taken.index = NULL;
    }
    fmq_lease_reap(r, tag, &taken);

    /* 1. slots (model: recover.slot_pass; only reserved ones exist: fmq_pool.c) */
    uint64_t nslots = fmq_ring_committed(r);
    for (uint64_t i = 0; i < nslots; i++) {
        fmq_slot *s = fmq_slot_at(r, i);
        uint64_t w = atomic_load_explicit(&s->word, memory_order_acquire);   /* [A-reap] */
        uint64_t stamp = fmq_stamp(w);
        uint32_t phase = fmq_slot_phase(w);
        uint32_t owner = fmq_slot_owner(w);
        uint32_t sb = FMQ_ONCE(s->block);   /* one load: checked, then used */
        uint64_t batch_cursor = FMQ_ONCE(s->cursor);
        uint32_t sflags = FMQ_CURSOR_IS_BATCH(batch_cursor);
        if (!sflags)
            batch_cursor = 0;
        if ((phase == FMQ_PH_READY || phase == FMQ_PH_READING) && sb != FMQ_NO_BLOCK) {
            int64_t o = fmq_block_ordinal(r, sb);
            if (o >= 0 && published)
                published[o] = 1;
        }
        if (owner != tag || owner == 0)
            continue;
        if (phase == FMQ_PH_WRITING) {
            uint64_t next = fmq_word(stamp - FMQ_PH_WRITING + 4, 0);   /* EMPTY, next lap */
            FMQ_CRASHPOINT("recover.before_skip");
            if (atomic_compare_exchange_strong_explicit(&s->word, &w, next,
                                                        memory_order_seq_cst,   /* [R-reap] */
                                                        memory_order_relaxed))
                abandoned++;
        } else if (phase == FMQ_PH_READING && sflags &&
                   fmq_was_taken(r, &taken, i, stamp, FMQ_CURSOR_IDX(batch_cursor) + 1)) {
            fmq_reap_batch_taken(r, s, w, stamp, sb, batch_cursor);
        } else if (phase == FMQ_PH_READING && !sflags &&
                   fmq_was_taken(r, &taken, i, stamp, 0)) {
            /* moved into an in-flight entry that now owns the block: free it */
            uint64_t next = fmq_word(stamp - FMQ_PH_READING + 4, 0);   /* EMPTY, next lap */
            atomic_compare_exchange_strong_explicit(&s->word, &w, next, memory_order_seq_cst,
                                                    memory_order_relaxed);   /* [R-reap] */
        } else if (phase == FMQ_PH_READING) {
            uint32_t b = sb;
            if (b != FMQ_NO_BLOCK && fmq_block_ordinal(r, b) >= 0) {
                /* reader share (if it got that far) back to the ring */
                fmq_pool_transition(r, b, FMQ_BLK_IN_RING | FMQ_READER_MASK,
                                    FMQ_BLK_AS_READER(tag), FMQ_BLK_IN_RING);
            }
            uint64_t ready = fmq_word(stamp - FMQ_PH_READING + FMQ_PH_READY, 0);
            FMQ_CRASHPOINT("recover.before_unclaim");
            atomic_compare_exchange_strong_explicit(&s->word, &w, ready, memory_order_seq_cst,
                                                    memory_order_relaxed);   /* [R-reap] */
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
        fmq_block_meta *meta = fmq_pool_meta(r, c);
        int64_t base = fmq_block_ordinal(r, FMQ_BLOCK_REF(c, 0));
        uint64_t carved = fmq_pool_carved(r, c);
        for (uint64_t i = 0; i < carved; i++) {
            _Atomic uint64_t *st = &meta[i].state;
            uint64_t cur = atomic_load_explicit(st, memory_order_acquire);   /* [A-reap] */
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
                /* acq_rel, as fmq_pool_transition: [R-reap] on success, [A-reap]
                 * (acquire) for the value a failed CAS hands back to re-test */
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
    free(taken.index);
    /* Straight into the segment's totals: the reaper may not be registered
     * yet (fmq_live_register reaps its entry's predecessor first). Relaxed:
     * statistics, never used to order anything. */
    if (abandoned)
        atomic_fetch_add_explicit(&r->ctl->retired[FMQ_ST_ABANDONED], abandoned,
                                  memory_order_relaxed);
    if (reclaimed)
        atomic_fetch_add_explicit(&r->ctl->retired[FMQ_ST_RECLAIMED], reclaimed,
                                  memory_order_relaxed);
    fmq_wake_data(r, 1);
    fmq_wake_space(r);
}

/* model: recover.reap */
int fmq_recover(fmq_region *r) {
    int reaped = 0;
    for (uint32_t idx = 0; idx < r->g.nparticipants; idx++) {
        fmq_participant *p = &r->parts[idx];
        uint64_t id = atomic_load_explicit(&p->ident, memory_order_acquire);   /* [A-ident] */
        if (FMQ_PART_STATE(id) != FMQ_PART_ACTIVE || idx == r->me)
            continue;
        if (fmq_live_is_alive(r, idx))
            continue;
        /* Take its lock: nobody registers here or reaps it meanwhile. */
        if (fmq_entry_lock(r, idx, F_WRLCK) != 0)
            continue;
        if (atomic_load_explicit(&p->ident, memory_order_acquire) == id) {   /* [A-ident] */
            fmq_reap_tag(r, FMQ_TAG(idx, FMQ_PART_GEN(id)));
            atomic_store_explicit(&p->ident, FMQ_PART_WITH_STATE(id, FMQ_PART_FREE),
                                  memory_order_release);                  /* [R-ident] */
            atomic_fetch_add_explicit(&r->ctl->recoveries.v, 1, memory_order_relaxed); /* count */
            reaped++;
        }
        fmq_entry_lock(r, idx, F_UNLCK);
    }
    return reaped;
}

void fmq_recover_stalled(fmq_region *r, uint64_t ticket, uint64_t word, uint64_t since_ns) {
    uint32_t owner = fmq_slot_owner(word);
    uint32_t idx = FMQ_TAG_INDEX(owner);
    uint32_t gen = FMQ_TAG_GEN(owner);
    if (owner == 0 || idx >= r->g.nparticipants)
        return;
    fmq_participant *p = &r->parts[idx];
    uint64_t id = atomic_load_explicit(&p->ident, memory_order_acquire);   /* [A-ident] */
    int same_gen = FMQ_PART_GEN(id) == gen;
    if (same_gen && FMQ_PART_STATE(id) == FMQ_PART_ACTIVE && fmq_live_is_alive(r, idx)) {
        /* Alive but not moving (frozen): report, never reap. The fields are
         * relaxed, published by [R-stall], the release store of the ticket
         * that stats() loads with acquire ([A-stall], fmq_region.c). */
        atomic_store_explicit(&r->ctl->stall.pid, FMQ_PART_PID(id), memory_order_relaxed);
        atomic_store_explicit(&r->ctl->stall.phase, fmq_slot_phase(word),
                              memory_order_relaxed);
        atomic_store_explicit(&r->ctl->stall.since_ns, since_ns, memory_order_relaxed);
        atomic_store_explicit(&r->ctl->stall.word, word, memory_order_relaxed);
        atomic_store_explicit(&r->ctl->stall.ticket, ticket + 1,
                              memory_order_release);                      /* [R-stall] */
        return;
    }
    if (same_gen && FMQ_PART_STATE(id) == FMQ_PART_ACTIVE) {
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
    /* Relaxed: only clears our own record of this ticket (a compare, no
     * fields read); a racing reporter's newer record survives the mismatch. */
    uint64_t cur = atomic_load_explicit(&r->ctl->stall.ticket, memory_order_relaxed);
    if (cur == ticket + 1)
        atomic_store_explicit(&r->ctl->stall.ticket, 0, memory_order_relaxed);
}

/* The full audit, run by an opener that finds itself alone: every block must
 * be free (on its stack) or named by a holder. A block that is neither was
 * lost in one of the unnamed instants (fmq_pool.c) and goes back on its
 * stack; fmq_pool_audit also recomputes the pool's memory counters. Only
 * safe with nobody else moving blocks, so it runs with the init lock held
 * and init_state switched away from READY: a process that opens meanwhile
 * waits (fmq_region_open re-checks READY after registering). Alone, it also
 * gives back an empty ring's pages (fmq_ring_compact), and a closing last
 * handle every warm block. */
static void fmq_alone_pass(fmq_region *r, int closing) {
    if (fmq_live_init_lock(r->fd, F_WRLCK) != 0)
        return;   /* someone else is initialising or auditing */
    uint32_t expect = FMQ_INIT_READY;
    /* [S-audit] seq_cst: our AUDITING store and then our check of who is
     * alive, against an opener's registration and then its re-check of READY
     * (fmq_region_open): store-then-load on two places, so either the opener
     * sees AUDITING and waits, or we see the opener and do not audit. */
    if (!atomic_compare_exchange_strong_explicit(&r->hdr->init_state, &expect,
                                                 FMQ_INIT_AUDITING, memory_order_seq_cst,
                                                 memory_order_seq_cst)) {
        fmq_live_init_lock(r->fd, F_UNLCK);
        return;
    }
    fmq_ring_compact_finish(r);   /* one a killed process began */
    fmq_recover(r);
    int alone = 1;
    for (uint32_t idx = 0; idx < r->g.nparticipants && alone; idx++) {
        uint64_t id = atomic_load_explicit(&r->parts[idx].ident,
                                           memory_order_acquire);   /* [A-ident] */
        if (idx != r->me && FMQ_PART_STATE(id) == FMQ_PART_ACTIVE && fmq_live_is_alive(r, idx))
            alone = 0;
    }
    uint64_t reclaimed = alone ? fmq_pool_audit(r) : 0;
    if (reclaimed)   /* relaxed: a counter */
        atomic_fetch_add_explicit(&r->ctl->retired[FMQ_ST_RECLAIMED], reclaimed,
                                  memory_order_relaxed);
    if (alone) {
        /* Nobody else can touch the ring: an empty one gives its pages back;
         * the last handle to close also gives back every warm block. */
        if (!r->durable)   /* a durable file's ring is rebuilt by its first opener */
            fmq_ring_compact(r);
        if (closing)
            fmq_pool_cool_all(r);
    }
    /* [R-init], as fmq_region_create's: the audit's repairs are visible to
     * an opener whose [A-init] load sees READY again. */
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
