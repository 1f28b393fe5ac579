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
 * touch vs expiry: touch re-checks the word after moving the deadline, and
 * the redeliverer re-checks the deadline after taking the entry.
 *
 * Failure model: see fmq_lease_reap (called by crash recovery for a dead
 * tag). A dead holder's handed-over shares are cleared by the block pass of
 * crash recovery like any reader share.
 */
#include <stdlib.h>
#include <string.h>

#include "fmq_internal.h"
#include "fmq_wait.h"

#define FMQ_LTOKEN(w) ((uint32_t)((w) >> 32))
#define FMQ_LSTATE(w) ((uint32_t)(((w) >> 24) & 0xFF))
#define FMQ_LOWNER(w) ((uint32_t)((w) & FMQ_OWNER_MASK))
#define FMQ_LWORD(tok, st, own) \
    (((uint64_t)(tok) << 32) | ((uint64_t)(st) << 24) | (uint64_t)(own))
#define FMQ_SWEEP_NS 1000000000ull

static inline fmq_lease *fmq_lease_at(const fmq_region *r, uint32_t i) {
    return (fmq_lease *)(r->leases + (uint64_t)i * r->g.lease_stride);
}

static inline unsigned char *fmq_lease_inline(fmq_lease *e) {
    return (unsigned char *)e + FMQ_LEASE_HEADER;
}

/* Only entries whose pages are reserved exist (fmq_pool.c): the table grows
 * when a take finds none free. */
uint32_t fmq_lease_count(const fmq_region *r) { return (uint32_t)fmq_lease_committed(r); }

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
static int fmq_lease_hand_pin(fmq_lease *e, uint32_t tok) {
    uint64_t p = FMQ_PIN(tok, FMQ_PIN_PINNED);
    if (atomic_compare_exchange_strong_explicit(&e->pin, &p, FMQ_PIN(tok, FMQ_PIN_HANDED),
                                                memory_order_seq_cst, memory_order_seq_cst))
        return 1;
    return p == FMQ_PIN(tok, FMQ_PIN_HANDED);
}

/* The entry's block share becomes IN_RING (holder 0); tolerant of having been
 * done already, wholly or in part, by a predecessor that died half-way. The
 * queue takes its IN_RING share BEFORE the holder's reader share is let go or
 * handed over, so the block outlives the holder's death while we copy it. */
static void fmq_lease_share_to_ring(fmq_region *r, fmq_lease *e, uint32_t tok) {
    uint32_t holder = atomic_load_explicit(&e->holder, memory_order_acquire);
    if (holder && e->block != FMQ_NO_BLOCK) {
        uint64_t h = (uint64_t)holder << 24;
        const uint64_t mask = FMQ_BLK_IN_RING | FMQ_READER_MASK;
        fmq_pool_transition(r, e->block, mask, h, h | FMQ_BLK_IN_RING);
        FMQ_CRASHPOINT("lease.share.co_owned");
        if (!fmq_lease_hand_pin(e, tok))
            fmq_pool_transition(r, e->block, mask, h | FMQ_BLK_IN_RING, FMQ_BLK_IN_RING);
    }
    atomic_store_explicit(&e->holder, 0, memory_order_release);
}

/* Drop the entry's block share (the message is gone or has a new copy). A
 * live holder's handed-over share stays: the block is freed when it goes. */
static void fmq_lease_drop_share(fmq_region *r, fmq_lease *e, uint32_t tok) {
    if (e->block == FMQ_NO_BLOCK)
        return;
    uint32_t holder = atomic_load_explicit(&e->holder, memory_order_acquire);
    if (holder) {
        if (!fmq_lease_hand_pin(e, tok))
            fmq_pool_transition(r, e->block, FMQ_READER_MASK, (uint64_t)holder << 24, 0);
        atomic_store_explicit(&e->holder, 0, memory_order_release);
    } else {
        fmq_pool_transition(r, e->block, FMQ_BLK_IN_RING, FMQ_BLK_IN_RING, 0);
    }
}

/* ======================================================================== */
/* taking                                                                   */
/* ======================================================================== */

