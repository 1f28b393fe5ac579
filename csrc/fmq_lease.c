/*
 * fmq_lease.c -- at-least-once delivery: the in-flight table.
 *
 * Algorithm. get_message() claims a slot as get() does (fmq_ring_claim), then
 * moves the message into a FREE entry of the in-flight table:
 *   entry FREE -> FILLING(me)          claim the entry (token + 1)
 *   copy len/block/inline payload, deadline = now + lease
 *   block IN_RING -> reader(me)        the block share follows the message
 *   entry FILLING(me) -> LEASED(me)
 *   slot READING(me) -> EMPTY(next)    the ring slot is free for producers
 * ack:  LEASED(me) -> FREE, then our reader share of the block is dropped.
 * A message of an atomic batch (fmq_layout.h) is leased with a copy of its
 * own in the entry (inline or a new block: fmq_lease_take_batch), because
 * the batch's block stays the ring's until its last message is taken; from
 * LEASED on such an entry is like any other. src_index names the message in
 * its batch, so crash recovery can tell whether the dead taker moved the
 * batch's cursor past it.
 * Redelivery (lease expired, holder dead, nack): whoever notices takes the
 * entry LEASED -> REQUEUING(me), turns the block share back into IN_RING,
 * copies the payload into a NEW message at the back of the ring (its own
 * block) with delivery count kept, and only then frees the entry and its old
 * block. Re-enqueue before free: a crash in between gives a duplicate, never a
 * loss (and never two messages sharing one block). Past max_deliveries the
 * message is dead-lettered instead: dropped and counted, or parked (DEAD) for
 * the Python layer to forward to the dead-letter queue.
 *
 * Zero-copy pins. The holder may view a block payload in place
 * (fmq_lease_pin). Whoever ends such a lease -- ack, expiry, nack,
 * dead-lettering -- hands the holder's reader share over to the holder
 * (pin PINNED -> HANDED) instead of freeing the block, and the holder frees
 * it when its last view goes (fmq_lease_unpin). A requeue first adds the
 * queue's IN_RING share next to the holder's, so the block survives the
 * holder's death while the payload is copied into the new message.
 *
 * Deadlines are CLOCK_MONOTONIC, which is one clock for all processes of a
 * host. ctl->next_due holds (a lower bound of) the earliest deadline so the
 * common check is one load; a liveness sweep (holders whose kernel lock is
 * gone, or who closed their handle) runs at most once a second.
 *
 * Races. ack vs expiry: both are CASes on the entry word from LEASED(holder);
 * exactly one wins, so a message is either acked or redelivered, never both.
 * touch vs expiry: touch moves the deadline with a CAS from the value it
 * checked and re-checks the word afterwards, and the redeliverer re-checks
 * the deadline after taking the entry; a stale touch of a reused entry
 * finds another deadline (or word) and fails instead of extending a new
 * holder's lease.
 *
 * Memory order. Every change of an entry word is at least a release and
 * every load of it at least an acquire, so whoever reads a state sees what
 * the process that set it wrote before (its fields, its block-share moves).
 * The pairs the algorithm relies on, as tagged at each use:
 *   [R-lease]  a store/CAS to LEASED (take, give-back, park, adopt, reap)
 *              -> [A-mine] the acquire load of the word by the holder, an
 *              ender, the scans and the reaper: len, block, payload, pin and
 *              deadline written while the entry was FILLING/REQUEUING(me)
 *              (plain or relaxed stores: nobody else acts on it then) are
 *              visible to them.
 *   [R-park]   a store/CAS to DEAD, TAKING or ACKING (parking a dead letter,
 *              taking one, settling) -> [A-mine] likewise.
 *   [R-free]   a store/CAS to FREE -> [A-take] the taker's acquire load and
 *              acq_rel CAS from FREE: the previous use's reads and share moves
 *              are done before the entry is filled again.
 *   [R-holder] the release store of e->holder -> [A-holder] its acquire
 *              loads: a holder of 0 is only seen after the block-share moves
 *              that made it 0, so a successor (a requeuer after a dead one)
 *              does not move the share again.
 *   [A-dl]     acquire loads of the deadline pair with its writers: the
 *              [R-lease] that published the take's deadline and [S-touch].
 *   [A-ident]  acquire loads of a participant's ident pair with its release
 *              stores in fmq_live.c (register, unregister) and fmq_recover.c
 *              (a reaped entry freed).
 *   [S-end]    every CAS that ends a lease (ack, nack, redelivery, adopt, ack
 *              of a dead letter, reap) and the pin CASes / re-read of the word
 *              in fmq_lease_pin/unpin are seq_cst: a store-then-load pattern
 *              on two words (word, pin), which only a single total order makes
 *              safe: either the pinner sees the lease ended, or the ender sees
 *              the pin and hands the share over.
 *   [S-touch]  touch's deadline CAS then its re-load of the word, against a
 *              redeliverer's word CAS then its re-load of the deadline: all
 *              seq_cst (store-then-load on two words again): either touch sees
 *              the word changed and fails, or the redeliverer sees the new
 *              deadline and gives the entry back.
 *   relaxed    hints (next_due, last_scan, lease_hint), counters, values only
 *              reported (pending), and the fields of an entry we own, which a
 *              later release of its word publishes. A CAS's failure order is
 *              relaxed where the failed value is only compared, never used to
 *              read a field.
 *
 * Every field of an entry is read once into a local (FMQ_ONCE), checked,
 * and only the local is used: another process may scribble the entry
 * between two reads, and a length checked in one load and used from another
 * is a wild copy.
 *
 * Departure. A handle that closes hands its leases back at once
 * (fmq_lease_release_owned: requeued, delivery count kept) and parks again
 * the dead letters it took but did not forward; the once-a-second sweep does
 * the same for a handle that went without closing the table (its
 * participant entry is free or reused) -- a crashed one is left to crash
 * recovery.
 *
 * Damage. An entry whose length does not fit its block (or slot), or whose
 * block reference is invalid, is never copied or delivered: whoever finds it
 * while owning the entry frees it and counts it as abandoned
 * (fmq_lease_discard_corrupt), dropping its block share only when nothing
 * else names that block. A state word alone proves little (one bit makes a
 * FREE entry LEASED, with the len and block of its last use), so before an
 * entry's message is redelivered or forwarded, the facts written
 * with its word are cross-checked (fmq_lease_plausible: token, pin token,
 * an orphan's deadline, the block's share); an entry that fails is freed
 * without moving any share. A damaged pin is read as "pinned" unless it says
 * NONE under the entry's token, and a holder drops a share only when the
 * pin says it was handed over (fmq_lease_hand_pin, fmq_lease_unpin): a block
 * is leaked rather than freed under live views.
 *
 * Failure model: see fmq_lease_reap (called by crash recovery for a dead
 * tag). A dead holder's handed-over shares are cleared by the block pass of
 * crash recovery like any reader share. A dead letter's ack killed after
 * its ACKING claim leaks that one block (the reaper frees the entry; the
 * IN_RING share stays) rather than forwarding the letter again from a block
 * already freed. A requeue settles its entry the same way once the copy is
 * committed (fmq_lease_settle): ACKING before the share is dropped, so no
 * entry ever names a block it may no longer hold while recovery could still
 * act on it. A redeliverer never requeues a lease whose take has not freed
 * its ring slot yet (fmq_lease_take_unfinished). model/fastmq.pml checks
 * these rules (its README lists the counterexamples that led to them).
 */
#include <stdlib.h>
#include <string.h>

#include "fmq_internal.h"
#include "fmq_wait.h"

#define FMQ_SWEEP_NS 1000000000ull

static inline fmq_lease *fmq_lease_at(const fmq_region *r, uint32_t i) {
    return (fmq_lease *)(r->leases + (uint64_t)i * r->g.lease_stride);
}

static inline unsigned char *fmq_lease_inline(fmq_lease *e) {
    return (unsigned char *)e + FMQ_LEASE_HEADER;
}

/* The payload of an entry, from one load of len and block: inline (len must
 * fit a slot) or in a valid block (len must fit that block's class). NULL:
 * the entry is corrupted. */
