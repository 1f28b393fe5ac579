/*
 * fmq_live.c -- participants: who uses a segment, and whether they still live.
 *
 * Algorithm. Every handle owns one entry of the participant table. Ownership
 * is decided by the kernel, not by the table: a handle takes an exclusive
 * open-file-description lock (F_OFD_SETLK) on byte FMQ_LOCK_BASE + index of
 * the segment file, and only the holder of that lock may write the entry. The
 * kernel drops the lock when the process dies however it dies (SIGKILL, OOM),
 * so "the lock is free" proves "the previous owner is gone" -- no pid-reuse
 * trap, no timeout guesswork. Taking a free lock is the claim: whatever the
 * entry still says about a dead predecessor is then ours to fold away.
 *
 * Each (re)use bumps the entry's generation; slot words carry index+generation
 * as their owner tag, so a tag from a previous occupant never matches.
 *
 * Memory order. [R-ident] the release store of an entry's ident (publishing
 * it ACTIVE, or FREE on close) pairs with [A-ident], the acquire loads of it
 * (here, fmq_lease.c, fmq_recover.c): a reader that sees a generation sees
 * the entry's counters and roles reset before it. The kernel lock, not the
 * ident, decides ownership, so nothing else depends on these orders.
 *
 * Failure model. Death between taking the lock and publishing the entry
 * leaves an entry that the next claimant simply overwrites. A frozen (SIGSTOP)
 * process keeps its lock and therefore counts as alive: it is never reaped.
 *
 * Fork. An OFD lock belongs to the open file description and is dropped only
 * when the last reference to that description goes. fork() shares every
 * description with the child -- through its descriptors, and through its
 * mappings too: a mapping refers to the description it was made from. Left
 * alone, a child that never touches the queue would keep the parent's
 * participant lock held for as long as it lives: after the parent dies, its
 * entry still looks alive, and whatever it held (a half-written slot, a
 * block) is never repaired -- one idle child wedges the queue. Two steps
 * close that:
 *
 * 1. The participant lock is never taken on a description a mapping refers
 *    to. fmq_live_register first gives the handle's descriptor a description
 *    of its own (fmq_live_fresh_fd): open("/proc/self/fd/N") makes a new
 *    description of the very inode the handle mapped (also when its name was
 *    unlinked or replaced), and dup3() puts it on the handle's descriptor
 *    number. The description the mapping was made from stays referenced by
 *    the mapping alone, and holds no participant lock.
 * 2. The fork handler (fmq_live_after_fork, run in the child before fork()
 *    returns) does the same for every open handle of the child, which drops
 *    the child's only reference to the parent's lock description. That
 *    releases nothing of the parent's: the parent still holds that
 *    description itself. The child is nobody until it uses the handle, when
 *    fmq_region_check_fork registers it under its own entry.
 *
 * (A liveness descriptor opened per process on first use would still need the
 * child to let go of the inherited one; doing it at fork time is what makes
 * "a child that never used the queue" cost nothing.) An anonymous segment's
 * flock(LOCK_SH) stays on the mapping's description, which is right: the
 * segment is in use while any process maps it; the child also takes it on its
 * new descriptor, as every handle holds it on its own descriptor.
 *
 * The handler walks a process-wide list of registered handles. Its mutex is
 * taken by the prepare handler and dropped by both after-fork handlers, so
 * the child never inherits it locked by a thread that no longer exists. The
 * child handler calls only async-signal-safe functions (open, dup3, close,
 * flock), as a child of a multi-threaded process must. If the reopen fails
 * (no descriptors left), the child closes the inherited descriptor anyway --
 * keeping the parent's lock alive is the one thing it must not do -- and the
 * handle reports the error on its next use.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "fmq_internal.h"

/* ---- the process's registered handles (for the fork handler) -------------- */

static pthread_mutex_t fmq_live_mu = PTHREAD_MUTEX_INITIALIZER;
static fmq_region **fmq_live_list = NULL;   /* guarded by fmq_live_mu */
static size_t fmq_live_n = 0, fmq_live_cap = 0;

/* Room for one more entry (before the lock is taken, so a registration never
 * fails after its participant entry is ours). */
static int fmq_live_list_reserve(void) {
    int rc = FMQ_OK;
    pthread_mutex_lock(&fmq_live_mu);
    if (fmq_live_n == fmq_live_cap) {
        size_t cap = fmq_live_cap ? 2 * fmq_live_cap : 16;
        fmq_region **grown = realloc(fmq_live_list, cap * sizeof *grown);
        if (grown) {
            fmq_live_list = grown;
            fmq_live_cap = cap;
        } else {
            rc = fmq_fail(FMQ_EOS, "out of memory registering a queue handle");
        }
    }
    pthread_mutex_unlock(&fmq_live_mu);
    return rc;
}