int fmq_lease_take(fmq_region *r, fmq_msg *m, uint64_t lease_ns, uint32_t *slot_out,
                   uint32_t *token_out, uint32_t *deliveries_out) {
again:;
    uint32_t n = fmq_lease_count(r);
    uint32_t start = (uint32_t)(atomic_load_explicit(&r->ctl->lease_hint.v,
                                                     memory_order_relaxed) % n);
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = (start + k) % n;
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);
        if (FMQ_LSTATE(w) != FMQ_LS_FREE)
            continue;
        uint32_t tok = FMQ_LTOKEN(w) + 1;
        if (!atomic_compare_exchange_strong_explicit(
                &e->word, &w, FMQ_LWORD(tok, FMQ_LS_FILLING, r->owner_tag),
                memory_order_acq_rel, memory_order_relaxed))
            continue;
        atomic_store_explicit(&e->holder, 0, memory_order_relaxed);  /* no share yet */
        atomic_store_explicit(&e->pin, FMQ_PIN(tok, FMQ_PIN_NONE), memory_order_relaxed);
        atomic_store_explicit(&r->ctl->lease_hint.v, i + 1, memory_order_relaxed);
        uint64_t now = fmq_now_ns();
        e->src_ticket = m->ticket;
        e->leased_ns = now;
        e->len = m->len;
        e->block = m->block;
        e->deliveries = m->deliveries + 1;
        if (m->block == FMQ_NO_BLOCK) {
            memcpy(fmq_lease_inline(e), m->data, m->len);
            atomic_store_explicit(&e->holder, 0, memory_order_relaxed);
        } else {
            int rc = fmq_pool_transition(r, m->block, FMQ_BLK_IN_RING | FMQ_READER_MASK,
                                         FMQ_BLK_IN_RING, (uint64_t)r->owner_tag << 24);
            if (rc != FMQ_OK) {
                atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_FREE, 0),
                                      memory_order_release);
                return rc;
            }
            atomic_store_explicit(&e->holder, r->owner_tag, memory_order_relaxed);
        }
        atomic_store_explicit(&e->deadline_ns, now + lease_ns, memory_order_relaxed);
        FMQ_CRASHPOINT("lease.take.filled");
        atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_LEASED, r->owner_tag),
                              memory_order_release);
        fmq_lower_next_due(r, now + lease_ns);
        FMQ_CRASHPOINT("lease.take.leased");
        int rc = fmq_ring_free_moved(r, m);
        if (rc != FMQ_OK)
            return rc;
        *slot_out = i;
        *token_out = tok;
        *deliveries_out = e->deliveries;
        return FMQ_OK;
    }
    if (fmq_lease_grow(r, n) == FMQ_OK)
        goto again;   /* more entries now exist */
    return FMQ_FULL;
}

static fmq_lease *fmq_lease_mine(fmq_region *r, uint32_t slot, uint32_t token, uint32_t state,
                                 uint64_t *w_out) {
    if (slot >= fmq_lease_count(r))
        return NULL;
    fmq_lease *e = fmq_lease_at(r, slot);
    uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);
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
    if (e->block == FMQ_NO_BLOCK) {
        if (e->len > r->inline_max)
            return fmq_fail(FMQ_ECORRUPT, "in-flight entry %u has an invalid length", slot);
        *data = fmq_lease_inline(e);
    } else {
        *data = fmq_pool_ptr(r, e->block);
        if (!*data || e->len > fmq_pool_block_size(r, e->block))
            return fmq_fail(FMQ_ECORRUPT, "in-flight entry %u has an invalid block", slot);
    }
    *len = e->len;
    return FMQ_OK;
}

/* Pin a held block payload for zero-copy views (see FMQ_PIN_* in
 * fmq_layout.h). FMQ_AGAIN: nothing to pin (an inline payload, or a block
 * whose share the entry holds as IN_RING): copy it with fmq_lease_payload.
 * The pin CAS and the re-read of the entry word are seq_cst, as are the
 * ender's CAS of the word and its hand-over CAS of the pin: either we see the
 * lease ended (and back out), or the ender sees our pin (and hands over). */