static const unsigned char *fmq_lease_src(fmq_region *r, fmq_lease *e, uint32_t *len_out,
                                          uint32_t *block_out) {
    uint32_t len = FMQ_ONCE(e->len), block = FMQ_ONCE(e->block);
    const unsigned char *p;
    if (block == FMQ_NO_BLOCK) {
        if (len > r->inline_max)
            return NULL;
        p = fmq_lease_inline(e);
    } else {
        p = fmq_pool_ptr(r, block);
        if (!p || len > fmq_pool_block_size(r, block))
            return NULL;
    }
    *len_out = len;
    *block_out = block;
    return p;
}

/* The token of an entry's next use. Never 0: an entry that was never used is
 * all zero (token 0, len 0, block 0), so a damaged word that makes it look
 * leased is told apart by its token alone (fmq_lease_plausible). */
static inline uint32_t fmq_next_token(uint32_t tok) { return tok + 1 ? tok + 1 : 1; }

/* Do an entry's words tell one story? Asked of an entry we just claimed
 * (REQUEUING/TAKING by us; was: its word before our claim) before its
 * message is redelivered or forwarded, i.e. before its len, block and holder
 * are trusted to name the message's bytes. A damaged word (one flipped bit
 * makes a FREE entry LEASED) would otherwise redeliver whatever its last use
 * left: a block since given to another message, whose share the requeue
 * then drops. Cheap cross-checks of facts that are written together:
 *   - the token is not 0 (fmq_next_token);
 *   - the pin carries the entry's token (every take, redelivery, reap, park
 *     and rebuild sets both, and a pin CAS keeps it);
 *   - an orphaned lease (LEASED, owner 0) is due: whoever orphans or parks
 *     an entry sets its deadline to 0 first, while a FREE entry keeps the
 *     deadline of its last use;
 *   - the block holds the share the entry claims: its holder's reader
 *     share, or the queue's IN_RING one (holder 0, or a requeuer that died
 *     half-way through fmq_lease_share_to_ring).
 * block: the entry's block, read once by the caller. */
static int fmq_lease_plausible(fmq_region *r, fmq_lease *e, uint64_t was, uint32_t block) {
    uint32_t tok = FMQ_LTOKEN(was);
    if (tok == 0)
        return 0;
    /* relaxed: the entry is ours; its [R-lease]/[R-park] store, which our
     * acquire of the word saw, published pin, deadline and holder */
    if (FMQ_PIN_TOKEN(atomic_load_explicit(&e->pin, memory_order_relaxed)) != tok)
        return 0;
    if (FMQ_LSTATE(was) == FMQ_LS_LEASED && FMQ_LOWNER(was) == 0 &&
        atomic_load_explicit(&e->deadline_ns, memory_order_relaxed) != 0)
        return 0;
    if (block == FMQ_NO_BLOCK)
        return 1;
    if (!fmq_pool_ptr(r, block))
        return 0;
    /* relaxed: only compared; what is then read of the block is ordered by
     * the entry's word, and every share is moved by fmq_pool_transition */
    uint64_t st = atomic_load_explicit(
        &fmq_pool_meta(r, FMQ_BLOCK_CLASS(block))[FMQ_BLOCK_INDEX(block)].state,
        memory_order_relaxed);
    uint32_t holder = atomic_load_explicit(&e->holder, memory_order_acquire);   /* [A-holder] */
    return (st & FMQ_BLK_IN_RING) || (holder && FMQ_BLK_READER(st) == holder);
}

/* Only entries whose pages are reserved exist (fmq_pool.c): the table grows
 * when a take finds none free. */
uint32_t fmq_lease_count(const fmq_region *r) { return (uint32_t)fmq_lease_committed(r); }

/* next_due is a hint, a lower bound of the earliest deadline: relaxed, since
 * a stale value only makes a scan early or lets the once-a-second sweep find
 * the entry; the scan reads each entry's own word (acquire) and deadline. */
static void fmq_lower_next_due(fmq_region *r, uint64_t due) {
    uint64_t cur = atomic_load_explicit(&r->ctl->next_due.v, memory_order_relaxed);
    while ((cur == 0 || due < cur) &&
           !atomic_compare_exchange_weak_explicit(&r->ctl->next_due.v, &cur, due,
                                                  memory_order_relaxed, memory_order_relaxed))
        ;
}

/* A pinned holder's share stays with the holder (see FMQ_PIN_* in
 * fmq_layout.h): PINNED -> HANDED. Returns 1 if the share is now (or was
 * already) the holder's own rather than the entry's. */
/* model: lease.hand_pin */
static int fmq_lease_hand_pin(fmq_lease *e, uint32_t tok) {
    uint64_t p = FMQ_PIN(tok, FMQ_PIN_PINNED);
    /* Only NONE under the entry's token says "no views": the share is then
     * the entry's to drop. HANDED: done already (by a predecessor that died
     * half-way). Anything else -- PINNED, or a damaged pin that names no
     * state or another token -- may hide live views, so the share is handed
     * over rather than freed under them (a leaked block if there are none). */
    while (!atomic_compare_exchange_strong_explicit(&e->pin, &p, FMQ_PIN(tok, FMQ_PIN_HANDED),
                                                    memory_order_seq_cst,      /* [S-end] */
                                                    memory_order_seq_cst)) {
        if (p == FMQ_PIN(tok, FMQ_PIN_NONE))
            return 0;
        if (p == FMQ_PIN(tok, FMQ_PIN_HANDED))
            return 1;
    }
    return 1;
}

/* The entry's block share becomes IN_RING (holder 0); tolerant of having been
 * done already, wholly or in part, by a predecessor that died half-way. The
 * queue takes its IN_RING share BEFORE the holder's reader share is let go or
 * handed over, so the block outlives the holder's death while we copy it.
 * block: the entry's block, read once by the caller. */
/* model: lease.share_to_ring */
static void fmq_lease_share_to_ring(fmq_region *r, fmq_lease *e, uint32_t tok, uint32_t block) {
    uint32_t holder = atomic_load_explicit(&e->holder, memory_order_acquire);   /* [A-holder] */
    if (holder && block != FMQ_NO_BLOCK) {
        uint64_t h = FMQ_BLK_AS_READER(holder);
        const uint64_t mask = FMQ_BLK_IN_RING | FMQ_READER_MASK;
        fmq_pool_transition(r, block, mask, h, h | FMQ_BLK_IN_RING);
        FMQ_CRASHPOINT("lease.share.co_owned");
        if (!fmq_lease_hand_pin(e, tok))
            fmq_pool_transition(r, block, mask, h | FMQ_BLK_IN_RING, FMQ_BLK_IN_RING);
    }
    atomic_store_explicit(&e->holder, 0, memory_order_release);   /* [R-holder] */
}

/* Drop the entry's block share (the message is gone or has a new copy). A
 * live holder's handed-over share stays: the block is freed when it goes. */
/* model: lease.drop_share */
static void fmq_lease_drop_share(fmq_region *r, fmq_lease *e, uint32_t tok, uint32_t block) {
    if (block == FMQ_NO_BLOCK)
        return;
    uint32_t holder = atomic_load_explicit(&e->holder, memory_order_acquire);   /* [A-holder] */
    if (holder) {
        if (!fmq_lease_hand_pin(e, tok))
            fmq_pool_transition(r, block, FMQ_READER_MASK, FMQ_BLK_AS_READER(holder), 0);
        atomic_store_explicit(&e->holder, 0, memory_order_release);   /* [R-holder] */
    } else {
        fmq_pool_transition(r, block, FMQ_BLK_IN_RING, FMQ_BLK_IN_RING, 0);
    }
}

/* A corrupted entry we own (REQUEUING/TAKING by us): its length or block
 * fails validation, so its message cannot be delivered sanely. The entry is
 * freed and the message counted as abandoned; its block share is dropped only
 * when the reference is valid and nothing else names that block (a scribbled
 * reference must never free another message's block: a leak is the safe
 * side). trust_block 0: the entry's words contradict each other
 * (fmq_lease_plausible), so its block and holder are not evidence of any
 * share at all, and no share is moved. */
