/*
 * fmq_pool.c -- size-classed blocks for messages that do not fit in a slot.
 *
 * Algorithm. Each class is an array of equal blocks plus a lock-free LIFO free
 * stack (Treiber) whose top word packs {tag:32, index:32}; every successful
 * push or pop increments the tag, so a top that was popped and pushed back
 * between our read and our CAS (ABA) never matches. LIFO keeps recently used,
 * cache-warm blocks in play and leaves the rest of the pool untouched.
 * A request takes the smallest class that fits and borrows from larger classes
 * when that one is exhausted. A block's state word names its holders (see
 * fmq_layout.h): the writer, the reader, and whether a queued message refers
 * to it. Every hand-off (writer -> ring -> reader) is one CAS on that word, and
 * the block returns to its free stack when the word reaches zero, so memory
 * that Python can still see is never handed out again.
 *
 * Memory order. [R-push] the CAS that publishes a block on the stack is a
 * release, pairing with [A-pop], the acquire load/CAS that takes it: the link
 * we read under it is the one written before the push.
 *
 * Failure model. Because every holder is named, recovery (fmq_recover.c)
 * clears a dead participant's writer/reader share of every block and frees
 * the blocks nobody else holds. The one unnamed instant is between the pop
 * and the store of the writer tag (two instructions): a SIGKILL exactly there
 * leaks one block. Every index read from shared memory is range-checked: a
 * scribbled stack gives FMQ_ECORRUPT, never a wild pointer; and a popped
 * block is taken by a CAS of its state from 0, so a scribbled stack that
 * names a block somebody holds never hands that block out again.
 */
#include "fmq_internal.h"

static inline fmq_block_meta *fmq_pool_meta(fmq_region *r, uint32_t c) {
    return (fmq_block_meta *)(r->base + r->g.classes[c].meta_offset);
}

static inline int fmq_pool_valid(fmq_region *r, uint32_t block) {
    uint32_t c = FMQ_BLOCK_CLASS(block);
    return c < r->g.nclasses && FMQ_BLOCK_INDEX(block) < r->g.classes[c].nblocks;
}

static int fmq_pool_pop(fmq_region *r, uint32_t c, uint32_t *idx_out) {
    _Atomic uint64_t *top = &r->ctl->free_top[c].v;
    fmq_block_meta *meta = fmq_pool_meta(r, c);
    uint64_t nb = r->g.classes[c].nblocks;
    uint64_t cur = atomic_load_explicit(top, memory_order_acquire);   /* [A-pop] */
    for (;;) {
        uint32_t idx = (uint32_t)cur;
        if (idx == FMQ_NIL)
            return FMQ_NOSPACE;
        if (idx >= nb)
            return fmq_fail(FMQ_ECORRUPT, "block pool free stack is corrupted");
        /* May be stale if idx was popped meanwhile; then the tag moved and the
         * CAS below fails, so a stale link is never installed. */
        uint32_t next = atomic_load_explicit(&meta[idx].next, memory_order_relaxed);
        uint64_t want = (((cur >> 32) + 1) << 32) | next;
        if (atomic_compare_exchange_weak_explicit(top, &cur, want, memory_order_acq_rel,
                                                  memory_order_acquire)) {   /* [A-pop] */
            *idx_out = idx;
            return FMQ_OK;
        }
    }
}

static void fmq_pool_push(fmq_region *r, uint32_t c, uint32_t idx) {
    _Atomic uint64_t *top = &r->ctl->free_top[c].v;
    fmq_block_meta *meta = fmq_pool_meta(r, c);
    uint64_t cur = atomic_load_explicit(top, memory_order_relaxed);
    for (;;) {
        atomic_store_explicit(&meta[idx].next, (uint32_t)cur, memory_order_relaxed);
        uint64_t want = (((cur >> 32) + 1) << 32) | idx;
        /* seq_cst (not just release): the wake that follows reads the waiter
         * count, see fmq_ring.c "waiting". */
        if (atomic_compare_exchange_weak_explicit(top, &cur, want, memory_order_seq_cst,
                                                  memory_order_relaxed))   /* [R-push] */
            return;
    }
}

static int fmq_pool_class_for(fmq_region *r, uint64_t nbytes) {
    for (uint32_t c = 0; c < r->g.nclasses; c++)
        if (r->g.classes[c].block_size >= nbytes)
            return (int)c;
    return -1;
}