int fmq_lease_pin(fmq_region *r, uint32_t slot, uint32_t token, const unsigned char **data,
                  uint32_t *len, uint32_t *block) {
    uint64_t w;
    fmq_lease *e = fmq_lease_mine(r, slot, token, FMQ_LS_LEASED, &w);
    if (!e)
        return fmq_fail(FMQ_ELOST, "lease lost");
    uint32_t b = e->block, n = e->len;
    if (b == FMQ_NO_BLOCK || atomic_load_explicit(&e->holder, memory_order_acquire) !=
                                 r->owner_tag)
        return FMQ_AGAIN;
    const unsigned char *p = fmq_pool_ptr(r, b);
    if (!p || n > fmq_pool_block_size(r, b))
        return fmq_fail(FMQ_ECORRUPT, "in-flight entry %u has an invalid block", slot);
    uint64_t pin = FMQ_PIN(token, FMQ_PIN_NONE);
    if (!atomic_compare_exchange_strong_explicit(&e->pin, &pin, FMQ_PIN(token, FMQ_PIN_PINNED),
                                                 memory_order_seq_cst, memory_order_seq_cst))
        return fmq_fail(FMQ_ESTATE, "in-flight entry %u is already pinned", slot);
    if (atomic_load_explicit(&e->word, memory_order_seq_cst) != w) {
        fmq_lease_unpin(r, slot, token, b);   /* ended meanwhile: back out */
        return fmq_fail(FMQ_ELOST, "lease lost");
    }
    *data = p;
    *len = n;
    *block = b;
    return FMQ_OK;
}

/* The holder's last view of a pinned payload is gone. */
int fmq_lease_unpin(fmq_region *r, uint32_t slot, uint32_t token, uint32_t block) {
    if (slot >= fmq_lease_count(r))
        return fmq_fail(FMQ_EINVAL, "no in-flight entry %u", slot);
    fmq_lease *e = fmq_lease_at(r, slot);
    uint64_t pin = FMQ_PIN(token, FMQ_PIN_PINNED);
    if (atomic_compare_exchange_strong_explicit(&e->pin, &pin, FMQ_PIN(token, FMQ_PIN_NONE),
                                                memory_order_seq_cst, memory_order_seq_cst))
        return FMQ_OK;                /* still the entry's share */
    /* Only the lease's ender moves a pin off PINNED (to HANDED; a reused
     * entry went through that first), so the share is ours to drop. */
    return fmq_pool_release_reader(r, block);
}

/* ======================================================================== */
/* ack / touch                                                              */
/* ======================================================================== */

int fmq_lease_ack(fmq_region *r, uint32_t slot, uint32_t token) {
    uint64_t w;
    fmq_lease *e = fmq_lease_mine(r, slot, token, FMQ_LS_LEASED, &w);
    if (!e)
        return fmq_fail(FMQ_ELOST, "the lease was lost (expired and redelivered, or "
                                   "reclaimed)");
    if (fmq_now_ns() > atomic_load_explicit(&e->deadline_ns, memory_order_acquire))
        return fmq_fail(FMQ_ELOST, "the lease expired; the message will be redelivered");
    if (!atomic_compare_exchange_strong_explicit(&e->word, &w,
                                                 FMQ_LWORD(token, FMQ_LS_ACKING, r->owner_tag),
                                                 memory_order_acq_rel, memory_order_relaxed))
        return fmq_fail(FMQ_ELOST, "the lease was lost to a concurrent redelivery");
    /* ACKING(me) while we drop the share: a crash here is finished by the
     * reaper (entry freed; our reader share cleared by the block pass). */
    FMQ_CRASHPOINT("lease.ack.claimed");
    fmq_lease_drop_share(r, e, token);
    atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_FREE, 0), memory_order_release);
    fmq_ring_wake_producers(r);   /* lease takers wait on the space line too */
    return FMQ_OK;
}