static void fmq_lease_discard_corrupt(fmq_region *r, fmq_lease *e, uint32_t tok,
                                      int trust_block) {
    uint32_t block = FMQ_ONCE(e->block);
    if (block != FMQ_NO_BLOCK && (!trust_block || fmq_pool_ptr(r, block))) {
        e->block = FMQ_NO_BLOCK;   /* not "another" reference in the scan */
        int shared = !trust_block || fmq_block_referenced(r, block, ~0ull);
        if (!shared) {
            fmq_lease_share_to_ring(r, e, tok, block);
            fmq_lease_drop_share(r, e, tok, block);
        }
    }
    /* relaxed: the entry is ours (REQUEUING/TAKING); [R-free] below publishes it */
    atomic_store_explicit(&e->holder, 0, memory_order_relaxed);
    atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_FREE, 0),
                          memory_order_release);                         /* [R-free] */
    fmq_count(r, FMQ_ST_ABANDONED, 1);
}

/* The payload of an entry we just claimed (see fmq_lease_src), or NULL when
 * it cannot be delivered sanely: then the entry has been discarded (freed,
 * counted as abandoned). was: the entry's word before our claim. */
static const unsigned char *fmq_lease_src_claimed(fmq_region *r, fmq_lease *e, uint64_t was,
                                                  uint32_t *len_out, uint32_t *block_out) {
    const unsigned char *p = fmq_lease_src(r, e, len_out, block_out);
    if (!p)
        fmq_lease_discard_corrupt(r, e, FMQ_LTOKEN(was), 1);
    else if (!fmq_lease_plausible(r, e, was, *block_out))
        fmq_lease_discard_corrupt(r, e, FMQ_LTOKEN(was), 0), p = NULL;
    return p;
}

/* ======================================================================== */
/* taking                                                                   */
/* ======================================================================== */

/* Claims a FREE entry for a take (fmq_lease_take, fmq_lease_take_batch):
 * FREE -> FILLING(me) under the entry's next token, holding no block share
 * (holder 0) and no pin yet; *e_out, *index_out and *token_out name it. The
 * scan starts at the hint; when no entry is free the table grows
 * (fmq_lease_grow) and the scan runs again. FMQ_FULL: none is free and the
 * table cannot grow. Inlined: it is the lease hot path (and a status rather
 * than a NULL entry lets the compiler drop the caller's test). */
static inline __attribute__((always_inline)) int
fmq_lease_claim_free(fmq_region *r, fmq_lease **e_out, uint32_t *index_out,
                     uint32_t *token_out) {
    for (;;) {
        uint32_t n = fmq_lease_count(r);
        uint32_t start = (uint32_t)(atomic_load_explicit(&r->ctl->lease_hint.v,
                                                         memory_order_relaxed) % n);   /* hint */
        for (uint32_t k = 0; k < n; k++) {
            uint32_t i = (start + k) % n;
            fmq_lease *e = fmq_lease_at(r, i);
            uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);   /* [A-take] */
            if (FMQ_LSTATE(w) != FMQ_LS_FREE)
                continue;
            uint32_t tok = fmq_next_token(FMQ_LTOKEN(w));
            if (!atomic_compare_exchange_strong_explicit(
                    &e->word, &w, FMQ_LWORD(tok, FMQ_LS_FILLING, r->owner_tag),
                    memory_order_acq_rel, memory_order_relaxed))                /* [A-take] */
                continue;
            /* Relaxed, as every field store until LEASED: the entry is
             * FILLING(me), nobody else acts on it, and [R-lease] (in
             * fmq_lease_publish_take) publishes them all. */
            atomic_store_explicit(&e->holder, 0, memory_order_relaxed);  /* no share yet */
            atomic_store_explicit(&e->pin, FMQ_PIN(tok, FMQ_PIN_NONE), memory_order_relaxed);
            /* relaxed: a hint of where to look first */
            atomic_store_explicit(&r->ctl->lease_hint.v, i + 1, memory_order_relaxed);
            *e_out = e;
            *index_out = i;
            *token_out = tok;
            return FMQ_OK;
        }
        if (fmq_lease_grow(r, n) != FMQ_OK)
            return FMQ_FULL;
        /* more entries now exist */
    }
}

/* The end of a take's FILLING: the entry (FILLING(me) under tok) holds its
 * message and share; its deadline is set, the entry becomes LEASED(me), and
 * on a durable queue (sync "commit"/"interval") it reaches the disk before
 * the caller lets go of the ring's copy (frees the slot, or moves a batch's
 * cursor past the message), so a power loss cannot keep that and lose the
 * entry. filled, leased: the caller's crash points, passed at the FILLING
 * and LEASED stages. Inlined: it is the lease hot path. */
static inline __attribute__((always_inline)) void
fmq_lease_publish_take(fmq_region *r, fmq_lease *e, uint32_t tok, uint64_t now,
                       uint64_t lease_ns, const char *filled, const char *leased) {
    atomic_store_explicit(&e->deadline_ns, now + lease_ns, memory_order_relaxed); /* FILLING */
    FMQ_CRASHPOINT(filled);
    atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_LEASED, r->owner_tag),
                          memory_order_release);                        /* [R-lease] */
    fmq_lower_next_due(r, now + lease_ns);
    FMQ_CRASHPOINT(leased);
    if (r->up->durable_barrier) {   /* a failed flush: as sync="none" */
        (void)r->up->durable_barrier(r);
        /* The lease runs from now, not from before the flush. No
         * redeliverer has touched the entry meanwhile: the ring's copy is
         * still ours (the slot READING by us: fmq_lease_take_unfinished). */
        atomic_store_explicit(&e->deadline_ns, fmq_now_ns() + lease_ns,
                              memory_order_relaxed);
    }
}

/* model: lease.take */
int fmq_lease_take(fmq_region *r, fmq_msg *m, uint64_t lease_ns, uint32_t *slot_out,
                   uint32_t *token_out, uint32_t *deliveries_out) {
    fmq_lease *e;
    uint32_t i, tok;
    if (fmq_lease_claim_free(r, &e, &i, &tok) == FMQ_OK) {
        uint64_t now = fmq_now_ns();
        /* m was validated by fmq_ring_claim and lives in our memory. */
        e->src_ticket = m->ticket;
        e->src_index = 0;   /* a plain message (entries are reused) */
        e->leased_ns = now;
        e->len = m->len;
        e->block = m->block;
        e->deliveries = m->deliveries + 1;
        e->crc = m->crc;   /* a durable queue's recovery checks the entry with it */
        if (m->block == FMQ_NO_BLOCK) {
            memcpy(fmq_lease_inline(e), m->data, m->len);
            atomic_store_explicit(&e->holder, 0, memory_order_relaxed);   /* FILLING */
        } else {
            int rc = fmq_pool_transition(r, m->block, FMQ_BLK_IN_RING | FMQ_READER_MASK,
                                         FMQ_BLK_IN_RING, FMQ_BLK_AS_READER(r->owner_tag));
            if (rc != FMQ_OK || !fmq_block_holds_ticket(r, m->block, m->ticket)) {
                atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_FREE, 0),
                                      memory_order_release);                 /* [R-free] */
                /* The block is not the queue's, or holds another slot's
                 * message (fmq_block_holds_ticket): a damaged slot, consumed. */
                if (rc == FMQ_OK)
                    return fmq_ring_drop_foreign(r, m);
                return rc == FMQ_ELOST ? fmq_ring_drop_damaged(r, m) : rc;
            }
            atomic_store_explicit(&e->holder, r->owner_tag, memory_order_relaxed);   /* FILLING */
        }
        /* A durable queue: the entry reaches the disk before the slot is freed. */
        fmq_lease_publish_take(r, e, tok, now, lease_ns, "lease.take.filled",
                               "lease.take.leased");
        int rc = fmq_ring_free_moved(r, m);
        if (rc != FMQ_OK)
            return rc;
        *slot_out = i;
        *token_out = tok;
        *deliveries_out = m->deliveries + 1;
        return FMQ_OK;
    }
    return FMQ_FULL;
}

