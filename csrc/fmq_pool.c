/*
 * fmq_pool.c -- blocks for messages that do not fit in a slot, and the
 * memory behind them and behind the ring: reserved as it is first used,
 * given back when it is no longer needed.
 *
 * Virtual layout, physical use. The segment file is sparse (fmq_region.c
 * sizes it to the whole layout and reserves only the header, control lines
 * and participant table). Everything else is reserved with fallocate() just
 * before it is first touched, so a full /dev/shm shows up as an error code
 * at that call (the put waits like a full queue, or raises Full naming the
 * limit), never as a SIGBUS on a later store. On tmpfs a *read* of a hole
 * allocates too, so no code reads a range before it is reserved: scans stop
 * at ctl->ring_committed and ctl->carved[c].
 *
 * Ring. Slots are reserved in chunks of FMQ_RING_CHUNK as tickets of the
 * first lap approach the reserved end (fmq_ring_grow); lease entries in
 * chunks as takers find none free (fmq_lease_grow, ctl->lease_committed); while the queue is in use
 * ctl->ring_committed only grows, by a CAS-max after
 * the fallocate, so a grower killed in between leaves reserved but unused
 * pages that the next grower reserves again (fallocate is idempotent). While
 * the queue is in use its ring pages stay: a slot word carries its lap,
 * which a punched (zeroed) page would lose. A ring that has lapped once holds
 * slot_count * slot_stride bytes (lease entries likewise) until a process
 * alone with the queue finds it empty and gives both back
 * (fmq_ring_compact).
 *
 * Blocks: one budget, many sizes. Size classes grow by 4x from FMQ_MIN_BLOCK
 * to max_message_size; each class has enough block *indices* that messages
 * of that class alone can fill the whole budget (capacity_bytes / the
 * smallest message the class takes), so no class has a fixed share. A block
 * reserves only the pages its message needs (fmq_block_meta.pages), from its
 * start, and the budget (capacity_bytes rounded up to a page, so a message
 * of max_message_size always fits) counts reserved pages (ctl->pool_in_use), so the
 * loss to rounding is under one page per message plus at most
 * FMQ_TRIM_SLACK pages of a reused block (bigger excess is punched away).
 *
 * Each class is a lock-free LIFO free stack (Treiber) whose top word packs
 * {tag:32, index:32}; every successful push or pop increments the tag, so a
 * top that was popped and pushed back between our read and our CAS (ABA)
 * never matches. When a class's stacks are empty its next FMQ_CARVE blocks are
 * carved: their metadata page is reserved, ctl->carved[c] is advanced by one
 * CAS (whoever wins owns the new blocks), the first is kept and the rest are
 * pushed as one chain. A request takes the smallest class that fits and
 * borrows from larger ones when that one is exhausted.
 *
 * Giving memory back: warm memory follows recent demand. Each class has
 * two free stacks: warm blocks (pages still reserved, counted in
 * ctl->pool_kept; free_top) and cold ones (no pages; cold_top); allocation
 * prefers warm. The demand is the peak of the bytes in use
 * (ctl->pool_peak.v, raised by every allocation) over the current window of
 * FMQ_DEMAND_WINDOW_NS and the one before (pool_peak.prev); whoever first
 * sees a window end starts the next one (one CAS on pool_peak.since_ns).
 * A freed block stays warm while in use + warm stays within that demand, so
 * a queue that cycles a working set (a 1 MiB stream eight deep, a backlog
 * swinging between empty and a peak) reuses its pages without a syscall per
 * message; otherwise it is punched (FALLOC_FL_PUNCH_HOLE) and goes cold, and
 * while the total is over the demand each free cools two more warm blocks
 * (fmq_pool_cool). Once a queue has seen no demand for one to two windows,
 * the demand is what is in use now and every warm block goes back: at its
 * next free or allocation, while a consumer waits on it, when a consumer
 * finds it empty (fmq_pool_idle), or when another queue of the same process
 * does any of these (one sweep of the process's queues per window). There
 * is no floor: an idle queue keeps no block memory.
 *
 * Across queues. Warm memory is kept only while /dev/shm has room (an
 * eighth of it free, and no failed reservation in the last 20 ms; checked
 * with fstatvfs at most every FMQ_ROOM_CHECK_NS per handle), so queues
 * never park memory that others need; and a reservation that fails with
 * ENOSPC first sheds the warm blocks of every queue this process has open,
 * then tries once more.
 *
 * Ownership. A block's state word names its holders (see fmq_layout.h): the
 * writer, the reader, and whether a queued message refers to it. Every
 * hand-off (writer -> ring -> reader) is one CAS on that word, and the block
 * returns to its free stack when the word reaches zero, so memory that Python
 * can still see is never handed out again. pages is written only by whoever
 * has the block to itself (after its pop, or after the CAS to zero before
 * its push), raised only after a successful fallocate and lowered before a
 * punch: it never claims a page that is not reserved.
 *
 * Memory order. [R-push] the CAS that publishes a block on the stack is a
 * release, pairing with [A-pop], the acquire load/CAS that takes it: the link
 * and page record we read under it are the ones written before the push.
 * [R-carve] the carve CAS (release) pairs with [A-carve] (acquire loads of
 * carved[c]): a block index below carved has reserved metadata.
 *
 * Failure model. Because every holder is named, recovery (fmq_recover.c)
 * clears a dead participant's writer/reader share of every block and frees
 * the blocks nobody else holds. The unnamed instants are: between a pop and
 * the store of the writer tag; between the carve CAS and the push of the new
 * chain; between a block's last CAS to zero and its push (punching included).
 * Cooling (warm blocks popped, punched and pushed cold) is another. A SIGKILL
 * there leaves blocks free but on no stack; the audit (run by an opener that
 * is alone, fmq_pool_audit) pushes them back, punches pages that a kill left
 * reserved but unrecorded, and recomputes both counters from the per-block
 * records (a kill between a counter update and the record it mirrors leaves
 * the counter off until then). Every crash point below is one of these
 * steps. Every index read from shared memory is range-checked: a scribbled
 * stack gives FMQ_ECORRUPT, never a wild pointer; and a popped block is taken
 * by a CAS of its state from 0, so a scribbled stack that names a block
 * somebody holds never hands that block out again.
 */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/statvfs.h>

#include "fmq_internal.h"