int fmq_lease_touch(fmq_region *r, uint32_t slot, uint32_t token, uint64_t lease_ns) {
    uint64_t w;
    fmq_lease *e = fmq_lease_mine(r, slot, token, FMQ_LS_LEASED, &w);
    uint64_t now = fmq_now_ns();
    if (!e || now > atomic_load_explicit(&e->deadline_ns, memory_order_acquire))
        return fmq_fail(FMQ_ELOST, "the lease expired or was lost");
    atomic_store_explicit(&e->deadline_ns, now + lease_ns, memory_order_seq_cst);
    if (atomic_load_explicit(&e->word, memory_order_seq_cst) != w)
        return fmq_fail(FMQ_ELOST, "the lease was lost to a concurrent redelivery");
    return FMQ_OK;
}

/* ======================================================================== */
/* redelivery                                                               */
/* ======================================================================== */

/* Entry is REQUEUING(me) (or we otherwise own it). Returns FMQ_OK when it was
 * requeued or dead-lettered, FMQ_FULL when there was no room (the entry is
 * then parked as an orphaned, due lease for a later attempt). */
static int fmq_lease_requeue(fmq_region *r, fmq_lease *e, uint32_t token, int force_dead) {
    fmq_lease_share_to_ring(r, e, token);
    int dead = force_dead || (r->max_deliveries && e->deliveries >= r->max_deliveries);
    if (dead) {
        if (r->dead_letter[0]) {
            atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_DEAD, 0),
                                  memory_order_release);
            return FMQ_OK;
        }
        fmq_lease_drop_share(r, e, token);
        atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_FREE, 0), memory_order_release);
        fmq_count(r, FMQ_ST_DEAD_LETTERED, 1);
        return FMQ_OK;
    }
    uint32_t nb = FMQ_NO_BLOCK;
    const unsigned char *src = e->block == FMQ_NO_BLOCK ? fmq_lease_inline(e)
                                                        : fmq_pool_ptr(r, e->block);
    int rc = FMQ_OK;
    if (!src || (e->block == FMQ_NO_BLOCK && e->len > r->inline_max))
        rc = fmq_fail(FMQ_ECORRUPT, "in-flight entry is corrupted");
    if (rc == FMQ_OK && e->len > r->inline_max) {
        rc = fmq_pool_alloc(r, e->len, &nb);
        if (rc == FMQ_OK)
            memcpy(fmq_pool_ptr(r, nb), src, e->len);
    }
    fmq_msg m;
    if (rc == FMQ_OK) {
        rc = fmq_ring_reserve(r, &m);
        if (rc != FMQ_OK && nb != FMQ_NO_BLOCK)
            fmq_pool_release_writer(r, nb);
    }
    if (rc != FMQ_OK) {
        /* No room now: park it as an orphaned lease that is due at once. */
        atomic_store_explicit(&e->deadline_ns, 0, memory_order_relaxed);
        atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_LEASED, 0),
                              memory_order_release);
        fmq_lower_next_due(r, 1);
        return rc == FMQ_NOSPACE ? FMQ_FULL : rc;
    }
    if (nb == FMQ_NO_BLOCK)
        memcpy(fmq_ring_inline_ptr(r, &m), src, e->len);
    m.deliveries = e->deliveries;
    FMQ_CRASHPOINT("lease.requeue.before_commit");
    rc = fmq_ring_commit(r, &m, e->len, nb, 1, 0);
    if (rc != FMQ_OK)
        return rc;
    FMQ_CRASHPOINT("lease.requeue.committed");
    fmq_lease_drop_share(r, e, token);
    atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_FREE, 0), memory_order_release);
    fmq_count(r, FMQ_ST_REDELIVERED, 1);
    return FMQ_OK;
}