/* The message at the cursor of a claimed atomic batch, leased on its own.
 * The entry gets a private copy of that one message -- inline, or a block of
 * its own -- because the batch's block stays the ring's until the batch's
 * last message is taken; so each leased message of a batch is acked, nacked
 * and redelivered exactly like a plain one. Steps, each crash-safe:
 *   entry FREE -> FILLING(me), src_index = 1 + index (the batch message)
 *   [block] alloc (writer me), copy, writer(me) -> reader(me), holder = me
 *   entry FILLING(me) -> LEASED(me)
 *   cursor past it + slot READING(me) -> READY   (or, last: free the slot)
 * Killed while FILLING: the reaper frees the entry (a copy block's reader
 * share is the block pass's: never turned into a ring share, since no slot
 * names that block) and the slot pass puts the batch back, cursor unchanged.
 * Killed after LEASED, before the cursor moved: the reaper orphans the entry
 * (redelivered from its copy) and moves the cursor past the message itself
 * (fmq_reap_batch_taken), so the slot does not deliver it a second time. */
/* model: lease.take_batch */
int fmq_lease_take_batch(fmq_region *r, fmq_msg *m, uint64_t lease_ns, uint32_t *slot_out,
                         uint32_t *token_out, uint32_t *deliveries_out) {
    const unsigned char *src;
    uint32_t len, count;
    uint64_t next;
    int rc = fmq_ring_batch_frame(r, m, m->cursor, &src, &len, &count, &next);
    if (rc != FMQ_OK)
        return fmq_ring_discard_claimed(r, m);
    uint32_t copy = FMQ_NO_BLOCK;
    if (len > r->inline_max) {
        rc = fmq_pool_alloc(r, len, &copy);
        if (rc != FMQ_OK)
            return rc;   /* FMQ_NOSPACE: the caller unclaims and waits */
    }
    fmq_lease *e;
    uint32_t i, tok;
    if (fmq_lease_claim_free(r, &e, &i, &tok) == FMQ_OK) {
        uint64_t now = fmq_now_ns();
        e->src_ticket = m->ticket;
        e->src_index = FMQ_CURSOR_IDX(m->cursor) + 1;
        e->leased_ns = now;
        e->len = len;
        e->block = copy;
        e->deliveries = m->deliveries + 1;
        /* The entry holds a record of its own (one message of the batch): a
         * durable queue's recovery checks it with its own checksum. */
        e->crc = r->durable ? fmq_record_crc(len, src) : 0;
        if (copy == FMQ_NO_BLOCK) {
            memcpy(fmq_lease_inline(e), src, len);
        } else {
            memcpy(fmq_pool_ptr(r, copy), src, len);
            rc = fmq_pool_transition(r, copy, FMQ_WRITER_MASK | FMQ_READER_MASK | FMQ_BLK_IN_RING,
                                     r->owner_tag, (uint64_t)r->owner_tag << 24);
            if (rc != FMQ_OK) {   /* our own fresh block: only a scribbler gets here */
                atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_FREE, 0),
                                      memory_order_release);                 /* [R-free] */
                return rc;
            }
            atomic_store_explicit(&e->holder, r->owner_tag, memory_order_relaxed);
        }
        /* As for a plain take: a durable queue's entry reaches the disk before
         * the cursor moves past its message. */
        fmq_lease_publish_take(r, e, tok, now, lease_ns, "lease.batch.filled",
                               "lease.batch.leased");
        if (FMQ_CURSOR_IDX(next) == count)
            rc = fmq_ring_batch_release(r, m, 1);   /* the last one: slot and block go */
        else
            rc = fmq_ring_batch_advance(r, m, next, 1);
        if (rc != FMQ_OK)
            return rc;
        *slot_out = i;
        *token_out = tok;
        *deliveries_out = m->deliveries + 1;
        return FMQ_OK;
    }
    if (copy != FMQ_NO_BLOCK)
        fmq_pool_release_writer(r, copy);
    return FMQ_FULL;
}

static fmq_lease *fmq_lease_mine(fmq_region *r, uint32_t slot, uint32_t token, uint32_t state,
                                 uint64_t *w_out) {
    if (slot >= fmq_lease_count(r))
        return NULL;
    fmq_lease *e = fmq_lease_at(r, slot);
    uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);    /* [A-mine] */
    if (w != FMQ_LWORD(token, state, r->owner_tag))
        return NULL;
    *w_out = w;
    return e;
}

int fmq_lease_payload(fmq_region *r, uint32_t slot, uint32_t token, const unsigned char **data,
                      uint32_t *len) {
    uint64_t w;
    fmq_lease *e = fmq_lease_mine(r, slot, token, FMQ_LS_LEASED, &w);
    if (!e)
        e = fmq_lease_mine(r, slot, token, FMQ_LS_TAKING, &w);
    if (!e)
        return fmq_fail(FMQ_ELOST, "lease lost");
    uint32_t n, b;
    const unsigned char *p = fmq_lease_src(r, e, &n, &b);   /* one load of each field */
    if (!p)
        return fmq_fail(FMQ_ECORRUPT, "in-flight entry %u has an invalid length or block",
                        slot);
    *data = p;
    *len = n;
    return FMQ_OK;
}

/* Pin a held block payload for zero-copy views (see FMQ_PIN_* in
 * fmq_layout.h). FMQ_AGAIN: nothing to pin (an inline payload, or a block
 * whose share the entry holds as IN_RING): copy it with fmq_lease_payload.
 * The pin CAS and the re-read of the entry word are seq_cst, as are the
 * ender's CAS of the word and its hand-over CAS of the pin [S-end]: either
 * we see the lease ended (and back out), or the ender sees our pin (and
 * hands over). */
/* model: lease.pin */
int fmq_lease_pin(fmq_region *r, uint32_t slot, uint32_t token, const unsigned char **data,
                  uint32_t *len, uint32_t *block) {
    uint64_t w;
    fmq_lease *e = fmq_lease_mine(r, slot, token, FMQ_LS_LEASED, &w);
    if (!e)
        return fmq_fail(FMQ_ELOST, "lease lost");
    uint32_t b, n;
    const unsigned char *p = fmq_lease_src(r, e, &n, &b);
    if (!p)
        return fmq_fail(FMQ_ECORRUPT, "in-flight entry %u has an invalid length or block",
                        slot);
    if (b == FMQ_NO_BLOCK || atomic_load_explicit(&e->holder, memory_order_acquire) !=
                                 r->owner_tag)                           /* [A-holder] */
        return FMQ_AGAIN;
    uint64_t pin = FMQ_PIN(token, FMQ_PIN_NONE);
    if (!atomic_compare_exchange_strong_explicit(&e->pin, &pin, FMQ_PIN(token, FMQ_PIN_PINNED),
                                                 memory_order_seq_cst,       /* [S-end] */
                                                 memory_order_seq_cst)) {
        /* The pin belongs to another use of the entry: our lease expired and
         * the entry was re-leased (new token) in between. That is a lost
         * lease, not a double pin. */
        if (FMQ_PIN_TOKEN(pin) != token ||
            atomic_load_explicit(&e->word, memory_order_seq_cst) != w)   /* [S-end] */
            return fmq_fail(FMQ_ELOST, "lease lost");
        return fmq_fail(FMQ_ESTATE, "in-flight entry %u is already pinned", slot);
    }
    if (atomic_load_explicit(&e->word, memory_order_seq_cst) != w) {   /* [S-end] */
        fmq_lease_unpin(r, slot, token, b);   /* ended meanwhile: back out */
        return fmq_fail(FMQ_ELOST, "lease lost");
    }
    *data = p;
    *len = n;
    *block = b;
    return FMQ_OK;
}