#define FMQ_CARVE 256                      /* blocks per carve: one meta page  */
#define FMQ_TRIM_SLACK 16                  /* reused-block excess kept (pages) */
#define FMQ_SHM_RETRY_NS 20000000ull       /* after ENOSPC, report "no room" this
                                              long before trying again        */
#define FMQ_RING_CHUNK 256                 /* slots reserved per ring growth   */
#define FMQ_DEMAND_WINDOW_NS 1000000000ull /* warm memory follows the peak use
                                              of the last one to two of these */
#define FMQ_ROOM_CHECK_NS 10000000ull      /* fstatvfs of /dev/shm at most this
                                              often per handle                */
#define FMQ_IDLE_COOL_MAX 4096             /* blocks one idle call punches (it
                                              runs in a caller's get)         */
#ifdef MADV_POPULATE_WRITE
#define FMQ_MADV_POPULATE_WRITE MADV_POPULATE_WRITE
#else
#define FMQ_MADV_POPULATE_WRITE 23          /* Linux 5.14; older kernels: EINVAL */
#endif

_Static_assert(FMQ_CARVE * sizeof(fmq_block_meta) == FMQ_PAGE,
               "a carve reserves exactly one page of block metadata");

/* ======================================================================== */
/* reserving and releasing file ranges                                      */
/* ======================================================================== */

static uint64_t fmq_pool_shed(fmq_region *r);

static int fmq_mem_reserve(fmq_region *r, uint64_t off, uint64_t len) {
    if (len == 0)
        return FMQ_OK;
    uint64_t a = off / FMQ_PAGE * FMQ_PAGE;
    uint64_t b = (off + len + FMQ_PAGE - 1) / FMQ_PAGE * FMQ_PAGE;
    if (b > r->g.total_size)
        b = r->g.total_size;
    int shed = 0;
    for (;;) {
        if (fallocate(r->fd, 0, (off_t)a, (off_t)(b - a)) == 0)
            return FMQ_OK;
        if (errno == EINTR)
            continue;
        /* /dev/shm is full: the warm free blocks of this process's queues
         * go first (ours whatever happens), then one more try. */
        if (errno == ENOSPC && !shed++ && fmq_pool_shed(r) > 0)
            continue;
        if (errno == ENOSPC || errno == ENOMEM || errno == EFBIG) {
            atomic_store_explicit(&r->ctl->shm_full_ns.v, fmq_now_ns(), memory_order_relaxed);
            return FMQ_NOSPACE;
        }
        /* EOPNOTSUPP (not tmpfs): pages come on first touch, as with any file. */
        return FMQ_OK;
    }
}

static void fmq_mem_release(fmq_region *r, uint64_t off, uint64_t len) {
    uint64_t a = (off + FMQ_PAGE - 1) / FMQ_PAGE * FMQ_PAGE;
    uint64_t b = (off + len) / FMQ_PAGE * FMQ_PAGE;
    if (b > a)
        (void)fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)a,
                        (off_t)(b - a));
}

static int fmq_shm_full_within(fmq_region *r, uint64_t ns) {
    uint64_t t = atomic_load_explicit(&r->ctl->shm_full_ns.v, memory_order_relaxed);
    return t && fmq_now_ns() - t < ns;
}

static int fmq_shm_recently_full(fmq_region *r) {
    return fmq_shm_full_within(r, FMQ_SHM_RETRY_NS);
}

/* ======================================================================== */
/* the ring's reserved prefix                                               */
/* ======================================================================== */

uint64_t fmq_ring_committed(const fmq_region *r) {
    uint64_t w = atomic_load_explicit(&r->ctl->ring_committed.v, memory_order_acquire);
    return w < r->g.slot_count ? w : r->g.slot_count;   /* validated: never past the ring */
}

/* Make slots up to ticket t + FMQ_RING_MARGIN (first lap) readable and
 * writable. FMQ_FULL when /dev/shm has no room for them: the producer then
 * waits like on a full ring. */
int fmq_ring_grow(fmq_region *r, uint64_t t) {
    uint64_t n = r->g.slot_count;
    uint64_t w = fmq_ring_committed(r);   /* [A-ring] pairs with [R-ring] */
    for (;;) {
        if (w >= n) {
            r->ring_ready = UINT64_MAX;    /* every slot is reserved: fast path */
            return FMQ_OK;
        }
        if (t < n && t + FMQ_RING_MARGIN < w) {
            r->ring_ready = w;
            return FMQ_OK;
        }
        if (t >= n) {
            /* A ticket past the first lap with the ring not fully reserved:
             * the ring words say more tickets were taken than ever reserved. */
            return fmq_fail(FMQ_ECORRUPT, "ring reservation mark %llu is behind ticket %llu",
                            (unsigned long long)w, (unsigned long long)t);
        }
        uint64_t want = (t + FMQ_RING_MARGIN + FMQ_RING_CHUNK) / FMQ_RING_CHUNK * FMQ_RING_CHUNK;
        if (want > n)
            want = n;
        if (fmq_mem_reserve(r, r->g.ring_offset + w * r->g.slot_stride,
                            (want - w) * r->g.slot_stride) != FMQ_OK) {
            if (t + 1 < w) {
                r->ring_ready = w;         /* no headroom, but this ticket fits */
                return FMQ_OK;
            }
            return FMQ_FULL;
        }
        FMQ_CRASHPOINT("ring.grow.reserved");
        /* [R-ring] the pages are reserved before anyone may touch them. */
        if (atomic_compare_exchange_strong_explicit(&r->ctl->ring_committed.v, &w, want,
                                                    memory_order_release,
                                                    memory_order_acquire))
            w = want;
        /* else w is the newer mark someone else set: look again */
    }
}

uint64_t fmq_lease_committed(const fmq_region *r) {
    uint64_t w = atomic_load_explicit(&r->ctl->lease_committed.v, memory_order_acquire);
    return w < r->g.slot_count ? w : r->g.slot_count;   /* validated: never past the table */
}

/* The lease table had n entries, none free: reserve another chunk (FMQ_OK),
 * or FMQ_FULL if it is whole or /dev/shm has no room (the taker waits). */