int fmq_lease_nack(fmq_region *r, uint32_t slot, uint32_t token, int requeue) {
    uint64_t w;
    fmq_lease *e = fmq_lease_mine(r, slot, token, FMQ_LS_LEASED, &w);
    if (!e || fmq_now_ns() > atomic_load_explicit(&e->deadline_ns, memory_order_acquire))
        return fmq_fail(FMQ_ELOST, "the lease expired or was lost");
    if (!atomic_compare_exchange_strong_explicit(
            &e->word, &w, FMQ_LWORD(token, FMQ_LS_REQUEUING, r->owner_tag),
            memory_order_acq_rel, memory_order_relaxed))
        return fmq_fail(FMQ_ELOST, "the lease was lost to a concurrent redelivery");
    int rc = fmq_lease_requeue(r, e, token, !requeue);
    return rc == FMQ_FULL ? FMQ_OK : rc;   /* parked: redelivered when room frees */
}

int fmq_tag_is_dead(fmq_region *r, uint32_t tag) {
    uint32_t idx = tag >> FMQ_GEN_BITS, gen = tag & ((1u << FMQ_GEN_BITS) - 1);
    if (tag == 0 || idx >= r->g.nparticipants)
        return 0;
    if (tag == r->owner_tag)
        return 0;
    uint64_t id = atomic_load_explicit(&r->parts[idx].ident, memory_order_acquire);
    if (((uint32_t)(id >> 16) & ((1u << FMQ_GEN_BITS) - 1)) != gen)
        return 1;                                   /* entry reused: gone */
    if ((id & 0xFFFF) != FMQ_PART_ACTIVE)
        return 1;                                   /* closed its handle */
    return !fmq_live_is_alive(r, idx);
}

int fmq_lease_redeliver_due(fmq_region *r, int force) {
    uint64_t now = fmq_now_ns();
    uint64_t due = atomic_load_explicit(&r->ctl->next_due.v, memory_order_relaxed);
    uint64_t last = atomic_load_explicit(&r->ctl->last_scan.v, memory_order_relaxed);
    int sweep = now - last >= FMQ_SWEEP_NS && due != 0;   /* due 0: nothing ever leased */
    if (!force && !sweep && (due == 0 || now < due))
        return 0;
    if (!force && !atomic_compare_exchange_strong(&r->ctl->last_scan.v, &last, now))
        return 0;   /* someone else is scanning right now */
    if (force)
        atomic_store(&r->ctl->last_scan.v, now);
    int n = 0, any = 0, need_recover = 0;
    uint64_t next = ~0ull;
    for (uint32_t i = 0; i < fmq_lease_count(r); i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);
        if (FMQ_LSTATE(w) != FMQ_LS_LEASED)
            continue;
        any = 1;
        uint64_t dl = atomic_load_explicit(&e->deadline_ns, memory_order_acquire);
        uint32_t owner = FMQ_LOWNER(w);
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
                memory_order_acq_rel, memory_order_relaxed))
            continue;
        if (owner && atomic_load_explicit(&e->deadline_ns, memory_order_seq_cst) > now &&
            !fmq_tag_is_dead(r, owner)) {
            /* touched meanwhile: give it back */
            atomic_store_explicit(&e->word, w, memory_order_release);
            continue;
        }
        if (fmq_lease_requeue(r, e, tok, 0) == FMQ_OK)
            n++;
        else
            next = 1;   /* parked for lack of room: retry at the next chance */
    }
    atomic_store_explicit(&r->ctl->next_due.v, any ? (next == ~0ull ? now + FMQ_SWEEP_NS : next)
                                                   : 0,
                          memory_order_relaxed);
    if (need_recover && fmq_recover(r) > 0)
        n += fmq_lease_redeliver_due(r, 1);   /* the entries it orphaned are due now */
    return n;
}

/* Killed (its participant entry still ACTIVE under the same generation, but
 * its kernel lock gone), as opposed to having closed its handle cleanly. */