/* The holder's last view of a pinned payload is gone. */
/* model: lease.unpin */
int fmq_lease_unpin(fmq_region *r, uint32_t slot, uint32_t token, uint32_t block) {
    if (slot >= fmq_lease_count(r))
        return fmq_fail(FMQ_EINVAL, "no in-flight entry %u", slot);
    fmq_lease *e = fmq_lease_at(r, slot);
    uint64_t pin = FMQ_PIN(token, FMQ_PIN_PINNED);
    /* [S-end]: the holder's side of the pin hand-over (see fmq_lease_pin). */
    if (atomic_compare_exchange_strong_explicit(&e->pin, &pin, FMQ_PIN(token, FMQ_PIN_NONE),
                                                memory_order_seq_cst, memory_order_seq_cst))
        return FMQ_OK;                /* still the entry's share */
    /* Only the lease's ender moves a pin off PINNED: to HANDED, and a reused
     * entry went through that first, so then the share is ours to drop. A
     * pin still under our token in any other state was damaged, and the
     * ender dropped our share itself (it saw no views): the block may be
     * another message's by now -- even ours again, through another lease --
     * so nothing is dropped (a leak if the damage came after the hand-over).
     * Another token cannot tell a reuse after a hand-over from a reuse after
     * such a drop; then an entry that names the block (any but FREE: in a
     * real hand-over none can, the block being ours alone) says the share
     * is that entry's. */
    if (FMQ_PIN_TOKEN(pin) == token ? pin != FMQ_PIN(token, FMQ_PIN_HANDED)
                                    : fmq_lease_names_block(r, block))
        return FMQ_OK;
    return fmq_pool_release_reader(r, block);
}

/* ======================================================================== */
/* ack / touch                                                              */
/* ======================================================================== */

/* model: lease.ack */
int fmq_lease_ack(fmq_region *r, uint32_t slot, uint32_t token) {
    uint64_t w;
    fmq_lease *e = fmq_lease_mine(r, slot, token, FMQ_LS_LEASED, &w);
    if (!e)
        return fmq_fail(FMQ_ELOST, "the lease was lost (expired and redelivered, or "
                                   "reclaimed)");
    if (fmq_now_ns() > atomic_load_explicit(&e->deadline_ns, memory_order_acquire))   /* [A-dl] */
        return fmq_fail(FMQ_ELOST, "the lease expired; the message will be redelivered");
    if (!atomic_compare_exchange_strong_explicit(&e->word, &w,
                                                 FMQ_LWORD(token, FMQ_LS_ACKING, r->owner_tag),
                                                 memory_order_seq_cst,      /* [S-end] */
                                                 memory_order_relaxed))
        return fmq_fail(FMQ_ELOST, "the lease was lost to a concurrent redelivery");
    /* ACKING(me) while we drop the share: a crash here is finished by the
     * reaper (entry freed; our reader share cleared by the block pass). */
    FMQ_CRASHPOINT("lease.ack.claimed");
    fmq_lease_drop_share(r, e, token, FMQ_ONCE(e->block));
    atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_FREE, 0),
                          memory_order_release);                           /* [R-free] */
    fmq_wake_space(r);   /* lease takers wait on the space line too */
    return FMQ_OK;
}

/* model: lease.touch */
int fmq_lease_touch(fmq_region *r, uint32_t slot, uint32_t token, uint64_t lease_ns) {
    uint64_t w;
    fmq_lease *e = fmq_lease_mine(r, slot, token, FMQ_LS_LEASED, &w);
    if (!e)
        return fmq_fail(FMQ_ELOST, "the lease expired or was lost");
    uint64_t now = fmq_now_ns();
    uint64_t dl = atomic_load_explicit(&e->deadline_ns, memory_order_acquire);   /* [A-dl] */
    if (now > dl)
        return fmq_fail(FMQ_ELOST, "the lease expired or was lost");
    /* From the deadline we checked, not a blind store: if the entry was
     * redelivered and re-leased since our load of the word, its deadline is
     * another one and the CAS fails, so we never extend a new holder's lease.
     * The re-check of the word below catches an end that kept the deadline. */
    if (!atomic_compare_exchange_strong_explicit(&e->deadline_ns, &dl, now + lease_ns,
                                                 memory_order_seq_cst,        /* [S-touch] */
                                                 memory_order_relaxed))
        return fmq_fail(FMQ_ELOST, "the lease was lost to a concurrent redelivery");
    if (atomic_load_explicit(&e->word, memory_order_seq_cst) != w)   /* [S-touch] */
        return fmq_fail(FMQ_ELOST, "the lease was lost to a concurrent redelivery");
    return FMQ_OK;
}

/* ======================================================================== */
/* redelivery                                                               */
/* ======================================================================== */

/* The entry's message is done with (its copy is committed, or it is dropped
 * as a dead letter): ACKING(me) first, then its block share goes, then FREE.
 * ACKING is what tells crash recovery that the entry's share may already be
 * gone: a requeuer killed after the drop but still REQUEUING would have its
 * entry orphaned and requeued again from a block that was freed and perhaps
 * reused (a duplicate with foreign bytes, and a second drop of a share that
 * is not its own). Killed between the ACKING store and the drop, it leaks
 * the block's queue share instead (recovery cannot tell it from a reused
 * block's). In the model this is the settle step of lease.requeue. */
static void fmq_lease_settle(fmq_region *r, fmq_lease *e, uint32_t token, uint32_t block) {
    atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_ACKING, r->owner_tag),
                          memory_order_release);   /* [R-park] */
    FMQ_CRASHPOINT("lease.requeue.settling");
    fmq_lease_drop_share(r, e, token, block);
    FMQ_CRASHPOINT("lease.requeue.dropped");
    atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_FREE, 0),
                          memory_order_release);                           /* [R-free] */
}

/* Entry is REQUEUING(me) (or we otherwise own it). Returns FMQ_OK when it was
 * requeued, dead-lettered or (corrupted) discarded, FMQ_FULL when there was
 * no room (the entry is then parked as an orphaned, due lease for a later
 * attempt). */
/* model: lease.requeue */
static int fmq_lease_requeue(fmq_region *r, fmq_lease *e, uint64_t was, int force_dead) {
    uint32_t token = FMQ_LTOKEN(was);
    uint32_t len, block;
    /* Read once. A length that does not fit its block (or slot), an invalid
     * block, or words that contradict each other: never copy neighbouring
     * memory, or another message's block, into a new message. */
    const unsigned char *src = fmq_lease_src_claimed(r, e, was, &len, &block);
    if (!src)
        return FMQ_OK;   /* discarded */
    fmq_lease_share_to_ring(r, e, token, block);
    uint32_t deliveries = FMQ_ONCE(e->deliveries);
    int dead = force_dead || (r->max_deliveries && deliveries >= r->max_deliveries);
    if (dead) {
        if (r->dead_letter[0]) {
            atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_DEAD, 0),
                                  memory_order_release);   /* [R-park] */
            return FMQ_OK;
        }
        fmq_lease_settle(r, e, token, block);
        fmq_count(r, FMQ_ST_DEAD_LETTERED, 1);
        return FMQ_OK;
    }
    uint32_t nb = FMQ_NO_BLOCK;
    int rc = FMQ_OK;
    if (len > r->inline_max) {
        rc = fmq_pool_alloc(r, len, &nb);
        if (rc == FMQ_OK)
            memcpy(fmq_pool_ptr(r, nb), src, len);
    }
    fmq_msg m;
    if (rc == FMQ_OK) {
        rc = fmq_ring_reserve(r, &m);
        if (rc != FMQ_OK && nb != FMQ_NO_BLOCK)
            fmq_pool_release_writer(r, nb);
    }
    if (rc != FMQ_OK) {
        /* No room now: park it as an orphaned lease that is due at once. */
        atomic_store_explicit(&e->deadline_ns, 0, memory_order_relaxed);   /* REQUEUING */
        atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_LEASED, 0),
                              memory_order_release);                       /* [R-lease] */
        fmq_lower_next_due(r, 1);
        return rc == FMQ_NOSPACE ? FMQ_FULL : rc;
    }
    if (nb == FMQ_NO_BLOCK)
        memcpy(fmq_ring_inline_ptr(r, &m), src, len);
    m.deliveries = deliveries;
    FMQ_CRASHPOINT("lease.requeue.before_commit");
    rc = fmq_ring_commit(r, &m, len, nb, 1, 0);
    if (rc != FMQ_OK)
        return rc;
    FMQ_CRASHPOINT("lease.requeue.committed");
    /* A durable queue (sync "commit"/"interval"): the new copy is on disk
     * before the entry is freed (after a failed flush a power loss may
     * leave a duplicate, never a loss). */
    if (r->up->durable_barrier)
        (void)r->up->durable_barrier(r);
    fmq_lease_settle(r, e, token, block);
    fmq_count(r, FMQ_ST_REDELIVERED, 1);
    return FMQ_OK;
}