int fmq_lease_grow(fmq_region *r, uint64_t n) {
    uint64_t w = fmq_lease_committed(r);   /* [A-ring] */
    if (w > n)
        return FMQ_OK;                     /* someone else grew it */
    if (w >= r->g.slot_count)
        return FMQ_FULL;
    uint64_t want = w + FMQ_RING_CHUNK < r->g.slot_count ? w + FMQ_RING_CHUNK : r->g.slot_count;
    if (fmq_mem_reserve(r, r->g.lease_offset + w * r->g.lease_stride,
                        (want - w) * r->g.lease_stride) != FMQ_OK)
        return FMQ_FULL;
    FMQ_CRASHPOINT("lease.grow.reserved");
    /* [R-ring]; a lost race means someone else grew it: fine either way */
    atomic_compare_exchange_strong_explicit(&r->ctl->lease_committed.v, &w, want,
                                            memory_order_release, memory_order_relaxed);
    return FMQ_OK;
}

/* May a producer waiting for a slot at ticket t try again? */
int fmq_ring_room(fmq_region *r, uint64_t t) {
    if (t + FMQ_RING_MARGIN < r->ring_ready)
        return 1;
    uint64_t w = fmq_ring_committed(r);
    if (w >= r->g.slot_count || t + FMQ_RING_MARGIN < w)
        return 1;
    return !fmq_shm_recently_full(r);
}

/* Giving the ring back. A slot word carries its lap, so the pages of a ring
 * in use can never be punched (they would read as lap 0). But an empty ring
 * with no leased entry is, word for word, a fresh ring at another ticket: a
 * process alone with the segment (fmq_recover.c's audit, at a lone open or
 * at the close of the last handle of a named queue: nobody else can touch
 * the ring, and openers wait until the segment is READY again) punches the
 * ring and the lease table whole and starts the tickets again at 0, as a
 * new queue's. Nothing refers to a ticket of an empty ring: no slot is
 * READY or held, no entry is leased (so no lease token, source ticket or
 * stall names one). ctl->ring_compacting is set first and cleared last; a
 * process killed in between leaves it set, and the opener that ends the dead
 * audit finishes the job (fmq_ring_compact_finish) before the segment is
 * READY: every step is idempotent. */
int fmq_ring_compact(fmq_region *r) {
    uint64_t w = fmq_ring_committed(r), lw = fmq_lease_committed(r);
    uint64_t tail = atomic_load_explicit(&r->ctl->tail.v, memory_order_relaxed);
    uint64_t head = atomic_load_explicit(&r->ctl->head.v, memory_order_relaxed);
    if (head != tail || (w <= FMQ_RING_CHUNK && lw <= FMQ_RING_CHUNK && tail < FMQ_RING_CHUNK))
        return 0;   /* not empty, or nothing worth giving back */
    /* Acquire, as any reader of these words: alone, nothing moves them. */
    for (uint64_t i = 0; i < w; i++) {
        uint64_t word = atomic_load_explicit(&fmq_slot_at(r, i)->word, memory_order_acquire);
        if (fmq_slot_phase(word) != FMQ_PH_EMPTY)
            return 0;
    }
    for (uint64_t i = 0; i < lw; i++) {
        const fmq_lease *e = (const fmq_lease *)(r->leases + i * r->g.lease_stride);
        if (FMQ_LSTATE(atomic_load_explicit(&e->word, memory_order_acquire)) != FMQ_LS_FREE)
            return 0;
    }
    atomic_store_explicit(&r->ctl->ring_compacting.v, 1, memory_order_seq_cst);
    FMQ_CRASHPOINT("ring.compact.begun");
    fmq_ring_compact_finish(r);
    return 1;
}

void fmq_ring_compact_finish(fmq_region *r) {
    if (atomic_load_explicit(&r->ctl->ring_compacting.v, memory_order_acquire) != 1)
        return;
    fmq_ctl *ctl = r->ctl;
    atomic_store_explicit(&ctl->ring_committed.v, 0, memory_order_relaxed);
    atomic_store_explicit(&ctl->lease_committed.v, 0, memory_order_relaxed);
    r->ring_ready = 0;
    /* Every page of both, whatever the marks said: a punched hole reads as
     * an all-zero slot word (EMPTY for lap 0) and a FREE entry. */
    fmq_mem_release(r, r->g.ring_offset, r->g.slot_count * r->g.slot_stride);
    FMQ_CRASHPOINT("ring.compact.punched");
    fmq_mem_release(r, r->g.lease_offset, r->g.slot_count * r->g.lease_stride);
    atomic_store_explicit(&ctl->head.v, 0, memory_order_relaxed);
    atomic_store_explicit(&ctl->tail.v, 0, memory_order_relaxed);
    atomic_store_explicit(&ctl->lease_hint.v, 0, memory_order_relaxed);
    atomic_store_explicit(&ctl->stall.ticket, 0, memory_order_relaxed);
    /* The first chunks, as a new queue has them (best effort: a full
     * /dev/shm leaves them to the first put, which waits for room). */
    (void)fmq_ring_grow(r, 0);
    (void)fmq_lease_grow(r, 0);
    atomic_store_explicit(&ctl->ring_compacting.v, 0, memory_order_seq_cst);
}

/* ======================================================================== */
/* blocks                                                                   */
/* ======================================================================== */

uint64_t fmq_pool_carved(fmq_region *r, uint32_t c) {
    uint64_t k = atomic_load_explicit(&r->ctl->carved[c], memory_order_acquire); /* [A-carve] */
    return k < r->g.classes[c].nblocks ? k : r->g.classes[c].nblocks;
}

static inline int fmq_pool_valid(fmq_region *r, uint32_t block) {
    uint32_t c = FMQ_BLOCK_CLASS(block);
    return c < r->g.nclasses && FMQ_BLOCK_INDEX(block) < fmq_pool_carved(r, c);
}

static inline unsigned char *fmq_block_data(fmq_region *r, uint32_t c, uint32_t idx) {
    return r->base + r->g.classes[c].data_offset + (uint64_t)idx * r->g.classes[c].block_size;
}

static inline uint64_t fmq_block_off(fmq_region *r, uint32_t c, uint32_t idx) {
    return r->g.classes[c].data_offset + (uint64_t)idx * r->g.classes[c].block_size;
}

/* Counters: a crash can leave them off (see header), so never wrap below 0. */
static void fmq_sub_sat(_Atomic uint64_t *v, uint64_t n) {
    uint64_t cur = atomic_load_explicit(v, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(v, &cur, cur > n ? cur - n : 0,
                                                  memory_order_relaxed, memory_order_relaxed))
        ;
}

static inline _Atomic uint64_t *fmq_pool_top(fmq_region *r, uint32_t c, int cold) {
    return cold ? &r->ctl->cold_top[c].v : &r->ctl->free_top[c].v;
}