int fmq_tag_crashed(fmq_region *r, uint32_t tag) {
    uint32_t idx = tag >> FMQ_GEN_BITS, gen = tag & ((1u << FMQ_GEN_BITS) - 1);
    if (idx >= r->g.nparticipants)
        return 0;
    uint64_t id = atomic_load_explicit(&r->parts[idx].ident, memory_order_acquire);
    return ((uint32_t)(id >> 16) & ((1u << FMQ_GEN_BITS) - 1)) == gen &&
           (id & 0xFFFF) == FMQ_PART_ACTIVE && !fmq_live_is_alive(r, idx);
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
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);
        if (FMQ_LSTATE(w) != FMQ_LS_LEASED)
            continue;
        uint32_t owner = FMQ_LOWNER(w);
        if (atomic_load_explicit(&e->deadline_ns, memory_order_acquire) > now &&
            !(owner && fmq_tag_is_dead(r, owner)))
            continue;
        if (owner && fmq_tag_crashed(r, owner))
            continue;   /* crash recovery first (see fmq_lease_redeliver_due) */
        uint32_t tok = FMQ_LTOKEN(w);
        if (!atomic_compare_exchange_strong_explicit(
                &e->word, &w, FMQ_LWORD(tok, FMQ_LS_REQUEUING, r->owner_tag),
                memory_order_acq_rel, memory_order_relaxed))
            continue;
        if (r->max_deliveries && e->deliveries >= r->max_deliveries) {
            fmq_lease_requeue(r, e, tok, 1);   /* dead-letter it instead */
            continue;
        }
        fmq_lease_share_to_ring(r, e, tok);
        /* Our own reader share, unless the old holder's views still have
         * one (then the entry keeps its IN_RING share and we cannot pin). */
        if (e->block != FMQ_NO_BLOCK &&
            fmq_pool_transition(r, e->block, FMQ_BLK_IN_RING | FMQ_READER_MASK,
                                FMQ_BLK_IN_RING, (uint64_t)r->owner_tag << 24) == FMQ_OK)
            atomic_store_explicit(&e->holder, r->owner_tag, memory_order_release);
        atomic_store_explicit(&e->pin, FMQ_PIN(tok + 1, FMQ_PIN_NONE), memory_order_relaxed);
        e->deliveries++;
        e->leased_ns = now;
        atomic_store_explicit(&e->deadline_ns, now + lease_ns, memory_order_relaxed);
        atomic_store_explicit(&e->word, FMQ_LWORD(tok + 1, FMQ_LS_LEASED, r->owner_tag),
                              memory_order_release);
        fmq_lower_next_due(r, now + lease_ns);
        fmq_count(r, FMQ_ST_REDELIVERED, 1);
        *slot_out = i;
        *token_out = tok + 1;
        *deliveries_out = e->deliveries;
        return FMQ_OK;
    }
    return FMQ_EMPTY;
}

static int fmq_has_free_lease(fmq_region *r) {
    for (uint32_t i = 0; i < fmq_lease_count(r); i++)
        if (FMQ_LSTATE(atomic_load_explicit(&fmq_lease_at(r, i)->word, memory_order_seq_cst)) ==
            FMQ_LS_FREE)
            return 1;
    return 0;
}

int fmq_lease_wait_free(fmq_region *r, uint64_t deadline_ns) {
    /* Rare (the table holds maxsize entries): a plain sliced sleep on the
     * space line, which ack and redelivery wake. */
    fmq_waitline *wl = &r->ctl->space;
    fmq_lease_redeliver_due(r, 0);
    atomic_fetch_add_explicit(&wl->waiters, 1, memory_order_seq_cst);
    uint32_t epoch = atomic_load_explicit(&wl->epoch, memory_order_seq_cst);
    int rc = FMQ_OK;
    if (!fmq_has_free_lease(r)) {
        uint64_t now = fmq_now_ns(), slice = 100000000ull;
        if (deadline_ns && deadline_ns <= now)
            rc = FMQ_TIMEDOUT;
        else {
            if (deadline_ns && deadline_ns - now < slice)
                slice = deadline_ns - now;
            rc = fmq_wait_on(&wl->epoch, epoch, slice);
            if (rc == FMQ_TIMEDOUT)
                rc = deadline_ns && fmq_now_ns() >= deadline_ns ? FMQ_TIMEDOUT : FMQ_AGAIN;
        }
    }
    atomic_fetch_sub_explicit(&wl->waiters, 1, memory_order_relaxed);
    return rc;
}

/* ======================================================================== */
/* introspection and dead letters                                           */
/* ======================================================================== */

