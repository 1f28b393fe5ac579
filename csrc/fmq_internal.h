/*
 * fmq_internal.h -- what the core's C files share and nothing else sees:
 * the process-local handle, error reporting, crash points, small helpers,
 * and each layer's internal interface.
 *
 * Layers. Each file calls only files below it (tests/test_c_layers.py holds
 * the same order and fails on a call upward or sideways):
 *
 *   fmq_selftest.c                      the C self-test, over the whole core
 *   fmq_durable.c                       durable files: flushes, rebuild on open
 *   fmq_region.c                        open/create/close, fork handler, stats
 *   fmq_recover.c                       crash recovery: reaps dead holders
 *   fmq_lease.c                         in-flight entries (at-least-once)
 *   fmq_ring.c                          the slot ring
 *   fmq_pool.c                          blocks and memory of the segment
 *   fmq_live.c                          participants: who is alive
 *   fmq_wait.c, fmq_mac.c               futex shim + waiter handshake; MAC
 *   fmq_base.c, fmq_crc.c               errors, clock, crash points; CRC-32C
 *
 * The few places where a lower layer needs a higher one (a stuck waiter in
 * the ring asks recovery to look for the dead, registration into a dead
 * entry asks recovery to reap it, a waiting consumer asks the in-flight
 * table to redeliver what is due) go through r->up (fmq_upcalls, below),
 * which fmq_region.c fills when it makes the handle. All are slow paths.
 */
#ifndef FMQ_INTERNAL_H
#define FMQ_INTERNAL_H

#include <limits.h>
#include <sys/types.h>

#include "fmq.h"
#include "fmq_base.h"
#include "fmq_layout.h"
#include "fmq_wait.h"
#include "fmq_words.h"

typedef struct fmq_upcalls fmq_upcalls;

struct fmq_region {
    unsigned char *base;        /* the mapping                                   */
    size_t size;
    int fd;
    fmq_header *hdr;
    fmq_ctl *ctl;
    fmq_participant *parts;
    unsigned char *ring;
    unsigned char *leases;
    fmq_geometry g;             /* validated geometry: never re-read from shm    */
    uint64_t lap_magic;         /* t / slot_count by multiply and shift          */
    uint32_t lap_shift;         /* (fmq_ticket_lap); magic 0: n is a power of two */
    uint32_t inline_max;        /* payload bytes that fit in a slot              */
    int anonymous;
    char name[256];
    char dead_letter[FMQ_DEAD_LETTER_MAX];
    uint32_t max_deliveries;
    uint32_t me;                /* our participant index                         */
    uint32_t owner_tag;         /* index << 14 | generation, as in slot words    */
    fmq_participant *self;
    unsigned fork_gen;          /* fmq_fork_generation when we registered        */
    uint32_t roles;             /* roles already published in self->roles        */
    uint64_t ring_ready;        /* ring slots known reserved (fmq_pool.c); grows */
    uint64_t room_checked_ns;   /* last fstatvfs of /dev/shm (fmq_pool.c), and   */
    int roomy;                  /* whether it had room to keep free blocks warm  */
    uint64_t budget;            /* block pages allowed: capacity_bytes, paged    */
    int nospace_why;            /* FMQ_WHY_*: why the last block request failed  */
    const fmq_upcalls *up;      /* calls up the layers (fmq_region.c fills it)   */
    /* durable (file://) queues, fmq_durable.c; all zero for shared memory */
    int durable;
    uint32_t sync_mode;         /* FMQ_SYNC_*                                    */
    uint64_t sync_interval_ns;
    struct fmq_dctl *dctl;      /* the flush words, in the header page's tail    */
    uint64_t dur_kept, dur_dropped, dur_generation;   /* this open's recovery   */
    char *dur_path;             /* the file (malloc'd; freed by fmq_region_free) */
};

#define FMQ_WHY_CAP 1           /* the queue's capacity_bytes                    */
#define FMQ_WHY_SHM 2           /* no free space in /dev/shm                     */

/* ---- calls up the layers ------------------------------------------------- */
/* What a lower layer may ask of a higher one, filled by fmq_region.c with the
 * functions named. Every caller is on a slow path (a wait that got nowhere for
 * a slice, a registration, a damaged message), so the indirect call is free. */