static int fmq_pool_pop_stack(fmq_region *r, uint32_t c, int cold, uint32_t *idx_out) {
    _Atomic uint64_t *top = fmq_pool_top(r, c, cold);
    fmq_block_meta *meta = fmq_pool_meta(r, c);
    uint64_t cur = atomic_load_explicit(top, memory_order_acquire);   /* [A-pop] */
    for (;;) {
        uint32_t idx = FMQ_TOP_INDEX(cur);
        if (idx == FMQ_NIL)
            return FMQ_NOSPACE;
        if (idx >= fmq_pool_carved(r, c))
            return fmq_fail(FMQ_ECORRUPT, "block pool free stack is corrupted");
        /* May be stale if idx was popped meanwhile; then the tag moved and the
         * CAS below fails, so a stale link is never installed. */
        uint32_t next = atomic_load_explicit(&meta[idx].next, memory_order_relaxed);
        uint64_t want = FMQ_TOP_NEXT(cur, next);
        if (atomic_compare_exchange_weak_explicit(top, &cur, want, memory_order_acq_rel,
                                                  memory_order_acquire)) {   /* [A-pop] */
            *idx_out = idx;
            return FMQ_OK;
        }
    }
}

/* A free block of class c: a warm one (pages reserved) first, else a cold one. */
static int fmq_pool_pop(fmq_region *r, uint32_t c, uint32_t *idx_out) {
    int rc = fmq_pool_pop_stack(r, c, 0, idx_out);
    return rc == FMQ_NOSPACE ? fmq_pool_pop_stack(r, c, 1, idx_out) : rc;
}

/* Push the chain first..last (already linked first -> ... -> last). */
static void fmq_pool_push_chain(fmq_region *r, uint32_t c, int cold, uint32_t first,
                                uint32_t last) {
    _Atomic uint64_t *top = fmq_pool_top(r, c, cold);
    fmq_block_meta *meta = fmq_pool_meta(r, c);
    uint64_t cur = atomic_load_explicit(top, memory_order_relaxed);
    for (;;) {
        atomic_store_explicit(&meta[last].next, FMQ_TOP_INDEX(cur), memory_order_relaxed);
        uint64_t want = FMQ_TOP_NEXT(cur, first);
        /* seq_cst (not just release): the wake that follows reads the waiter
         * count, see fmq_ring.c "waiting". */
        if (atomic_compare_exchange_weak_explicit(top, &cur, want, memory_order_seq_cst,
                                                  memory_order_relaxed))   /* [R-push] */
            return;
    }
}

/* Onto the warm stack if the block has pages, else the cold one. */
static void fmq_pool_push(fmq_region *r, uint32_t c, uint32_t idx) {
    int cold = atomic_load_explicit(&fmq_pool_meta(r, c)[idx].pages, memory_order_relaxed) == 0;
    fmq_pool_push_chain(r, c, cold, idx, idx);
}

/* Carve the next FMQ_CARVE blocks of class c; the first is returned to the
 * caller (to itself, state 0), the rest go on the stack. FMQ_AGAIN: another
 * process carved first, pop again. */
static int fmq_pool_carve(fmq_region *r, uint32_t c, uint32_t *idx_out) {
    uint64_t nb = r->g.classes[c].nblocks;
    uint64_t k = fmq_pool_carved(r, c);
    if (k >= nb)
        return FMQ_NOSPACE;
    uint64_t n = nb - k < FMQ_CARVE ? nb - k : FMQ_CARVE;
    int rc = fmq_mem_reserve(r, r->g.classes[c].meta_offset + k * sizeof(fmq_block_meta),
                             n * sizeof(fmq_block_meta));
    if (rc != FMQ_OK)
        return rc;
    FMQ_CRASHPOINT("pool.grow.reserved");
    uint64_t expect = k;
    if (!atomic_compare_exchange_strong_explicit(&r->ctl->carved[c], &expect, k + n,
                                                 memory_order_release,    /* [R-carve] */
                                                 memory_order_relaxed))
        return FMQ_AGAIN;
    FMQ_CRASHPOINT("pool.grow.carved");
    /* Blocks k..k+n-1 are ours and never used: their metadata is zero (free,
     * no pages). Keep k, push the rest as one chain. */
    fmq_block_meta *meta = fmq_pool_meta(r, c);
    if (n > 1) {
        for (uint64_t i = k + 1; i + 1 < k + n; i++)
            atomic_store_explicit(&meta[i].next, (uint32_t)(i + 1), memory_order_relaxed);
        fmq_pool_push_chain(r, c, 1, (uint32_t)(k + 1), (uint32_t)(k + n - 1));
        fmq_wake_space(r);
    }
    *idx_out = (uint32_t)k;
    return FMQ_OK;
}

/* Punch up to max_blocks warm free blocks (class c0 first, then the
 * others) and move them to the cold stacks: for a full /dev/shm (the space
 * goes to what needs it: a ring chunk, a bigger block) and for the warm
 * watermark. A kill between the pop and the push leaves a block on no stack
 * (the audit's). Returns bytes freed. */
static uint64_t fmq_pool_cool(fmq_region *r, uint32_t c0, int skip_c0, uint64_t max_blocks) {
    uint64_t freed = 0, done = 0;
    for (uint32_t k = skip_c0 ? 1 : 0; k < r->g.nclasses && done < max_blocks; k++) {
        uint32_t c = (c0 + k) % r->g.nclasses, idx;
        /* A sane stack holds at most the class's blocks: a scribbled one
         * with a cycle must not keep us here forever. */
        for (uint64_t n = fmq_pool_carved(r, c);
             n-- && done < max_blocks && fmq_pool_pop_stack(r, c, 0, &idx) == FMQ_OK;) {
            FMQ_CRASHPOINT("pool.cool.popped");
            fmq_block_meta *m = &fmq_pool_meta(r, c)[idx];
            /* Taken as fmq_pool_alloc takes a block (CAS from 0 to our writer
             * tag): a scribbled stack that names a block somebody holds
             * never gets its pages punched; that block stays off the stack
             * (its holder's free pushes it). A kill while we hold it leaves
             * a dead writer's share, which recovery frees. */
            uint64_t zero = 0;
            if (!atomic_compare_exchange_strong_explicit(&m->state, &zero,
                                                         FMQ_BLK_MAKE(r->owner_tag, 0, 0),
                                                         memory_order_acquire,
                                                         memory_order_relaxed))
                continue;
            uint64_t bytes =
                (uint64_t)atomic_load_explicit(&m->pages, memory_order_relaxed) * FMQ_PAGE;
            atomic_store_explicit(&m->pages, 0, memory_order_relaxed);   /* record low first */
            fmq_sub_sat(&r->ctl->pool_kept.v, bytes);
            fmq_mem_release(r, fmq_block_off(r, c, idx), bytes);
            atomic_store_explicit(&m->state, 0, memory_order_release);   /* free again */
            fmq_pool_push(r, c, idx);   /* cold now */
            freed += bytes;
            done++;
        }
    }
    return freed;
}