/* model: pool.alloc */
int fmq_pool_alloc(fmq_region *r, uint64_t nbytes, uint32_t *block_out) {
    /* A slot records a message's length in 32 bits: never hand out room for
     * more than it can say. */
    if (nbytes > r->g.max_message_size || nbytes > UINT32_MAX)
        return FMQ_TOOBIG;
    int c0 = fmq_pool_class_for(r, nbytes);
    if (c0 < 0)
        return FMQ_TOOBIG;
    for (uint32_t c = (uint32_t)c0; c < r->g.nclasses; c++) {
        uint32_t idx = FMQ_NIL;
        int rc = fmq_pool_pop(r, c, &idx);
        if (rc == FMQ_NOSPACE)
            continue;
        if (rc != FMQ_OK)
            return rc;
        FMQ_CRASHPOINT("pool.alloc.popped");
        fmq_block_meta *m = &fmq_pool_meta(r, c)[idx];
        /* A free block's state is 0 and nobody else can see it, so the CAS
         * from 0 always succeeds -- unless the stack was scribbled and named
         * a block somebody holds: that one is never handed out (it stays off
         * the stack; the message that holds it is untouched). The window
         * between the pop above and this CAS is the one place a SIGKILL
         * leaks a block (it is then neither free nor named). */
        uint64_t zero = 0;
        if (!atomic_compare_exchange_strong_explicit(&m->state, &zero,
                                                     FMQ_BLK_MAKE(r->owner_tag, 0, 0),
                                                     memory_order_relaxed,
                                                     memory_order_relaxed))
            return fmq_fail(FMQ_ECORRUPT, "block pool free stack named block %#x, which is "
                                          "in use", FMQ_BLOCK_REF(c, idx));
        *block_out = FMQ_BLOCK_REF(c, idx);
        return FMQ_OK;
    }
    return FMQ_NOSPACE;
}

/* Is a block big enough for nbytes free right now? (wait predicate) */
int fmq_pool_available(fmq_region *r, uint64_t nbytes) {
    int c0 = fmq_pool_class_for(r, nbytes);
    if (c0 < 0)
        return 0;
    for (uint32_t c = (uint32_t)c0; c < r->g.nclasses; c++)
        if ((uint32_t)atomic_load_explicit(&r->ctl->free_top[c].v, memory_order_seq_cst) !=
            FMQ_NIL)
            return 1;
    return 0;
}

unsigned char *fmq_pool_ptr(fmq_region *r, uint32_t block) {
    if (!fmq_pool_valid(r, block))
        return NULL;
    uint32_t c = FMQ_BLOCK_CLASS(block);
    return r->base + r->g.classes[c].data_offset +
           (uint64_t)FMQ_BLOCK_INDEX(block) * r->g.classes[c].block_size;
}

uint64_t fmq_pool_block_size(fmq_region *r, uint32_t block) {
    return fmq_pool_valid(r, block) ? r->g.classes[FMQ_BLOCK_CLASS(block)].block_size : 0;
}

static inline _Atomic uint64_t *fmq_pool_state(fmq_region *r, uint32_t block) {
    return &fmq_pool_meta(r, FMQ_BLOCK_CLASS(block))[FMQ_BLOCK_INDEX(block)].state;
}

/* One hand-off: the bits under mask must equal expect; they become set.
 * When the word drops to 0 the block is free and goes back on its stack.
 * acq_rel: a holder's accesses to the block happen before the next holder's. */
int fmq_pool_transition(fmq_region *r, uint32_t block, uint64_t mask, uint64_t expect,
                        uint64_t set) {
    if (!fmq_pool_valid(r, block))
        return fmq_fail(FMQ_ECORRUPT, "invalid block reference %#x", block);
    _Atomic uint64_t *st = fmq_pool_state(r, block);
    uint64_t cur = atomic_load_explicit(st, memory_order_acquire);
    for (;;) {
        if ((cur & mask) != expect)
            return fmq_fail(FMQ_ELOST, "block %#x is not held as expected (state %#llx)",
                            block, (unsigned long long)cur);
        uint64_t want = (cur & ~mask) | set;
        if (atomic_compare_exchange_weak_explicit(st, &cur, want, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            if (want == 0) {
                FMQ_CRASHPOINT("pool.free.before_push");
                fmq_pool_push(r, FMQ_BLOCK_CLASS(block), FMQ_BLOCK_INDEX(block));
                fmq_ring_wake_producers(r);
            }
            return FMQ_OK;
        }
    }
}

/* model: pool.release_writer */
int fmq_pool_release_writer(fmq_region *r, uint32_t block) {
    return fmq_pool_transition(r, block, FMQ_WRITER_MASK, r->owner_tag, 0);
}

/* model: pool.release_reader */
int fmq_pool_release_reader(fmq_region *r, uint32_t block) {
    return fmq_pool_transition(r, block, FMQ_READER_MASK, (uint64_t)r->owner_tag << 24, 0);
}

void fmq_pool_free_block(fmq_region *r, uint32_t c, uint32_t idx) {
    fmq_pool_push(r, c, idx);
}