/* model: lease.nack */
int fmq_lease_nack(fmq_region *r, uint32_t slot, uint32_t token, int requeue) {
    uint64_t w;
    fmq_lease *e = fmq_lease_mine(r, slot, token, FMQ_LS_LEASED, &w);
    if (!e || fmq_now_ns() > atomic_load_explicit(&e->deadline_ns,
                                                  memory_order_acquire))   /* [A-dl] */
        return fmq_fail(FMQ_ELOST, "the lease expired or was lost");
    if (!atomic_compare_exchange_strong_explicit(
            &e->word, &w, FMQ_LWORD(token, FMQ_LS_REQUEUING, r->owner_tag),
            memory_order_seq_cst, memory_order_relaxed))                   /* [S-end] */
        return fmq_fail(FMQ_ELOST, "the lease was lost to a concurrent redelivery");
    int rc = fmq_lease_requeue(r, e, w, !requeue);
    return rc == FMQ_FULL ? FMQ_OK : rc;   /* parked: redelivered when room frees */
}

int fmq_tag_is_dead(fmq_region *r, uint32_t tag) {
    uint32_t idx = FMQ_TAG_INDEX(tag), gen = FMQ_TAG_GEN(tag);
    if (tag == 0 || idx >= r->g.nparticipants)
        return 0;
    if (tag == r->owner_tag)
        return 0;
    uint64_t id = atomic_load_explicit(&r->parts[idx].ident, memory_order_acquire); /* [A-ident] */
    if (FMQ_PART_GEN(id) != gen)
        return 1;                                   /* entry reused: gone */
    if (FMQ_PART_STATE(id) != FMQ_PART_ACTIVE)
        return 1;                                   /* closed its handle */
    return !fmq_live_is_alive(r, idx);
}

/* The take that made this lease may not have finished: the holder frees the
 * ring slot the message came from only after its LEASED store
 * (fmq_lease_take), and it may be frozen or slow right there while its lease
 * runs out. Requeueing then would leave two copies if the holder died next:
 * ours, and the slot's, which crash recovery puts back because the entry no
 * longer names the holder (and whose block our requeue has freed). So while
 * that slot is still READING by the holder at the message's lap, the entry
 * is given back and tried again later. The slot never returns to that word
 * once freed, so one load after taking the entry decides it.
 * In the model this is the give-back step of lease.redeliver_due. */
static int fmq_lease_take_unfinished(fmq_region *r, fmq_lease *e, uint32_t owner) {
    return fmq_ring_is_reading(r, FMQ_ONCE(e->src_ticket), owner);
}

/* model: lease.redeliver_due */
int fmq_lease_redeliver_due(fmq_region *r, int force) {
    uint64_t now = fmq_now_ns();
    /* relaxed: next_due and last_scan are hints (see fmq_lower_next_due) */
    uint64_t due = atomic_load_explicit(&r->ctl->next_due.v, memory_order_relaxed);
    uint64_t last = atomic_load_explicit(&r->ctl->last_scan.v, memory_order_relaxed);
    int sweep = now - last >= FMQ_SWEEP_NS && due != 0;   /* due 0: nothing ever leased */
    if (!force && !sweep && (due == 0 || now < due))
        return 0;
    /* last_scan only elects one scanner per interval (relaxed): the scan's
     * own loads of each entry word are acquire and carry the ordering. */
    if (!force && !atomic_compare_exchange_strong_explicit(&r->ctl->last_scan.v, &last, now,
                                                          memory_order_relaxed,
                                                          memory_order_relaxed))
        return 0;   /* someone else is scanning right now */
    if (force)
        atomic_store_explicit(&r->ctl->last_scan.v, now, memory_order_relaxed);
    int n = 0, any = 0, need_recover = 0;
    uint64_t next = ~0ull;
    for (uint32_t i = 0; i < fmq_lease_count(r); i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);   /* [A-mine] */
        uint32_t st = FMQ_LSTATE(w), owner = FMQ_LOWNER(w);
        if (st == FMQ_LS_TAKING) {
            /* Dead letters taken by a handle that closed (or whose entry was
             * reused) are parked again for another one; a crashed taker's
             * are crash recovery's (fmq_lease_reap). */
            any = 1;
            if (owner && fmq_tag_is_dead(r, owner) && !fmq_tag_crashed(r, owner))
                atomic_compare_exchange_strong_explicit(
                    &e->word, &w, FMQ_LWORD(FMQ_LTOKEN(w), FMQ_LS_DEAD, 0),
                    memory_order_acq_rel, memory_order_relaxed);   /* [R-park] */
            continue;
        }
        if (st != FMQ_LS_LEASED)
            continue;
        any = 1;
        uint64_t dl = atomic_load_explicit(&e->deadline_ns, memory_order_acquire);   /* [A-dl] */
        int dead = owner && fmq_tag_is_dead(r, owner);
        if (dead && fmq_tag_crashed(r, owner)) {
            /* Killed, not closed: it may have died between LEASED and freeing
             * the ring slot, so the slot may still hold the same message.
             * Only crash recovery sorts that out (it frees such a slot instead
             * of putting it back); it leaves the entry orphaned and due. */
            need_recover = 1;
            continue;
        }
        int is_due = dl <= now || dead;
        if (!is_due) {
            if (dl < next)
                next = dl;
            continue;
        }
        uint32_t tok = FMQ_LTOKEN(w);
        if (!atomic_compare_exchange_strong_explicit(
                &e->word, &w, FMQ_LWORD(tok, FMQ_LS_REQUEUING, r->owner_tag),
                memory_order_seq_cst, memory_order_relaxed))               /* [S-end] */
            continue;
        /* [S-touch]: a touch that moved the deadline before our claim is seen */
        if (owner && atomic_load_explicit(&e->deadline_ns, memory_order_seq_cst) > now &&
            !fmq_tag_is_dead(r, owner)) {
            /* touched meanwhile: give it back */
            atomic_store_explicit(&e->word, w, memory_order_release);      /* [R-lease] */
            continue;
        }
        if (owner && fmq_lease_take_unfinished(r, e, owner)) {
            atomic_store_explicit(&e->word, w, memory_order_release);      /* [R-lease] */
            next = 1;   /* due still: look again at the next chance */
            continue;
        }
        if (fmq_lease_requeue(r, e, w, 0) == FMQ_OK)
            n++;
        else
            next = 1;   /* parked for lack of room: retry at the next chance */
    }
    atomic_store_explicit(&r->ctl->next_due.v, any ? (next == ~0ull ? now + FMQ_SWEEP_NS : next)
                                                   : 0,
                          memory_order_relaxed);   /* a hint (fmq_lower_next_due) */
    if (need_recover && r->up->recover(r) > 0)
        n += fmq_lease_redeliver_due(r, 1);   /* the entries it orphaned are due now */
    return n;
}

/* Killed (its participant entry still ACTIVE under the same generation, but
 * its kernel lock gone), as opposed to having closed its handle cleanly. */
int fmq_tag_crashed(fmq_region *r, uint32_t tag) {
    uint32_t idx = FMQ_TAG_INDEX(tag), gen = FMQ_TAG_GEN(tag);
    if (idx >= r->g.nparticipants)
        return 0;
    uint64_t id = atomic_load_explicit(&r->parts[idx].ident, memory_order_acquire); /* [A-ident] */
    return FMQ_PART_GEN(id) == gen && FMQ_PART_STATE(id) == FMQ_PART_ACTIVE &&
           !fmq_live_is_alive(r, idx);
}

