/*
 * fmq_internal.h -- what the core's C files share and nothing else sees:
 * the process-local handle, error reporting, crash points, small helpers.
 */
#ifndef FMQ_INTERNAL_H
#define FMQ_INTERNAL_H

#include <sys/types.h>

#include "fmq.h"
#include "fmq_layout.h"

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
};

#define FMQ_WHY_CAP 1           /* the queue's capacity_bytes                    */
#define FMQ_WHY_SHM 2           /* no free space in /dev/shm                     */

/* ---- errors ---------------------------------------------------------------- */
int fmq_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- crash injection (tests only) -------------------------------------------- */
/* Compiled into every build (one predictable branch each) and armed only
 * when FASTMQ_CRASH_AT was set at import, so the crash tests exercise the very
 * binary users run, not a special build. */
extern const char *fmq_crash_spec;
void fmq_crashpoint(const char *where);
#define FMQ_CRASHPOINT(where) \
    do { if (__builtin_expect(fmq_crash_spec != NULL, 0)) fmq_crashpoint(where); } while (0)

/* ---- fork detection ------------------------------------------------------------ */
extern volatile unsigned fmq_fork_generation;
/* fork handlers of fmq_live.c (prepare, parent, child), run by fmq_region.c's */
void fmq_live_before_fork(void);
void fmq_live_after_fork_parent(void);
void fmq_live_after_fork(void);

/* ---- participants (fmq_live.c) --------------------------------------------------- */
int fmq_live_register(fmq_region *r);
int fmq_live_is_alive(fmq_region *r, uint32_t idx);
struct flock;
int fmq_live_lock_byte(int fd, int cmd, short type, long long at, struct flock *out);
int fmq_live_init_lock(int fd, short type);
int fmq_live_init_in_progress(int fd);
int fmq_pool_available(fmq_region *r, uint64_t nbytes);
int fmq_pool_transition(fmq_region *r, uint32_t block, uint64_t mask, uint64_t expect,
                        uint64_t set);
void fmq_pool_free_block(fmq_region *r, uint32_t c, uint32_t idx);   /* state already 0 */
uint64_t fmq_pool_carved(fmq_region *r, uint32_t c);   /* blocks of c that exist */
uint64_t fmq_pool_audit(fmq_region *r);                /* alone: see fmq_pool.c  */
void fmq_pool_idle(fmq_region *r);   /* a consumer found nothing: give back memory
                                        beyond the recent demand (fmq_pool.c)  */
/* Call fn on every handle this process has registered, unless the list is
 * busy (then nobody is called: the caller tries again later). */
void fmq_live_each(void (*fn)(fmq_region *, void *), void *arg);
/* ring memory (fmq_pool.c): slots below the mark are reserved; a producer
 * about to touch ticket t of the first lap makes sure t + margin is */
#define FMQ_RING_MARGIN 16
uint64_t fmq_ring_committed(const fmq_region *r);
uint64_t fmq_lease_committed(const fmq_region *r);
int fmq_lease_grow(fmq_region *r, uint64_t n);
int fmq_ring_grow(fmq_region *r, uint64_t t);
int fmq_ring_room(fmq_region *r, uint64_t t);
/* A process alone with the segment (init lock held, AUDITING): give back the
 * pages of an empty ring and lease table (1 if it did), and finish one that a
 * killed process began (fmq_pool.c). */
int fmq_ring_compact(fmq_region *r);
void fmq_ring_compact_finish(fmq_region *r);
void fmq_pool_cool_all(fmq_region *r);
static inline int fmq_ring_ensure(fmq_region *r, uint64_t t) {
    return __builtin_expect(t + FMQ_RING_MARGIN < r->ring_ready, 1) ? FMQ_OK
                                                                   : fmq_ring_grow(r, t);
}
#define FMQ_WRITER_MASK ((uint64_t)FMQ_OWNER_MASK)
#define FMQ_READER_MASK ((uint64_t)FMQ_OWNER_MASK << 24)
/* crash recovery (fmq_recover.c) */
void fmq_recover_stalled(fmq_region *r, uint64_t ticket, uint64_t word, uint64_t since_ns);
void fmq_reap_tag(fmq_region *r, uint32_t dead_tag);
void fmq_audit_if_alone(fmq_region *r);
void fmq_release_if_alone(fmq_region *r);   /* a named queue's closing handle */
/* leases (fmq_lease.c) */
typedef struct fmq_taken {
    uint64_t *tickets;          /* src tickets of a dead tag's leased entries */
    size_t n;
} fmq_taken;
void fmq_lease_reap(fmq_region *r, uint32_t dead_tag, fmq_taken *taken);
int fmq_tag_is_dead(fmq_region *r, uint32_t tag);
int fmq_tag_crashed(fmq_region *r, uint32_t tag);
int fmq_ring_free_moved(fmq_region *r, fmq_msg *m);
int fmq_ring_is_reading(fmq_region *r, uint64_t t, uint32_t owner);
/* A claimed slot whose block is not the queue's: consume it as damaged
 * (counted as abandoned); returns FMQ_ECORRUPT. */
int fmq_ring_drop_damaged(fmq_region *r, fmq_msg *m);
void fmq_live_unregister(fmq_region *r);

/* Read a field that another process may change under us exactly once: the
 * value that is checked is then the value that is used (a plain load of a
 * shared field may legally be repeated by the compiler). Relaxed: ordering
 * comes from the acquire of the word that made the field ours to read. */
#define FMQ_ONCE(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)

/* Does any queued message (a READY/READING slot) or in-flight entry (any
 * state but FREE) other than ring ticket skip_ticket name this block? Used
 * before dropping a share that a scribbled or half-finished record claims,
 * so a share that another message still relies on is never dropped. */
int fmq_block_referenced(fmq_region *r, uint32_t block, uint64_t skip_ticket);
/* Recompute the head/tail hints from the slot words (fmq_ring.c). */
void fmq_ring_repair_hints(fmq_region *r);
/* Mark, in published[], every block an in-flight entry holds (fmq_lease.c). */
void fmq_lease_mark_blocks(fmq_region *r, unsigned char *published);
int64_t fmq_block_ordinal(fmq_region *r, uint32_t block);

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

#endif /* FMQ_INTERNAL_H */