static void fmq_live_list_add(fmq_region *r) {
    pthread_mutex_lock(&fmq_live_mu);
    size_t i = 0;
    while (i < fmq_live_n && fmq_live_list[i] != r)
        i++;
    if (i == fmq_live_n && fmq_live_n < fmq_live_cap)   /* reserved: always room */
        fmq_live_list[fmq_live_n++] = r;
    pthread_mutex_unlock(&fmq_live_mu);
}

static void fmq_live_list_remove(fmq_region *r) {
    pthread_mutex_lock(&fmq_live_mu);
    for (size_t i = 0; i < fmq_live_n; i++) {
        if (fmq_live_list[i] == r) {
            fmq_live_list[i] = fmq_live_list[--fmq_live_n];
            break;
        }
    }
    pthread_mutex_unlock(&fmq_live_mu);
}

/* For memory policies that look across queues (fmq_pool.c). trylock, so a
 * caller that already holds the mutex (or races a registration) skips a
 * round instead of deadlocking; a handle is removed from the list before it
 * is unmapped, so every r seen here stays mapped until we unlock. A forked
 * child's inherited handles are skipped until they register again. */
void fmq_live_each(void (*fn)(fmq_region *, void *), void *arg) {
    if (pthread_mutex_trylock(&fmq_live_mu) != 0)
        return;
    for (size_t i = 0; i < fmq_live_n; i++) {
        fmq_region *r = fmq_live_list[i];
        if (r->fd >= 0 && r->fork_gen == fmq_fork_generation)
            fn(r, arg);
    }
    pthread_mutex_unlock(&fmq_live_mu);
}

void fmq_live_before_fork(void) { pthread_mutex_lock(&fmq_live_mu); }

void fmq_live_after_fork_parent(void) { pthread_mutex_unlock(&fmq_live_mu); }

/* "/proc/self/fd/<fd>" without snprintf (not async-signal-safe). */
static void fmq_proc_fd_path(int fd, char out[32]) {
    static const char prefix[] = "/proc/self/fd/";
    char digits[12];
    int n = 0;
    unsigned v = (unsigned)fd;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < (int)sizeof digits);
    memcpy(out, prefix, sizeof prefix - 1);
    int at = (int)sizeof prefix - 1;
    while (n)
        out[at++] = digits[--n];
    out[at] = '\0';
}

/* Give descriptor `fd` a new open file description of the same file (same
 * number, close-on-exec). Async-signal-safe. 0, or -1 with errno set and
 * `fd` unchanged. */
static int fmq_live_fresh_fd(int fd) {
    char path[32];
    fmq_proc_fd_path(fd, path);
    int nfd = open(path, O_RDWR | O_CLOEXEC);
    if (nfd < 0)
        return -1;
    if (dup3(nfd, fd, O_CLOEXEC) < 0) {
        int e = errno;
        close(nfd);
        errno = e;
        return -1;
    }
    close(nfd);
    return 0;
}

/* In the child, before fork() returns (see the header comment). */
void fmq_live_after_fork(void) {
    int saved = errno;
    for (size_t i = 0; i < fmq_live_n; i++) {
        fmq_region *r = fmq_live_list[i];
        if (r->fd < 0)
            continue;
        if (fmq_live_fresh_fd(r->fd) == 0) {
            if (r->anonymous)
                (void)flock(r->fd, LOCK_SH | LOCK_NB);   /* a closer probing: it is going */
        } else {
            close(r->fd);     /* never keep the parent's lock alive */
            r->fd = -1;
        }
    }
    errno = saved;
    pthread_mutex_unlock(&fmq_live_mu);
}

/* One byte-range OFD lock operation on byte `at` (cmd F_OFD_SETLK/GETLK). */
int fmq_live_lock_byte(int fd, int cmd, short type, long long at, struct flock *out) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = at;
    fl.l_len = 1;
    fl.l_pid = 0;            /* required by OFD locks */
    int rc = fcntl(fd, cmd, &fl);
    if (out)
        *out = fl;
    return rc;
}

static int fmq_lock_op(int fd, int cmd, short type, uint32_t idx, struct flock *out) {
    return fmq_live_lock_byte(fd, cmd, type, FMQ_LOCK_BASE + idx, out);
}