static void fmq_pool_shed_other(fmq_region *o, void *freed) {
    *(uint64_t *)freed += fmq_pool_cool(o, 0, 0, UINT64_MAX);
}

void fmq_pool_cool_all(fmq_region *r) { (void)fmq_pool_cool(r, 0, 0, UINT64_MAX); }

/* /dev/shm is full: every warm block of this process's queues goes. */
static uint64_t fmq_pool_shed(fmq_region *r) {
    uint64_t freed = fmq_pool_cool(r, 0, 0, UINT64_MAX);
    fmq_live_each(fmq_pool_shed_other, &freed);
    return freed;
}

/* ======================================================================== */
/* how much stays warm                                                      */
/* ======================================================================== */

/* A new level of use, right after an allocation counted it. */
static void fmq_demand_note(fmq_region *r, uint64_t used) {
    _Atomic uint64_t *peak = &r->ctl->pool_peak.v;
    uint64_t cur = atomic_load_explicit(peak, memory_order_relaxed);
    while (used > cur && !atomic_compare_exchange_weak_explicit(peak, &cur, used,
                                                                memory_order_relaxed,
                                                                memory_order_relaxed))
        ;
}

/* The recent demand: the peak use of this window and the one before, after
 * starting a new window if this one is over. A window that ended two or more
 * windows ago says nothing about now: the queue was idle since, so only what
 * is in use counts. The words are hints shared without ordering (a lost
 * update only moves a block between warm and cold); a scribbled start in
 * the future is simply over, and the result never exceeds the budget. */
static uint64_t fmq_demand(fmq_region *r, uint64_t now) {
    fmq_ctl *ctl = r->ctl;
    uint64_t since = atomic_load_explicit(&ctl->pool_peak.since_ns, memory_order_relaxed);
    if (now - since >= FMQ_DEMAND_WINDOW_NS &&
        atomic_compare_exchange_strong_explicit(&ctl->pool_peak.since_ns, &since, now,
                                                memory_order_relaxed, memory_order_relaxed)) {
        uint64_t use = atomic_load_explicit(&ctl->pool_in_use.v, memory_order_relaxed);
        uint64_t last = atomic_exchange_explicit(&ctl->pool_peak.v, use, memory_order_relaxed);
        atomic_store_explicit(&ctl->pool_peak.prev,
                              now - since >= 2 * FMQ_DEMAND_WINDOW_NS ? 0 : last,
                              memory_order_relaxed);
    }
    uint64_t a = atomic_load_explicit(&ctl->pool_peak.v, memory_order_relaxed);
    uint64_t b = atomic_load_explicit(&ctl->pool_peak.prev, memory_order_relaxed);
    uint64_t d = a > b ? a : b;
    return d < r->budget ? d : r->budget;
}

/* May free blocks stay warm? Not while /dev/shm is short of room (under an
 * eighth free, or a reservation failed lately): memory parked here would
 * make another queue's put wait. One fstatvfs per FMQ_ROOM_CHECK_NS per
 * handle; the two cached words are per process and only a hint, so threads
 * racing on them need no more than relaxed atomics. */
static int fmq_shm_roomy(fmq_region *r, uint64_t now) {
    if (fmq_shm_recently_full(r))
        return 0;
    uint64_t at = __atomic_load_n(&r->room_checked_ns, __ATOMIC_RELAXED);
    if (now - at < FMQ_ROOM_CHECK_NS)
        return __atomic_load_n(&r->roomy, __ATOMIC_RELAXED);
    struct statvfs st;
    int roomy = fstatvfs(r->fd, &st) != 0 || st.f_blocks == 0 ||   /* unknown: keep */
                st.f_bavail >= st.f_blocks / 8;
    __atomic_store_n(&r->roomy, roomy, __ATOMIC_RELAXED);
    __atomic_store_n(&r->room_checked_ns, now, __ATOMIC_RELAXED);
    return roomy;
}

/* Punch warm blocks until in use + warm is within the demand (at most max
 * of them). */
static void fmq_pool_trim(fmq_region *r, uint64_t now, uint64_t max) {
    uint64_t limit = fmq_demand(r, now);
    if (!fmq_shm_roomy(r, now))
        limit = 0;
    for (uint64_t n = 0; n < max; n++) {
        uint64_t use = atomic_load_explicit(&r->ctl->pool_in_use.v, memory_order_relaxed);
        uint64_t kept = atomic_load_explicit(&r->ctl->pool_kept.v, memory_order_relaxed);
        if (kept == 0 || use + kept <= limit || fmq_pool_cool(r, 0, 0, 1) == 0)
            return;
    }
}

typedef struct {
    const fmq_region *me;
    uint64_t now;
} fmq_sweep_arg;

static void fmq_pool_trim_other(fmq_region *o, void *arg) {
    const fmq_sweep_arg *a = arg;
    /* the caller's own queue (any handle of it) follows its own frees */
    if (strcmp(o->name, a->me->name) != 0)
        fmq_pool_trim(o, a->now, FMQ_IDLE_COOL_MAX);
}

/* Once a window per process: trim every other queue this process has open,
 * so an idle queue gives its warm memory back when any of them is used. */
static void fmq_pool_sweep(const fmq_region *me, uint64_t now) {
    static _Atomic uint64_t next_sweep;
    uint64_t due = atomic_load_explicit(&next_sweep, memory_order_relaxed);
    if (now < due && due - now <= FMQ_DEMAND_WINDOW_NS)
        return;
    if (!atomic_compare_exchange_strong_explicit(&next_sweep, &due, now + FMQ_DEMAND_WINDOW_NS,
                                                 memory_order_relaxed, memory_order_relaxed))
        return;   /* another thread sweeps */
    fmq_sweep_arg a = {me, now};
    fmq_live_each(fmq_pool_trim_other, &a);
}