struct fmq_upcalls {
    int (*recover)(fmq_region *r);                              /* fmq_recover  */
    void (*recover_stalled)(fmq_region *r, uint64_t ticket, uint64_t word,
                            uint64_t since_ns);                 /* fmq_recover_stalled */
    void (*reap_tag)(fmq_region *r, uint32_t dead_tag);         /* fmq_reap_tag */
    int (*redeliver_due)(fmq_region *r, int force);             /* fmq_lease_redeliver_due */
    int (*lease_names_block)(fmq_region *r, uint32_t block);    /* fmq_lease_names_block */
    /* durable (file://) queues only, NULL in shared memory (fmq_durable.c): a
     * flush between the two steps of a lease take or requeue, and the last
     * flush of a closing handle */
    int (*durable_barrier)(fmq_region *r);
    void (*durable_close)(fmq_region *r);
};

/* The core's entries of an upcall table, in one place: shared memory's table
 * (fmq_region.c) is these, a durable queue's (fmq_durable.c) is these plus its
 * own two, so an entry added here reaches both. */
#define FMQ_UPCALLS_CORE                               \
    .recover = fmq_recover,                            \
    .recover_stalled = fmq_recover_stalled,            \
    .reap_tag = fmq_reap_tag,                          \
    .redeliver_due = fmq_lease_redeliver_due,          \
    .lease_names_block = fmq_lease_names_block

/* ==== fmq_live.c: participants ============================================ */
/* fork handlers (prepare, parent, child), installed by fmq_region.c */
void fmq_live_before_fork(void);
void fmq_live_after_fork_parent(void);
void fmq_live_after_fork(void);
int fmq_live_register(fmq_region *r);
void fmq_live_unregister(fmq_region *r);
int fmq_live_is_alive(fmq_region *r, uint32_t idx);
struct flock;
int fmq_live_lock_byte(int fd, int cmd, short type, long long at, struct flock *out);
int fmq_live_init_lock(int fd, short type);
int fmq_live_init_in_progress(int fd);
/* Call fn on every handle this process has registered, unless the list is
 * busy (then nobody is called: the caller tries again later). */
void fmq_live_each(void (*fn)(fmq_region *, void *), void *arg);

/* ==== fmq_pool.c: blocks and segment memory =============================== */
int fmq_pool_available(fmq_region *r, uint64_t nbytes);
int fmq_pool_transition(fmq_region *r, uint32_t block, uint64_t mask, uint64_t expect,
                        uint64_t set);
void fmq_pool_free_block(fmq_region *r, uint32_t c, uint32_t idx);   /* state already 0 */
uint64_t fmq_pool_carved(fmq_region *r, uint32_t c);   /* blocks of c that exist */
uint64_t fmq_pool_audit(fmq_region *r);                /* alone: see fmq_pool.c  */
void fmq_pool_idle(fmq_region *r);   /* a consumer found nothing: give back memory
                                        beyond the recent demand               */
void fmq_pool_cool_all(fmq_region *r);   /* every warm block goes cold          */
/* The metadata array of size class c (one fmq_block_meta per block). */
static inline fmq_block_meta *fmq_pool_meta(const fmq_region *r, uint32_t c) {
    return (fmq_block_meta *)(r->base + r->g.classes[c].meta_offset);
}
/* Is a claimed slot's block still that slot's message (FMQ_BLK_NEXT_IS_TICKET)?
 * Asked right after the CAS that took the ring's share (acq_rel: it read the
 * committer's release of the block word, which followed its store of next). */
static inline int fmq_block_holds_ticket(const fmq_region *r, uint32_t block, uint64_t ticket) {
    uint32_t t = atomic_load_explicit(
        &fmq_pool_meta(r, FMQ_BLOCK_CLASS(block))[FMQ_BLOCK_INDEX(block)].next,
        memory_order_relaxed);
    return t == (uint32_t)ticket || t == FMQ_NIL;
}
/* Index of a block across all classes (for per-block bitmaps), or -1 if the
 * reference names no block of this geometry. */
int64_t fmq_block_ordinal(fmq_region *r, uint32_t block);
/* ring memory: slots below the mark are reserved; a producer about to touch
 * ticket t of the first lap makes sure t + margin is */
#define FMQ_RING_MARGIN 16
uint64_t fmq_ring_committed(const fmq_region *r);
uint64_t fmq_lease_committed(const fmq_region *r);
int fmq_lease_grow(fmq_region *r, uint64_t n);
int fmq_ring_grow(fmq_region *r, uint64_t t);
int fmq_ring_room(fmq_region *r, uint64_t t);
/* A process alone with the segment (init lock held, AUDITING): give back the
 * pages of an empty ring and lease table (1 if it did), and finish a pass
 * that a killed process began. */