int fmq_live_register(fmq_region *r) {
    int rc = fmq_live_list_reserve();
    if (rc != FMQ_OK)
        return rc;
    /* Step 1 of the header's "Fork": our lock goes on a description that no
     * mapping refers to, so no inherited mapping can keep it held. Best
     * effort: without /proc (or out of descriptors) the handle still works
     * and only keeps the weaker guarantee (a forked child that maps the
     * segment keeps us "alive" while it lives). */
    (void)fmq_live_fresh_fd(r->fd);
    uint32_t n = r->g.nparticipants;
    uint32_t start = (uint32_t)(atomic_fetch_add_explicit(&r->ctl->next_participant.v, 1,
                                                          memory_order_relaxed) % n);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t idx = (start + i) % n;
        if (fmq_lock_op(r->fd, F_OFD_SETLK, F_WRLCK, idx, NULL) != 0) {
            if (errno == EAGAIN || errno == EACCES)
                continue;   /* a live owner holds it */
            return fmq_fail(FMQ_EOS, "cannot lock participant entry: %s", strerror(errno));
        }
        fmq_participant *p = &r->parts[idx];
        uint64_t old = atomic_load_explicit(&p->ident, memory_order_acquire);   /* [A-ident] */
        uint32_t old_gen = FMQ_PART_GEN(old);
        if (FMQ_PART_STATE(old) == FMQ_PART_ACTIVE) {
            /* The previous occupant died without closing: take back what it
             * held before its identity is gone for good. */
            r->up->reap_tag(r, FMQ_TAG(idx, old_gen));
            atomic_fetch_add_explicit(&r->ctl->recoveries.v, 1, memory_order_relaxed);
        }
        /* Fold the predecessor's counters into the segment's retired totals so
         * stats stay cumulative across handles that come and go. */
        for (int s = 0; s < FMQ_NSTATS; s++) {
            uint64_t v = atomic_exchange_explicit(&p->stats[s], 0, memory_order_relaxed);
            if (v)
                atomic_fetch_add_explicit(&r->ctl->retired[s], v, memory_order_relaxed);
        }
        uint32_t gen = (old_gen + 1) & FMQ_GEN_MASK;
        if (gen == 0)
            gen = 1;   /* tag 0 means "nobody" in slot and block words */
        atomic_store_explicit(&p->roles, 0, memory_order_relaxed);
        p->start_time = 0;
        atomic_store_explicit(&p->ident, FMQ_PART_IDENT(getpid(), gen, FMQ_PART_ACTIVE),
                              memory_order_release);                      /* [R-ident] */
        r->me = idx;
        r->owner_tag = FMQ_TAG(idx, gen);
        r->self = p;
        r->roles = 0;
        r->fork_gen = fmq_fork_generation;
        fmq_live_list_add(r);
        return FMQ_OK;
    }
    return fmq_fail(FMQ_ETABLEFULL, "too many open handles on queue %s (%u): close unused "
                                    "handles", r->name, n);
}

void fmq_live_unregister(fmq_region *r) {
    fmq_live_list_remove(r);   /* before the caller closes r->fd */
    if (!r->self || r->fork_gen != fmq_fork_generation)
        return;   /* a forked child never registered: the entry is the parent's */
    /* relaxed: our own entry, which only we (holding its lock) write */
    uint64_t id = atomic_load_explicit(&r->self->ident, memory_order_relaxed);
    atomic_store_explicit(&r->self->ident, FMQ_PART_WITH_STATE(id, FMQ_PART_FREE),
                          memory_order_release);                          /* [R-ident] */
    /* The lock goes with the descriptor when the caller closes it. */
}

/* Alive = someone holds the entry's lock. Our own lock never conflicts with
 * ourselves, so our own index is answered directly. */
int fmq_live_is_alive(fmq_region *r, uint32_t idx) {
    if (idx == r->me)
        return 1;
    struct flock fl;
    if (fmq_lock_op(r->fd, F_OFD_GETLK, F_WRLCK, idx, &fl) != 0)
        return 1;   /* cannot tell: assume alive (never reap on doubt) */
    return fl.l_type != F_UNLCK;
}

/* The creator holds FMQ_INIT_LOCK from creating the name until the segment is
 * READY, so an opener can tell "still initialising" (lock held) from "the
 * creator died half-way" (lock free, segment not READY). */
int fmq_live_init_lock(int fd, short type) {
    return fmq_live_lock_byte(fd, F_OFD_SETLK, type, FMQ_INIT_LOCK, NULL);
}

int fmq_live_init_in_progress(int fd) {
    struct flock fl;
    if (fmq_live_lock_byte(fd, F_OFD_GETLK, F_WRLCK, FMQ_INIT_LOCK, &fl) != 0)
        return 1;   /* cannot tell: assume alive, keep waiting (bounded) */
    return fl.l_type != F_UNLCK;
}