int fmq_lease_pending(fmq_region *r, fmq_pending *out, int max) {
    int n = 0;
    for (uint32_t i = 0; i < fmq_lease_count(r) && n < max; i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);
        uint32_t st = FMQ_LSTATE(w);
        if (st != FMQ_LS_LEASED && st != FMQ_LS_REQUEUING)
            continue;
        uint32_t owner = FMQ_LOWNER(w), idx = owner >> FMQ_GEN_BITS;
        uint32_t pid = 0;
        if (owner && idx < r->g.nparticipants)
            pid = (uint32_t)(atomic_load_explicit(&r->parts[idx].ident, memory_order_relaxed) >>
                             32);
        out[n].slot = i;
        out[n].token = FMQ_LTOKEN(w);
        out[n].pid = pid;
        out[n].deliveries = e->deliveries;
        out[n].state = st;
        out[n].leased_ns = e->leased_ns;
        out[n].deadline_ns = atomic_load_explicit(&e->deadline_ns, memory_order_relaxed);
        n++;
    }
    return n;
}

int fmq_lease_take_dead(fmq_region *r, uint32_t *slot, uint32_t *token) {
    for (uint32_t i = 0; i < fmq_lease_count(r); i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);
        if (FMQ_LSTATE(w) != FMQ_LS_DEAD)
            continue;
        if (atomic_compare_exchange_strong_explicit(
                &e->word, &w, FMQ_LWORD(FMQ_LTOKEN(w), FMQ_LS_TAKING, r->owner_tag),
                memory_order_acq_rel, memory_order_relaxed)) {
            *slot = i;
            *token = FMQ_LTOKEN(w);
            return FMQ_OK;
        }
    }
    return FMQ_EMPTY;
}

int fmq_lease_ack_dead(fmq_region *r, uint32_t slot, uint32_t token) {
    uint64_t w;
    fmq_lease *e = fmq_lease_mine(r, slot, token, FMQ_LS_TAKING, &w);
    if (!e)
        return fmq_fail(FMQ_ELOST, "dead letter no longer held");
    fmq_lease_drop_share(r, e, token);
    atomic_store_explicit(&e->word, FMQ_LWORD(token, FMQ_LS_FREE, 0), memory_order_release);
    fmq_count(r, FMQ_ST_DEAD_LETTERED, 1);
    fmq_ring_wake_producers(r);
    return FMQ_OK;
}

/* ======================================================================== */
/* crash recovery of a dead tag's entries (before the slot and block passes) */
/* ======================================================================== */

void fmq_lease_reap(fmq_region *r, uint32_t tag, fmq_taken *taken) {
    for (uint32_t i = 0; i < fmq_lease_count(r); i++) {
        fmq_lease *e = fmq_lease_at(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);
        if (FMQ_LOWNER(w) != tag || FMQ_LSTATE(w) == FMQ_LS_FREE)
            continue;
        uint32_t st = FMQ_LSTATE(w), tok = FMQ_LTOKEN(w);
        if (st == FMQ_LS_FILLING) {
            /* An unfinished take: its slot is still READING(tag) and the slot
             * pass puts the message back, so the entry is simply dropped. */
            fmq_lease_share_to_ring(r, e, tok);
            atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_FREE, 0),
                                  memory_order_release);
        } else if (st == FMQ_LS_ACKING) {
            /* An unfinished ack: the message is done; the block pass clears
             * the reader share, the entry is freed here. */
            atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_FREE, 0),
                                  memory_order_release);
        } else if (st == FMQ_LS_LEASED || st == FMQ_LS_REQUEUING) {
            if (st == FMQ_LS_LEASED && taken->tickets)
                taken->tickets[taken->n++] = e->src_ticket;
            fmq_lease_share_to_ring(r, e, tok);
            atomic_store_explicit(&e->deadline_ns, 0, memory_order_relaxed);
            atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_LEASED, 0),
                                  memory_order_release);
            fmq_lower_next_due(r, 1);
        } else if (st == FMQ_LS_TAKING) {
            atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_DEAD, 0),
                                  memory_order_release);
        }
    }
}