/* A consumer found this queue empty, or is waiting on it. */
void fmq_pool_idle(fmq_region *r) {
    uint64_t now = fmq_now_ns();
    if (atomic_load_explicit(&r->ctl->pool_kept.v, memory_order_relaxed) != 0)
        fmq_pool_trim(r, now, FMQ_IDLE_COOL_MAX);
    fmq_pool_sweep(r, now);
}

/* Give block (c, idx), which nobody holds any more (state 0) and which is on
 * no stack, back: its pages stay reserved (warm) while in use + warm stays
 * within the recent demand and /dev/shm has room, otherwise they are
 * punched; then it is pushed. */
static void fmq_pool_put_back(fmq_region *r, uint32_t c, uint32_t idx, int was_held) {
    fmq_block_meta *m = &fmq_pool_meta(r, c)[idx];
    uint64_t bytes = (uint64_t)atomic_load_explicit(&m->pages, memory_order_relaxed) * FMQ_PAGE;
    uint64_t now = fmq_now_ns();
    uint64_t limit = fmq_demand(r, now);   /* first: a new window counts this block */
    if (was_held)
        fmq_sub_sat(&r->ctl->pool_in_use.v, bytes);
    uint64_t use = atomic_load_explicit(&r->ctl->pool_in_use.v, memory_order_relaxed);
    uint64_t kept = atomic_load_explicit(&r->ctl->pool_kept.v, memory_order_relaxed);
    int warm = 0;
    if (bytes && fmq_shm_roomy(r, now)) {
        /* Over the demand, warm blocks of other classes go before this one:
         * they are older, and of a size not in use right now (a queue that
         * moved from one message size to another keeps the new size warm). */
        for (int n = 0; n < 4 && use + kept + bytes > limit && kept; n++) {
            if (fmq_pool_cool(r, c, 1, 1) == 0)
                break;
            use = atomic_load_explicit(&r->ctl->pool_in_use.v, memory_order_relaxed);
            kept = atomic_load_explicit(&r->ctl->pool_kept.v, memory_order_relaxed);
        }
        warm = use + kept + bytes <= limit;
    }
    if (warm) {
        atomic_fetch_add_explicit(&r->ctl->pool_kept.v, bytes, memory_order_relaxed);
    } else if (bytes) {
        atomic_store_explicit(&m->pages, 0, memory_order_relaxed);   /* record low first */
        FMQ_CRASHPOINT("pool.free.unrecorded");
        fmq_mem_release(r, fmq_block_off(r, c, idx), bytes);
        FMQ_CRASHPOINT("pool.free.punched");
    }
    FMQ_CRASHPOINT("pool.free.before_push");
    fmq_pool_push(r, c, idx);
    fmq_wake_space(r);
    /* Over the demand (the backlog shrank, or its window passed): cool two
     * warm blocks per free, so the warm total falls faster than the use. */
    if (!warm && kept && use + kept > limit)
        fmq_pool_cool(r, c, 0, 2);
    fmq_pool_sweep(r, now);
}

/* Reserve `need` pages from the start of the block we hold alone and count
 * them in the budget; trim a reused block's big excess. */
static int fmq_pool_commit(fmq_region *r, uint32_t c, uint32_t idx, uint64_t need) {
    fmq_block_meta *m = &fmq_pool_meta(r, c)[idx];
    uint64_t have = atomic_load_explicit(&m->pages, memory_order_relaxed);
    uint64_t keep = have > need + FMQ_TRIM_SLACK ? need : (have > need ? have : need);
    uint64_t used = atomic_fetch_add_explicit(&r->ctl->pool_in_use.v, keep * FMQ_PAGE,
                                              memory_order_relaxed) + keep * FMQ_PAGE;
    if (used > r->budget) {
        fmq_sub_sat(&r->ctl->pool_in_use.v, keep * FMQ_PAGE);
        r->nospace_why = FMQ_WHY_CAP;
        return FMQ_NOSPACE;
    }
    fmq_demand_note(r, used);
    if (have) /* no longer warm */
        fmq_sub_sat(&r->ctl->pool_kept.v, have * FMQ_PAGE);
    if (have < need) {
        if (fmq_mem_reserve(r, fmq_block_off(r, c, idx) + have * FMQ_PAGE,
                            (need - have) * FMQ_PAGE) != FMQ_OK) {
            fmq_sub_sat(&r->ctl->pool_in_use.v, keep * FMQ_PAGE);
            if (have)
                atomic_fetch_add_explicit(&r->ctl->pool_kept.v, have * FMQ_PAGE,
                                          memory_order_relaxed);
            r->nospace_why = FMQ_WHY_SHM;
            return FMQ_NOSPACE;
        }
        FMQ_CRASHPOINT("pool.commit.reserved");
        atomic_store_explicit(&m->pages, (uint32_t)need, memory_order_relaxed);
        /* Map the fresh pages writable in one call rather than one fault per
         * page as the copy touches them (a hint: failure costs nothing). */
        if (need - have >= 16)
            (void)madvise(fmq_block_data(r, c, idx) + have * FMQ_PAGE,
                          (need - have) * FMQ_PAGE, FMQ_MADV_POPULATE_WRITE);
    } else if (keep < have) {
        atomic_store_explicit(&m->pages, (uint32_t)keep, memory_order_relaxed);
        FMQ_CRASHPOINT("pool.commit.trimmed");
        fmq_mem_release(r, fmq_block_off(r, c, idx) + keep * FMQ_PAGE,
                        (have - keep) * FMQ_PAGE);
    }
    return FMQ_OK;
}

static int fmq_pool_class_for(fmq_region *r, uint64_t nbytes) {
    for (uint32_t c = 0; c < r->g.nclasses; c++)
        if (r->g.classes[c].block_size >= nbytes)
            return (int)c;
    return -1;
}

static inline uint64_t fmq_pages_for(uint64_t nbytes) {
    return nbytes ? (nbytes + FMQ_PAGE - 1) / FMQ_PAGE : 1;
}