int fmq_ring_compact(fmq_region *r);
void fmq_ring_compact_finish(fmq_region *r);
#define FMQ_WRITER_MASK ((uint64_t)FMQ_OWNER_MASK)
#define FMQ_READER_MASK ((uint64_t)FMQ_OWNER_MASK << 24)

/* ==== fmq_ring.c: the slot ring =========================================== */
/* Where ticket t lives, and the stamp of t's lap (phase EMPTY): every file
 * that reads slot words uses these, so a ticket maps to one slot one way. */
/* A 64-bit division costs tens of cycles on many CPUs and every slot access
 * on the hot paths needs one, so the lap t / slot_count is a multiply by a
 * reciprocal computed once per handle from the validated local geometry
 * (fmq_region_bind), never from shared memory. A power-of-two slot count (the
 * common maxsize) takes a shift and a mask instead: lap_magic is 0 then, a
 * well-predicted branch. For any other n, with l = ceil(log2 n):
 *   lap_magic = floor(2^(64+l) / n) + 1 - 2^64, lap_shift = l - 1,
 *   hi = (t * lap_magic) >> 64,  t / n = (hi + ((t - hi) >> 1)) >> (l - 1),
 * exact for every 64-bit t. The multiplier m = lap_magic + 2^64 has
 * m*n = 2^(64+l) + e with 0 < e <= n, so m*t / 2^(64+l) is t/n plus
 * t*e / (n * 2^(64+l)) < 2^-l < 1/n: never enough to carry t/n, whose
 * fraction is at most (n-1)/n, to the next integer. The add-and-halve
 * computes (hi + t) >> l, which is that floor, without a 65th bit.
 * fmq_selftest_ticket_lap checks it against the division it replaces. */
void fmq_ticket_lap_init(fmq_region *r);
static inline uint64_t fmq_ticket_lap(const fmq_region *r, uint64_t t) {
    if (r->lap_magic == 0)
        return t >> r->lap_shift;
    uint64_t hi = (uint64_t)(((unsigned __int128)t * r->lap_magic) >> 64);
    return (hi + ((t - hi) >> 1)) >> r->lap_shift;
}
static inline fmq_slot *fmq_slot_at(const fmq_region *r, uint64_t t) {
    uint64_t n = r->g.slot_count;
    uint64_t i = r->lap_magic == 0 ? t & (n - 1) : t - fmq_ticket_lap(r, t) * n;
    return (fmq_slot *)(r->ring + i * r->g.slot_stride);
}
static inline uint64_t fmq_lap_stamp(const fmq_region *r, uint64_t t) {
    uint64_t lap = fmq_ticket_lap(r, t);
    return (lap * 4) & FMQ_STAMP_MASK;
}
/* Wake consumers (one, or all) / every producer after publishing a change
 * they may wait for: the waker half of fmq_wait.h's handshake on ctl->data and
 * ctl->space. Inline: with nobody asleep each is one load. */
static inline void fmq_wake_data(fmq_region *r, int all) {
    fmq_waitline_wake(&r->ctl->data, all ? INT_MAX : 1);
}
static inline void fmq_wake_space(fmq_region *r) { fmq_waitline_wake(&r->ctl->space, INT_MAX); }
/* Messages between the hints, capped at the ring size (no slot is read):
 * what fmq_ring_depth returns, for the layers that may not call the ring. */
static inline uint64_t fmq_depth_hint(const fmq_region *r) {
    /* Relaxed: hints are only where to start; nothing is read through them. */
    uint64_t h = atomic_load_explicit(&r->ctl->head.v, memory_order_relaxed);
    uint64_t t = atomic_load_explicit(&r->ctl->tail.v, memory_order_relaxed);
    if (t <= h)
        return 0;
    return t - h > r->g.slot_count ? r->g.slot_count : t - h;
}
int fmq_ring_free_moved(fmq_region *r, fmq_msg *m);
int fmq_ring_is_reading(fmq_region *r, uint64_t t, uint32_t owner);
/* A claimed slot whose block is not the queue's: consume it as damaged
 * (counted as abandoned); returns FMQ_ECORRUPT. */
int fmq_ring_drop_damaged(fmq_region *r, fmq_msg *m);
/* The same, for a claimed slot whose block we just took as reader but that
 * holds another slot's message (fmq_block_holds_ticket): the ring's share
 * goes back to that message first. */
int fmq_ring_drop_foreign(fmq_region *r, fmq_msg *m);
/* Does a queued message (a READY/READING slot) other than ring ticket
 * skip_ticket (~0: none) name this block? */