/* The in-flight table and the ring are both full and a lease is due: its
 * message cannot go back to the ring (no slot) and no new lease can be taken
 * (no entry) -- each would wait for the other. Break the tie by handing the
 * due message straight to this taker, as a redelivery (count + 1, new token,
 * so the old holder's ack fails). It skips the queue only in this case. */
int fmq_lease_adopt(fmq_region *r, uint64_t lease_ns, uint32_t *slot_out, uint32_t *token_out,
                    uint32_t *deliveries_out) {
    uint64_t now = fmq_now_ns();
    for (uint32_t i = 0; i < fmq_lease_count(r); i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);   /* [A-mine] */
        if (FMQ_LSTATE(w) != FMQ_LS_LEASED)
            continue;
        uint32_t owner = FMQ_LOWNER(w);
        if (atomic_load_explicit(&e->deadline_ns, memory_order_acquire) > now &&   /* [A-dl] */
            !(owner && fmq_tag_is_dead(r, owner)))
            continue;
        if (owner && fmq_tag_crashed(r, owner))
            continue;   /* crash recovery first (see fmq_lease_redeliver_due) */
        uint32_t tok = FMQ_LTOKEN(w);
        if (!atomic_compare_exchange_strong_explicit(
                &e->word, &w, FMQ_LWORD(tok, FMQ_LS_REQUEUING, r->owner_tag),
                memory_order_seq_cst, memory_order_relaxed))               /* [S-end] */
            continue;
        if (owner && fmq_lease_take_unfinished(r, e, owner)) {
            atomic_store_explicit(&e->word, w, memory_order_release);      /* [R-lease] */
            continue;
        }
        uint32_t len, block;
        if (!fmq_lease_src_claimed(r, e, w, &len, &block))
            continue;   /* discarded */
        uint32_t deliveries = FMQ_ONCE(e->deliveries);
        if (r->max_deliveries && deliveries >= r->max_deliveries) {
            fmq_lease_requeue(r, e, w, 1);   /* dead-letter it instead */
            continue;
        }
        fmq_lease_share_to_ring(r, e, tok, block);
        /* Our own reader share, unless the old holder's views still have
         * one (then the entry keeps its IN_RING share and we cannot pin). */
        if (block != FMQ_NO_BLOCK &&
            fmq_pool_transition(r, block, FMQ_BLK_IN_RING | FMQ_READER_MASK,
                                FMQ_BLK_IN_RING, FMQ_BLK_AS_READER(r->owner_tag)) == FMQ_OK)
            atomic_store_explicit(&e->holder, r->owner_tag, memory_order_release); /* [R-holder] */
        /* relaxed, as the deadline below: the entry is REQUEUING(me); [R-lease] publishes */
        uint32_t next = fmq_next_token(tok);
        atomic_store_explicit(&e->pin, FMQ_PIN(next, FMQ_PIN_NONE), memory_order_relaxed);
        e->deliveries = deliveries + 1;
        e->leased_ns = now;
        atomic_store_explicit(&e->deadline_ns, now + lease_ns, memory_order_relaxed);
        atomic_store_explicit(&e->word, FMQ_LWORD(next, FMQ_LS_LEASED, r->owner_tag),
                              memory_order_release);                        /* [R-lease] */
        fmq_lower_next_due(r, now + lease_ns);
        fmq_count(r, FMQ_ST_REDELIVERED, 1);
        *slot_out = i;
        *token_out = next;
        *deliveries_out = deliveries + 1;
        return FMQ_OK;
    }
    return FMQ_EMPTY;
}

static int fmq_has_free_lease(fmq_region *r) {
    for (uint32_t i = 0; i < fmq_lease_count(r); i++)
        /* [S-wait]: the sleeper's re-check of fmq_wait.h's handshake */
        if (FMQ_LSTATE(atomic_load_explicit(&fmq_lease_at(r, i)->word, memory_order_seq_cst)) ==
            FMQ_LS_FREE)
            return 1;
    return 0;
}

/* Sleep until an entry may be free, at most one slice (<= 100 ms) and never
 * past deadline_ns (0 = none): FMQ_OK (retry), FMQ_AGAIN (slice over: check
 * signals and close(), retry), FMQ_EINTR, or FMQ_TIMEDOUT. Touches no Python
 * state: the binding calls it with the GIL released. */
static int fmq_lease_free_ready(void *r) { return fmq_has_free_lease(r); }

int fmq_lease_wait_free(fmq_region *r, uint64_t deadline_ns) {
    /* Rare (the table holds maxsize entries): a plain sliced sleep on the
     * space line (fmq_wait.h's handshake), which ack and redelivery wake.
     * Their FREE store is a release, not part of the seq_cst order of the
     * sleeper's count increment and re-check, so a wake can be missed; the
     * slice bounds that to FMQ_SLICE_NS (a seq_cst store on every ack would
     * cost more than it saves here). */
    fmq_lease_redeliver_due(r, 0);
    int rc = fmq_waitline_sleep(&r->ctl->space, fmq_lease_free_ready, r, deadline_ns);
    if (rc == FMQ_AGAIN && deadline_ns && fmq_now_ns() >= deadline_ns)
        rc = FMQ_TIMEDOUT;
    return rc;
}

/* ======================================================================== */
/* introspection and dead letters                                           */
/* ======================================================================== */

int fmq_lease_pending(fmq_region *r, fmq_pending *out, int max) {
    int n = 0;
    for (uint32_t i = 0; i < fmq_lease_count(r) && n < max; i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);   /* [A-mine] */
        uint32_t st = FMQ_LSTATE(w);
        /* Every entry that holds a message: leased ones, and dead letters
         * (parked, or being forwarded) -- they are in flight too. */
        int dead = st == FMQ_LS_DEAD || st == FMQ_LS_TAKING;
        if (st != FMQ_LS_LEASED && st != FMQ_LS_REQUEUING && !dead)
            continue;
        uint32_t owner = FMQ_LOWNER(w), idx = FMQ_TAG_INDEX(owner);
        uint32_t pid = 0;
        /* A parked letter's owner is whoever parked it, not a holder. */
        if (owner && idx < r->g.nparticipants && st != FMQ_LS_DEAD)
            /* relaxed: pid and deadline only reported, never acted on */
            pid = FMQ_PART_PID(atomic_load_explicit(&r->parts[idx].ident, memory_order_relaxed));
        out[n].slot = i;
        out[n].token = FMQ_LTOKEN(w);
        out[n].pid = pid;
        out[n].deliveries = FMQ_ONCE(e->deliveries);
        out[n].state = st;
        out[n].dead_letter = dead ? 1u : 0u;
        out[n].leased_ns = FMQ_ONCE(e->leased_ns);
        out[n].deadline_ns = atomic_load_explicit(&e->deadline_ns, memory_order_relaxed);
        n++;
    }
    return n;
}

/* model: lease.take_dead */
int fmq_lease_take_dead(fmq_region *r, uint32_t *slot, uint32_t *token) {
    for (uint32_t i = 0; i < fmq_lease_count(r); i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);   /* [A-mine] */
        if (FMQ_LSTATE(w) != FMQ_LS_DEAD)
            continue;
        if (atomic_compare_exchange_strong_explicit(
                &e->word, &w, FMQ_LWORD(FMQ_LTOKEN(w), FMQ_LS_TAKING, r->owner_tag),
                memory_order_acq_rel, memory_order_relaxed)) {   /* [R-park] */
            uint32_t len, block;
            if (!fmq_lease_src_claimed(r, e, w, &len, &block))
                continue;   /* discarded: never forwarded */
            *slot = i;
            *token = FMQ_LTOKEN(w);
            return FMQ_OK;
        }
    }
    return FMQ_EMPTY;
}