/* model: pool.alloc */
int fmq_pool_alloc(fmq_region *r, uint64_t nbytes, uint32_t *block_out) {
    /* A slot records a message's length in 32 bits (FMQ_MAX_MESSAGE): never
     * hand out room for more than it can say. */
    if (nbytes > r->g.max_message_size || nbytes > FMQ_MAX_MESSAGE)
        return FMQ_TOOBIG;
    int c0 = fmq_pool_class_for(r, nbytes);
    if (c0 < 0)
        return FMQ_TOOBIG;
    uint64_t need = fmq_pages_for(nbytes);
    if (atomic_load_explicit(&r->ctl->pool_in_use.v, memory_order_relaxed) + need * FMQ_PAGE >
        r->budget) {
        r->nospace_why = FMQ_WHY_CAP;
        return FMQ_NOSPACE;
    }
    r->nospace_why = FMQ_WHY_CAP;
    for (uint32_t c = (uint32_t)c0; c < r->g.nclasses; c++) {
        uint32_t idx = FMQ_NIL;
        int rc = fmq_pool_pop(r, c, &idx);
        while (rc == FMQ_NOSPACE && (rc = fmq_pool_carve(r, c, &idx)) == FMQ_AGAIN)
            rc = fmq_pool_pop(r, c, &idx);
        if (rc == FMQ_NOSPACE) {
            if (fmq_shm_recently_full(r))
                r->nospace_why = FMQ_WHY_SHM;
            continue;
        }
        if (rc != FMQ_OK)
            return rc;
        FMQ_CRASHPOINT("pool.alloc.popped");
        fmq_block_meta *m = &fmq_pool_meta(r, c)[idx];
        /* A free block's state is 0 and nobody else can see it, so the CAS
         * from 0 always succeeds -- unless the stack was scribbled and named
         * a block somebody holds: that one is never handed out (it stays off
         * the stack; the message that holds it is untouched). The window
         * between the pop above and this CAS is one of the places a SIGKILL
         * leaves a block free on no stack (the audit's). */
        uint64_t zero = 0;
        if (!atomic_compare_exchange_strong_explicit(&m->state, &zero,
                                                     FMQ_BLK_MAKE(r->owner_tag, 0, 0),
                                                     memory_order_relaxed,
                                                     memory_order_relaxed))
            return fmq_fail(FMQ_ECORRUPT, "block pool free stack named block %#x, which is "
                                          "in use", FMQ_BLOCK_REF(c, idx));
        if ((rc = fmq_pool_commit(r, c, idx, need)) != FMQ_OK) {
            atomic_store_explicit(&m->state, 0, memory_order_relaxed);
            fmq_pool_put_back(r, c, idx, 0);
            return rc;
        }
        *block_out = FMQ_BLOCK_REF(c, idx);
        fmq_pool_sweep(r, fmq_now_ns());   /* once a window: the process's idle queues */
        return FMQ_OK;
    }
    return FMQ_NOSPACE;
}

/* Could an allocation of nbytes succeed right now? (wait predicate) */
int fmq_pool_available(fmq_region *r, uint64_t nbytes) {
    int c0 = fmq_pool_class_for(r, nbytes);
    if (c0 < 0)
        return 0;
    uint64_t need = fmq_pages_for(nbytes);
    if (atomic_load_explicit(&r->ctl->pool_in_use.v, memory_order_seq_cst) + need * FMQ_PAGE >
        r->budget)
        return 0;
    int shm_full = fmq_shm_recently_full(r);
    for (uint32_t c = (uint32_t)c0; c < r->g.nclasses; c++) {
        uint32_t warm = FMQ_TOP_INDEX(
            atomic_load_explicit(&r->ctl->free_top[c].v, memory_order_seq_cst));
        uint32_t cold = FMQ_TOP_INDEX(
            atomic_load_explicit(&r->ctl->cold_top[c].v, memory_order_seq_cst));
        if (warm != FMQ_NIL && warm < fmq_pool_carved(r, c) &&
            (!shm_full ||
             atomic_load_explicit(&fmq_pool_meta(r, c)[warm].pages, memory_order_relaxed) >=
                 need))
            return 1;
        if (!shm_full && (cold != FMQ_NIL ||
                          fmq_pool_carved(r, c) < r->g.classes[c].nblocks))
            return 1;
    }
    return 0;
}

unsigned char *fmq_pool_ptr(fmq_region *r, uint32_t block) {
    if (!fmq_pool_valid(r, block))
        return NULL;
    return fmq_block_data(r, FMQ_BLOCK_CLASS(block), FMQ_BLOCK_INDEX(block));
}

/* The bytes of the block a holder may touch: its reserved pages (a message
 * never needs more; a scribbled length beyond them is refused by callers). */
uint64_t fmq_pool_block_size(fmq_region *r, uint32_t block) {
    if (!fmq_pool_valid(r, block))
        return 0;
    fmq_block_meta *m = &fmq_pool_meta(r, FMQ_BLOCK_CLASS(block))[FMQ_BLOCK_INDEX(block)];
    uint64_t pages = atomic_load_explicit(&m->pages, memory_order_relaxed) * (uint64_t)FMQ_PAGE;
    uint64_t bs = r->g.classes[FMQ_BLOCK_CLASS(block)].block_size;
    return pages < bs ? pages : bs;
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
            if (want == 0)
                fmq_pool_put_back(r, FMQ_BLOCK_CLASS(block), FMQ_BLOCK_INDEX(block), 1);
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
    return fmq_pool_transition(r, block, FMQ_READER_MASK, FMQ_BLK_AS_READER(r->owner_tag), 0);
}

/* Recovery freed a block a dead holder had (its state is 0 now). */
void fmq_pool_free_block(fmq_region *r, uint32_t c, uint32_t idx) {
    fmq_pool_put_back(r, c, idx, 1);
}

/* The audit (fmq_recover.c, with nobody else using the segment): every carved
 * block must be on its stack or named by a holder. A block that is neither
 * was dropped in an unnamed instant (see header) and goes back; free blocks
 * lose pages a kill left reserved past their record; both counters are
 * recomputed from the records. Returns the number of blocks put back. */