int fmq_ring_names_block(fmq_region *r, uint32_t block, uint64_t skip_ticket);
/* Recompute the head/tail hints from the slot words. */
void fmq_ring_repair_hints(fmq_region *r);

/* ==== fmq_lease.c: in-flight entries ====================================== */
typedef struct fmq_taken {
    uint64_t *tickets;          /* src tickets of a dead tag's leased entries */
    uint32_t *index;            /* their src_index (1 + index in a batch; 0) */
    size_t n;
} fmq_taken;
void fmq_lease_reap(fmq_region *r, uint32_t dead_tag, fmq_taken *taken);
int fmq_tag_is_dead(fmq_region *r, uint32_t tag);
int fmq_tag_crashed(fmq_region *r, uint32_t tag);
/* Mark, in published[], every block an in-flight entry holds. */
void fmq_lease_mark_blocks(fmq_region *r, unsigned char *published);
/* Does an in-flight entry (any state but FREE) name this block? */
int fmq_lease_names_block(fmq_region *r, uint32_t block);
/* Does any queued message or in-flight entry other than ring ticket
 * skip_ticket name this block? Used before dropping a share that a scribbled
 * or half-finished record claims, so a share that another message still
 * relies on is never dropped. */
int fmq_block_referenced(fmq_region *r, uint32_t block, uint64_t skip_ticket);

/* ==== fmq_recover.c: crash recovery ======================================= */
void fmq_recover_stalled(fmq_region *r, uint64_t ticket, uint64_t word, uint64_t since_ns);
void fmq_reap_tag(fmq_region *r, uint32_t dead_tag);
void fmq_audit_if_alone(fmq_region *r);
void fmq_release_if_alone(fmq_region *r);   /* a named queue's closing handle */

/* ==== helpers for every layer ============================================= */
/* Read a field that another process may change under us exactly once: the
 * value that is checked is then the value that is used (a plain load of a
 * shared field may legally be repeated by the compiler). Relaxed: ordering
 * comes from the acquire of the word that made the field ours to read. */
#define FMQ_ONCE(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)


static inline void fmq_count(fmq_region *r, int which, uint64_t n) {
    /* Relaxed: counters are statistics, never used to order anything. Each
     * participant writes only its own line, so this does not contend. */
    atomic_fetch_add_explicit(&r->self->stats[which], n, memory_order_relaxed);
}

static inline void fmq_set_role(fmq_region *r, uint32_t role) {
    if (!(r->roles & role)) {
        r->roles |= role;
        atomic_fetch_or_explicit(&r->self->roles, role, memory_order_relaxed);
    }
}

static inline void fmq_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

/* ==== fmq_crc.c: the checksum of a durable queue's records ================ */
uint32_t fmq_crc32c(uint32_t seed, const void *data, size_t n);
uint32_t fmq_record_crc(uint32_t len, const unsigned char *payload);
/* tests: compute with the tables even where the CPU has the instruction
 * (nonzero), or by the CPU again (0); returns whether the tables were in use */
int fmq_crc_force_portable(int portable);

/* ==== fmq_region.c helpers that fmq_durable.c (the layer above) shares ====== */
int fmq_name_ok(const char *name);
int fmq_open_path(const char *path, int flags, unsigned mode);
fmq_region *fmq_region_new(const char *name, int fd);
void fmq_region_bind(fmq_region *r);
void fmq_region_free(fmq_region *r);
int fmq_validate(fmq_region *r, size_t file_size);
void fmq_pool_init(fmq_region *r);
void fmq_region_set_keep(fmq_region *r);
int fmq_region_create_check(const fmq_params *p, unsigned mode, fmq_geometry *g);
int fmq_region_create_new(const char *name, int fd, const char *tmp, unsigned mode,
                          fmq_region **out);
int fmq_region_format(fmq_region *r, const fmq_geometry *g, const fmq_params *p);
int fmq_region_create_link(fmq_region *r, const char *tmp, const char *path);
int fmq_region_open_file(const char *path, const char *name, const char *label,
                         const char *os_what, fmq_region **out, uint64_t *size_out);
int fmq_region_map(fmq_region *r, size_t size, int flags, const char *os_what);
int fmq_region_attach(fmq_region *r, size_t segment_size);
int fmq_os_fail(const char *what, const char *name);
uint64_t fmq_geometry_check(const fmq_header *h);
uint64_t fmq_realtime_ns(void);

#endif /* FMQ_INTERNAL_H */