/* model: lease.ack_dead */
int fmq_lease_ack_dead(fmq_region *r, uint32_t slot, uint32_t token) {
    uint64_t w;
    fmq_lease *e = fmq_lease_mine(r, slot, token, FMQ_LS_TAKING, &w);
    if (!e)
        return fmq_fail(FMQ_ELOST, "dead letter no longer held");
    if (!atomic_compare_exchange_strong_explicit(&e->word, &w,
                                                 FMQ_LWORD(token, FMQ_LS_ACKING, r->owner_tag),
                                                 memory_order_seq_cst,      /* [S-end] */
                                                 memory_order_relaxed))
        return fmq_fail(FMQ_ELOST, "dead letter no longer held");
    /* ACKING(me): a crash from here on leaves the entry to the reaper, which
     * frees it; the block's IN_RING share then stays (one leaked block)
     * rather than a dead letter forwarded again from a block freed already. */
    FMQ_CRASHPOINT("lease.ackdead.claimed");
    fmq_lease_drop_share(r, e, token, FMQ_ONCE(e->block));
    atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_FREE, 0),
                          memory_order_release);                           /* [R-free] */
    fmq_count(r, FMQ_ST_DEAD_LETTERED, 1);
    fmq_wake_space(r);
    return FMQ_OK;
}

/* ======================================================================== */
/* a handle closing                                                         */
/* ======================================================================== */

int fmq_lease_release_owned(fmq_region *r) {
    if (!r->self || r->fork_gen != fmq_fork_generation || r->owner_tag == 0)
        return 0;   /* a forked child never registered: the entries are the parent's */
    int n = 0;
    for (uint32_t i = 0; i < fmq_lease_count(r); i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);   /* [A-mine] */
        if (FMQ_LOWNER(w) != r->owner_tag)
            continue;
        uint32_t st = FMQ_LSTATE(w), tok = FMQ_LTOKEN(w);
        if (st == FMQ_LS_LEASED) {
            if (!atomic_compare_exchange_strong_explicit(
                    &e->word, &w, FMQ_LWORD(tok, FMQ_LS_REQUEUING, r->owner_tag),
                    memory_order_seq_cst, memory_order_relaxed))           /* [S-end] */
                continue;
            /* Back of the queue now, delivery count kept (a departed holder,
             * as if its lease had expired); no room: parked, due at once. */
            FMQ_CRASHPOINT("lease.release.requeuing");
            fmq_lease_requeue(r, e, w, 0);
            n++;
        } else if (st == FMQ_LS_TAKING) {
            if (atomic_compare_exchange_strong_explicit(
                    &e->word, &w, FMQ_LWORD(tok, FMQ_LS_DEAD, 0), memory_order_acq_rel,
                    memory_order_relaxed))                                 /* [R-park] */
                n++;
        }
    }
    if (n)
        fmq_lower_next_due(r, 1);
    return n;
}

/* ======================================================================== */
/* crash recovery of a dead tag's entries (before the slot and block passes) */
/* ======================================================================== */

/* Runs with the dead participant's lock held (fmq_recover.c), so it is the
 * only reaper of this tag; live processes may still act on the same entries
 * (a redeliverer that saw the tag closed, a taker after a FREE entry), so
 * every step is a CAS from the word we read, never a blind store. */
/* model: recover.lease_reap */
void fmq_lease_reap(fmq_region *r, uint32_t tag, fmq_taken *taken) {
    for (uint32_t i = 0; i < fmq_lease_count(r); i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);   /* [A-mine] */
        if (FMQ_LOWNER(w) != tag || FMQ_LSTATE(w) == FMQ_LS_FREE)
            continue;
        uint32_t st = FMQ_LSTATE(w), tok = FMQ_LTOKEN(w);
        uint32_t block = FMQ_ONCE(e->block);
        if (st == FMQ_LS_FILLING) {
            /* An unfinished take: its slot is still READING(tag) and the slot
             * pass puts the message back, so the entry is simply dropped. A
             * batch message's entry holds a copy block no slot names: its
             * reader share is not the ring's, the block pass drops it. */
            if (FMQ_ONCE(e->src_index) == 0)
                fmq_lease_share_to_ring(r, e, tok, block);
            else
                atomic_store_explicit(&e->holder, 0, memory_order_release);   /* [R-holder] */
            atomic_compare_exchange_strong_explicit(&e->word, &w, FMQ_LWORD(tok, FMQ_LS_FREE, 0),
                                                    memory_order_acq_rel,
                                                    memory_order_relaxed);   /* [R-free] */
        } else if (st == FMQ_LS_ACKING) {
            /* An unfinished ack: the message is done; the block pass clears
             * the reader share, the entry is freed here. */
            atomic_compare_exchange_strong_explicit(&e->word, &w, FMQ_LWORD(tok, FMQ_LS_FREE, 0),
                                                    memory_order_acq_rel,
                                                    memory_order_relaxed);   /* [R-free] */
        } else if (st == FMQ_LS_LEASED || st == FMQ_LS_REQUEUING) {
            /* Claim it first (REQUEUING(tag): no redeliverer takes a LEASED
             * word we are still changing); a reaper that dies here leaves
             * REQUEUING(tag), which the next reaper of the tag finishes. */
            if (st == FMQ_LS_LEASED) {
                uint64_t claimed = FMQ_LWORD(tok, FMQ_LS_REQUEUING, tag);
                if (!atomic_compare_exchange_strong_explicit(&e->word, &w, claimed,
                                                             memory_order_seq_cst,
                                                             memory_order_relaxed))
                    continue;                                              /* [S-end] */
                w = claimed;
                FMQ_CRASHPOINT("lease.reap.claimed");
            }
            /* Also for REQUEUING(tag): a reaper killed right after the claim
             * above leaves that, and the slot the message came from may
             * still be READING(tag) (the taker died before freeing it). A
             * ticket only matches a slot still READING(tag) at its lap. */
            if (taken->tickets) {
                taken->index[taken->n] = FMQ_ONCE(e->src_index);
                taken->tickets[taken->n++] = FMQ_ONCE(e->src_ticket);
            }
            fmq_lease_share_to_ring(r, e, tok, block);
            /* relaxed: published by the [R-lease] CAS below */
            atomic_store_explicit(&e->deadline_ns, 0, memory_order_relaxed);
            atomic_compare_exchange_strong_explicit(&e->word, &w,
                                                    FMQ_LWORD(tok, FMQ_LS_LEASED, 0),
                                                    memory_order_acq_rel,
                                                    memory_order_relaxed);   /* [R-lease] */
            fmq_lower_next_due(r, 1);
        } else if (st == FMQ_LS_TAKING) {
            atomic_compare_exchange_strong_explicit(&e->word, &w, FMQ_LWORD(tok, FMQ_LS_DEAD, 0),
                                                    memory_order_acq_rel,
                                                    memory_order_relaxed);   /* [R-park] */
        }
    }
}

/* Blocks that in-flight entries name (any state but FREE): crash recovery's
 * block pass must not take the queue's share of them as a "commit that never
 * published" -- an entry parked, orphaned or dead-lettered holds exactly that
 * share, under the (dead) producer's still-set writer tag when the producer
 * kept a reservation view after commit. */
void fmq_lease_mark_blocks(fmq_region *r, unsigned char *published) {
    for (uint32_t i = 0; i < fmq_lease_count(r); i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);   /* [A-mine] */
        if (FMQ_LSTATE(w) == FMQ_LS_FREE)
            continue;
        uint32_t block = FMQ_ONCE(e->block);
        int64_t o = block == FMQ_NO_BLOCK ? -1 : fmq_block_ordinal(r, block);
        if (o >= 0)
            published[o] = 1;
    }
}

int fmq_lease_names_block(fmq_region *r, uint32_t block) {
    for (uint32_t i = 0; i < fmq_lease_count(r); i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);   /* [A-mine] */
        if (FMQ_LSTATE(w) != FMQ_LS_FREE && FMQ_ONCE(e->block) == block)
            return 1;
    }
    return 0;
}

int fmq_block_referenced(fmq_region *r, uint32_t block, uint64_t skip_ticket) {
    return fmq_lease_names_block(r, block) || fmq_ring_names_block(r, block, skip_ticket);
}