uint64_t fmq_pool_audit(fmq_region *r) {
    uint64_t reclaimed = 0, in_use = 0, kept = 0;
    for (uint32_t c = 0; c < r->g.nclasses; c++) {
        uint64_t nb = fmq_pool_carved(r, c);
        fmq_block_meta *meta = fmq_pool_meta(r, c);
        unsigned char *on_stack = calloc(nb ? nb : 1, 1);
        if (!on_stack)
            return reclaimed;   /* counters stay as they are: still usable */
        int sane = 1;
        uint64_t steps = 0;
        for (int cold = 0; cold < 2 && sane; cold++) {
            /* [A-pop]: the links read under the top are the pushed ones */
            uint32_t i = FMQ_TOP_INDEX(
                atomic_load_explicit(fmq_pool_top(r, c, cold), memory_order_acquire));
            for (; i != FMQ_NIL; steps++) {
                if (i >= nb || steps > nb || on_stack[i]) {
                    sane = 0;   /* a scribbled stack: leave it to CorruptQueue checks */
                    break;
                }
                on_stack[i] = 1;
                i = atomic_load_explicit(&meta[i].next, memory_order_relaxed);
            }
        }
        uint64_t bs = r->g.classes[c].block_size;
        for (uint64_t b = 0; sane && b < nb; b++) {
            uint64_t pages = atomic_load_explicit(&meta[b].pages, memory_order_relaxed);
            /* acquire, as fmq_pool_transition's load of a block word */
            if (atomic_load_explicit(&meta[b].state, memory_order_acquire) != 0) {
                in_use += pages * FMQ_PAGE;
                continue;
            }
            /* free: whatever lies past the record may be a crash's leftover */
            if (pages * FMQ_PAGE < bs)
                fmq_mem_release(r, fmq_block_off(r, c, (uint32_t)b) + pages * FMQ_PAGE,
                                bs - pages * FMQ_PAGE);
            kept += pages * FMQ_PAGE;
            if (!on_stack[b]) {
                fmq_pool_push(r, c, (uint32_t)b);
                reclaimed++;
            }
        }
        free(on_stack);
        if (!sane)
            return reclaimed;
    }
    atomic_store_explicit(&r->ctl->pool_in_use.v, in_use, memory_order_relaxed);
    atomic_store_explicit(&r->ctl->pool_kept.v, kept, memory_order_relaxed);
    return reclaimed;
}

/* Memory figures for stats and fastmq stat. */
void fmq_region_memory(fmq_region *r, fmq_memory *mem) {
    mem->fixed = r->g.ring_offset;
    uint64_t w = fmq_ring_committed(r);
    mem->ring = w * r->g.slot_stride + fmq_lease_committed(r) * r->g.lease_stride;
    mem->meta = 0;
    for (uint32_t c = 0; c < r->g.nclasses; c++)
        mem->meta += (fmq_pool_carved(r, c) * sizeof(fmq_block_meta) + FMQ_PAGE - 1) /
                     FMQ_PAGE * FMQ_PAGE;   /* reserved in whole pages */
    mem->blocks_in_use = atomic_load_explicit(&r->ctl->pool_in_use.v, memory_order_relaxed);
    mem->blocks_kept = atomic_load_explicit(&r->ctl->pool_kept.v, memory_order_relaxed);
    mem->reserved = mem->fixed + mem->ring + mem->meta + mem->blocks_in_use + mem->blocks_kept;
    mem->virtual_size = r->g.total_size;
    mem->slots_reserved = w;
}

/* Why the last put could not go in, as a sentence (Full's message). */
const char *fmq_region_full_reason(fmq_region *r, uint64_t need) {
    static __thread char buf[320];
    /* a waiter reports after its whole timeout: look back further */
    int shm = fmq_shm_full_within(r, 5000000000ull);
    if (need > r->inline_max) {
        uint64_t used = atomic_load_explicit(&r->ctl->pool_in_use.v, memory_order_relaxed);
        if (used + fmq_pages_for(need) * FMQ_PAGE > r->budget) {
            snprintf(buf, sizeof buf, "queue is full: its memory cap is reached "
                     "(capacity_bytes=%llu, %llu bytes held by queued messages)",
                     (unsigned long long)r->g.capacity_bytes, (unsigned long long)used);
            return buf;
        }
        if (shm || r->nospace_why == FMQ_WHY_SHM) {
            snprintf(buf, sizeof buf, "queue is full: no free space left in /dev/shm "
                     "for a %llu-byte message (other queues or files use it; enlarge "
                     "/dev/shm or drain queues)", (unsigned long long)need);
            return buf;
        }
    }
    if (fmq_depth_hint(r) >= r->g.slot_count) {
        snprintf(buf, sizeof buf, "queue is full: it holds its maximum of %llu messages",
                 (unsigned long long)r->g.slot_count);
        return buf;
    }
    if (shm) {
        snprintf(buf, sizeof buf, "queue is full: no free space left in /dev/shm for its "
                 "message slots (enlarge /dev/shm or drain queues)");
        return buf;
    }
    snprintf(buf, sizeof buf, "queue is full");
    return buf;
}

/* Would a put of a small (inline) message block right now? */
int fmq_region_full(fmq_region *r) {
    if (fmq_depth_hint(r) >= r->g.slot_count)
        return 1;
    uint64_t t = atomic_load_explicit(&r->ctl->tail.v, memory_order_relaxed);
    return !fmq_ring_room(r, t);
}

/* For tests and `fastmq stat`: blocks carved, on a free stack, and held
 * (state != 0). With nobody moving blocks, carved == free + held exactly
 * when no block is lost. Walks the stacks: O(blocks), not for hot paths. */
void fmq_pool_census(fmq_region *r, uint64_t *carved, uint64_t *free_out, uint64_t *held) {
    *carved = *free_out = *held = 0;
    for (uint32_t c = 0; c < r->g.nclasses; c++) {
        uint64_t nb = fmq_pool_carved(r, c);
        fmq_block_meta *meta = fmq_pool_meta(r, c);
        *carved += nb;
        for (int cold = 0; cold < 2; cold++) {
            /* [A-pop]: the links read under the top are the pushed ones */
            uint32_t i = FMQ_TOP_INDEX(
                atomic_load_explicit(fmq_pool_top(r, c, cold), memory_order_acquire));
            for (uint64_t steps = 0; i != FMQ_NIL && i < nb && steps <= nb; steps++) {
                ++*free_out;
                i = atomic_load_explicit(&meta[i].next, memory_order_relaxed);
            }
        }
        for (uint64_t b = 0; b < nb; b++)
            *held += atomic_load_explicit(&meta[b].state, memory_order_relaxed) != 0;
    }
}

int64_t fmq_block_ordinal(fmq_region *r, uint32_t block) {
    uint32_t c = FMQ_BLOCK_CLASS(block);
    if (c >= r->g.nclasses || FMQ_BLOCK_INDEX(block) >= r->g.classes[c].nblocks)
        return -1;
    int64_t base = 0;
    for (uint32_t k = 0; k < c; k++)
        base += (int64_t)r->g.classes[k].nblocks;
    return base + FMQ_BLOCK_INDEX(block);
}
