/*
 * fmq_durable.c -- durable queues: the segment kept in a file on a real
 * filesystem, flushed as the sync mode asks, rebuilt after an unclean stop.
 *
 * File layout. The file holds exactly the bytes of a shared-memory segment
 * (fmq_layout.h: header, control lines, participants, ring, lease table,
 * block pools; sparse, its pages reserved with fallocate as they are first
 * used, fmq_pool.c), followed by a trailer of three pages:
 *
 *   total_size            superblock A  } the same record, two copies, each
 *   total_size + 4096     superblock B  } with a generation and a CRC-32C
 *   total_size + 8192     unused (held the flush words in the first files)
 *
 * The flush words (fmq_dctl: hints, rebuilt on open) sit in the tail of the
 * segment's header page, past the header (before its last line, which holds
 * the Python layer's rejected count). Every flush dirties them, and
 * every put dirties the control lines and its participant line, which are
 * the pages right after the header page: a flush then writes pages 0-2 as
 * one run of contiguous pages (one write request where their blocks are
 * contiguous, as the create's single fallocate of them makes them) instead
 * of those two plus a page at the far end of the file (a 64 B commit put
 * dirties 4 pages: 3 runs before, 2 now). The header bytes never change while
 * the queue is open, so rewriting the page with them is harmless; a page
 * torn by a power loss anyway is rewritten from the superblock's copy. An
 * older binary (flush words in the trailer) that shares a file with this
 * one loses the sharing of flushes between them, never correctness: a
 * flush by anyone covers every commit before it.
 *
 * A superblock names this format and version, the sync mode, and carries a
 * copy of the segment header. An opener takes the valid copy with the
 * higher generation; a rewrite goes to the other copy, so a write torn by a
 * power loss leaves the previous one intact. A segment header page that
 * disagrees with the superblock's copy is rewritten from it. A file that has
 * no valid superblock, or one of another format or version, or whose size
 * is not exactly segment + trailer, is refused (FMQ_ECORRUPT/FMQ_EVERSION).
 *
 * Records. Every ring record (a slot and its payload, inline or in a block;
 * an atomic batch is one record) carries a CRC-32C of its length and
 * payload (fmq_slot.crc, fmq_crc.c), written before the commit CAS publishes it; a
 * message moved into the in-flight table keeps it (fmq_lease.crc).
 *
 * Flushing. A flush is one fdatasync of the file: the kernel writes back the
 * dirty pages, which are the pages touched since the last flush, whoever
 * touched them. Group commit: every commit that must be durable takes a
 * sequence number (dctl->commit_seq, fetch_add after its commit CAS); a
 * flusher elected by a CAS on dctl->flusher reads commit_seq, flushes, and
 * raises dctl->flushed_seq to what it read (CAS-max): every commit with a
 * sequence number at or below it was published before the flush began, so
 * the flush covers it. Producers whose number is not covered yet sleep on
 * dctl->wait (a futex with a deadline) and re-check; so concurrent producers
 * share one flush instead of each paying their own. A waiter that sees no
 * progress for FMQ_FLUSH_PATIENCE_NS flushes on its own (a flush by anyone
 * is always correct), so a flusher killed or frozen mid-flush costs a
 * delay, never a hang.
 *   sync="commit": every put waits for a flush covering its number (put
 *     returns after the flush).
 *   sync="interval": a put that finds the last completed flush older than
 *     the interval flushes (in its own call); closing a handle flushes. No
 *     background thread: with no puts, nothing is flushed until close.
 *   Both: the core's two-step moves (a lease taken out of the ring by
 *     get_message, a lease requeued into it) wait for a flush between the
 *     steps, so a power loss keeps the message on one side or both, never
 *     neither (a plain get() needs none: a consumed message may come back).
 *   sync="none": only closing a handle of an "interval"/"commit" queue
 *     flushes; the OS writes back when it likes.
 *
 * Recovery. The first opener of a file that nobody has open (every
 * registered participant is dead: after a reboot, a power loss, or kill -9
 * of every user) rebuilds the queue from its records alone, holding the
 * init lock, before anyone can use it. No kill -9 recovery (fmq_recover)
 * runs first: it trusts block words and control lines that a power loss
 * may have kept from another flush than the records (see the open).
 *   1. In-flight entries: a LEASED/REQUEUING one whose record checks is kept
 *      as an orphaned lease that is due at once (the redelivery path puts it
 *      back at the end of the queue with its delivery count kept); a DEAD or
 *      TAKING one stays a parked dead letter; FILLING and ACKING ones and any
 *      that fail their check are freed.
 *   2. Slots: a READY or READING slot whose record checks is kept (READING:
 *      its consumer died before the hand-over), unless an in-flight entry
 *      kept in step 1 took that very message. A slot whose record fails its
 *      check is dropped and counted (torn). Two records naming one block
 *      (a power loss can keep an old slot page next to a newer one) keep
 *      the block for the lease, else for the newest record.
 *   3. The kept records, in ticket order, become the ring: in place when
 *      they span less than one lap; otherwise copied to a journal file
 *      (<file>.rebuild, fdatasync'ed), written compactly from ticket 0, and
 *      the journal removed only once that is on disk (an opener finding a
 *      valid journal applies it first). Every other slot gets the stamp
 *      that means "consumed" below the tail and "free" above it.
 *   4. The block pool, the control lines, the participant table and the
 *      flush words are recomputed from scratch; free blocks' pages are
 *      punched; the superblock's other copy gets generation + 1 and the
 *      figures (kept, dropped); one fdatasync ends the rebuild.
 *   Every step is recomputed from the records by the next opener, so a
 *   rebuild killed (or powered off) at any point is simply done again.
 *
 * Memory order. [R-seq] a committer's fetch_add of commit_seq comes after
 * its commit CAS (both seq_cst); the flusher's seq_cst load of commit_seq
 * [A-seq] therefore sees only numbers whose stores precede its fdatasync.
 * [R-flushed] the CAS-max of flushed_seq after the fdatasync returned pairs
 * with [A-flushed], the waiter's load: covered means on disk. The flusher
 * word is a CAS-elected lock whose loss (a dead flusher) costs a waiter
 * FMQ_FLUSH_PATIENCE_NS, never correctness. The rebuild runs alone (init
 * lock held, every other participant dead), so it uses relaxed accesses;
 * its results are published to later openers by the init lock itself.
 *
 * Failure model. kill -9 of any process: the page cache keeps every store,
 * so a durable queue behaves exactly like a shared-memory one (crash
 * recovery, fmq_recover.c). Power loss: any page written since the last
 * completed flush may hold its content at that flush or any later one;
 * recovery never delivers a record that fails its checksum, and keeps what
 * the sync mode promises (README, "Durable queues"). A flush that fails
 * (EIO) is reported to the put that waited for it as an OSError.
 */
#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "fmq_internal.h"
#include "fmq_wait.h"

#define FMQ_FILE_MAGIC "FMQFILE\x01"
#define FMQ_FILE_VERSION 1u
#define FMQ_TRAILER (3 * FMQ_PAGE)
#define FMQ_FLUSH_SLICE_NS 10000000ull        /* a flush waiter re-checks this often  */
#define FMQ_FLUSH_PATIENCE_NS 200000000ull    /* then flushes on its own              */
#define FMQ_OPEN_PATIENCE_NS 60000000000ull   /* another opener rebuilding            */

typedef struct fmq_superblock {
    char magic[8];
    uint32_t version;
    uint32_t abi_version;
    uint32_t layout_hash;
    uint32_t sync_mode;
    uint64_t generation;
    uint64_t sync_interval_ns;
    uint64_t segment_size;
    uint64_t recoveries;
    uint64_t dropped_total;
    uint64_t last_kept;
    uint64_t last_dropped;
    fmq_header header;          /* the segment header, init_state READY */
    uint32_t crc;               /* CRC-32C of every byte above          */
} fmq_superblock;

struct fmq_dctl {
    fmq_u64line commit_seq;     /* commits that asked for durability     */
    fmq_u64line flushed_seq;    /* all of them up to here are on disk    */
    fmq_waitline wait;          /* producers waiting for a flush         */
    fmq_u64line flusher;        /* owner tag + 1 of the flusher, 0: none */
    fmq_u64line last_flush_ns;  /* CLOCK_MONOTONIC end of the last flush */
    fmq_u64line flushes;
};

_Static_assert(sizeof(fmq_superblock) <= FMQ_PAGE, "a superblock copy fills at most one page");
/* The flush words: the last lines of the header page but one (see the
 * top). The page's last line belongs to the Python layer: its shared count
 * of messages that failed authentication is 8 bytes at 4080 of every
 * native segment, files included (fastmq/_auth.py, REJECTED_OFFSET). */
#define FMQ_REJECTED_LINE (FMQ_PAGE - FMQ_LINE)
#define FMQ_DCTL_OFFSET (FMQ_REJECTED_LINE - sizeof(struct fmq_dctl))
_Static_assert(FMQ_DCTL_OFFSET % FMQ_LINE == 0, "the flush words start on a line");
_Static_assert(FMQ_REJECTED_LINE <= 4080 && 4080 + 8 <= FMQ_PAGE,
               "the rejected count's 8 bytes lie in the line the flush words leave free");
_Static_assert(sizeof(fmq_header) <= FMQ_DCTL_OFFSET,
               "the flush words fit in the header page, past the header");

/* ======================================================================== */
/* test hook: images of the file at every completed flush                   */
/* ======================================================================== */

/* FASTMQ_FLUSH_IMAGES=<dir> (read at the first flush; tests only): after
 * each completed flush the flusher copies the file to
 * <dir>/flush-<pid>-<n>.img (written under a temporary name and renamed, so
 * an image that exists is whole), before it reports the flush done. The
 * power-loss simulation builds disk states from these images. */
static const char *fmq_image_dir(void) {
    static int done = 0;
    static const char *dir = NULL;
    if (!done) {
        const char *e = getenv("FASTMQ_FLUSH_IMAGES");
        dir = e && *e ? strdup(e) : NULL;
        done = 1;
    }
    return dir;
}

static void fmq_copy_image(fmq_region *r, uint64_t n) {
    const char *dir = fmq_image_dir();
    if (!dir)
        return;
    char tmp[4096], fin[4096];
    snprintf(tmp, sizeof tmp, "%s/.tmp-%ld-%llu", dir, (long)getpid(), (unsigned long long)n);
    snprintf(fin, sizeof fin, "%s/flush-%ld-%06llu.img", dir, (long)getpid(),
             (unsigned long long)n);
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0)
        return;
    off_t size = lseek(r->fd, 0, SEEK_END);
    static unsigned char buf[1 << 16];
    for (off_t at = 0; at < size;) {
        off_t d = lseek(r->fd, at, SEEK_DATA);
        if (d < 0)
            break;
        off_t h = lseek(r->fd, d, SEEK_HOLE);
        for (off_t x = d; x < h;) {
            size_t want = (size_t)(h - x) < sizeof buf ? (size_t)(h - x) : sizeof buf;
            ssize_t got = pread(r->fd, buf, want, x);
            if (got <= 0)
                break;
            if (pwrite(out, buf, (size_t)got, x) != got)
                break;
            x += got;
        }
        at = h;
    }
    if (ftruncate(out, size) == 0 && close(out) == 0)
        (void)rename(tmp, fin);
    else
        (void)unlink(tmp);
}

/* ======================================================================== */
/* flushing                                                                 */
/* ======================================================================== */

static int fmq_fdatasync(int fd) {
    int rc;
    do
        rc = fdatasync(fd);
    while (rc != 0 && errno == EINTR);
    return rc;
}

static void fmq_max_u64(_Atomic uint64_t *v, uint64_t x) {
    uint64_t cur = atomic_load_explicit(v, memory_order_relaxed);
    while (cur < x && !atomic_compare_exchange_weak_explicit(v, &cur, x, memory_order_seq_cst,
                                                             memory_order_relaxed))
        ;
}

/* One flush covering every commit numbered up to what we read first. */
static int fmq_flush_once(fmq_region *r) {
    struct fmq_dctl *d = r->dctl;
    /* seq_cst: ordered after every commit whose number we cover (their
     * fetch_add came after their commit CAS) and before the fdatasync. */
    uint64_t upto = atomic_load_explicit(&d->commit_seq.v, memory_order_seq_cst);   /* [A-seq] */
    FMQ_CRASHPOINT("durable.flush.before_sync");
    if (fmq_fdatasync(r->fd) != 0)
        return fmq_os_fail("cannot flush durable queue", r->name);
    FMQ_CRASHPOINT("durable.flush.synced");
    uint64_t n = atomic_fetch_add_explicit(&d->flushes.v, 1, memory_order_relaxed) + 1;
    fmq_copy_image(r, n);
    atomic_store_explicit(&d->last_flush_ns.v, fmq_now_ns(), memory_order_relaxed);
    fmq_max_u64(&d->flushed_seq.v, upto);   /* [R-flushed] pairs with [A-flushed] */
    return FMQ_OK;
}

typedef struct {
    struct fmq_dctl *d;
    uint64_t seq;
} fmq_flush_wait_ctx;

/* A sleeping flush waiter's re-check: covered, or nobody flushing. */
static int fmq_flush_settled(void *arg) {
    const fmq_flush_wait_ctx *c = arg;
    return atomic_load_explicit(&c->d->flushed_seq.v, memory_order_seq_cst) >= c->seq ||
           atomic_load_explicit(&c->d->flusher.v, memory_order_seq_cst) == 0;   /* [S-wait] */
}

/* Wait until commit number `seq` is on disk, flushing ourselves when nobody
 * else is (group commit, see the header). */
static int fmq_flush_until(fmq_region *r, uint64_t seq) {
    struct fmq_dctl *d = r->dctl;
    uint64_t waited_since = 0;
    for (;;) {
        /* [A-flushed]: a number covered means the fdatasync that covered it
         * returned before the flusher published it ([R-flushed]). */
        if (atomic_load_explicit(&d->flushed_seq.v, memory_order_seq_cst) >= seq)
            return FMQ_OK;
        uint64_t zero = 0;
        if (atomic_compare_exchange_strong_explicit(&d->flusher.v, &zero,
                                                    (uint64_t)r->owner_tag + 1,
                                                    memory_order_seq_cst,
                                                    memory_order_relaxed)) {
            int rc = fmq_flush_once(r);
            /* [S-wait] the release of the flusher word, then the wake */
            atomic_store_explicit(&d->flusher.v, 0, memory_order_seq_cst);
            fmq_waitline_wake(&d->wait, INT_MAX);
            if (rc != FMQ_OK)
                return rc;
            continue;
        }
        /* Someone is flushing: sleep until it is done (a slice at most). */
        uint64_t now = fmq_now_ns();
        if (!waited_since)
            waited_since = now;
        if (now - waited_since > FMQ_FLUSH_PATIENCE_NS) {
            /* The flusher is slow, frozen or dead: flushing again is
             * always correct, and our number is covered by our own. A dead
             * one's word is cleared, or every later flush would wait here. */
            uint64_t f = atomic_load_explicit(&d->flusher.v, memory_order_acquire);
            int rc = fmq_flush_once(r);
            if (f && fmq_tag_is_dead(r, (uint32_t)(f - 1)))
                atomic_compare_exchange_strong_explicit(&d->flusher.v, &f, 0,
                                                        memory_order_seq_cst,
                                                        memory_order_relaxed);
            if (rc != FMQ_OK)
                return rc;
            waited_since = 0;
            continue;
        }
        fmq_flush_wait_ctx ctx = {d, seq};
        (void)fmq_waitline_sleep(&d->wait, fmq_flush_settled, &ctx, now + FMQ_FLUSH_SLICE_NS);
    }
}

static int fmq_barrier(fmq_region *r) {
    /* After our commit CAS (seq_cst): a flusher that reads a commit_seq
     * including our number started its fdatasync after our stores. */
    uint64_t seq = atomic_fetch_add_explicit(&r->dctl->commit_seq.v, 1,
                                             memory_order_seq_cst) + 1;   /* [R-seq] */
    return fmq_flush_until(r, seq);
}

static int fmq_durable_barrier_for_move(fmq_region *r) {
    /* "interval" too: it keeps every put older than the last flush, and a
     * leased, unacked message is still one of them. */
    if (!r->durable || r->sync_mode == FMQ_SYNC_NONE)
        return FMQ_OK;
    return fmq_barrier(r);
}

/* The one decision of every put path (the binding asks this first, with
 * its lock held, and releases it only for fmq_durable_flush when this says
 * a flush is due). */
int fmq_durable_sync_due(fmq_region *r) {
    if (!r->durable)
        return 0;
    if (r->sync_mode == FMQ_SYNC_COMMIT)
        return 1;
    if (r->sync_mode == FMQ_SYNC_INTERVAL) {
        uint64_t last = atomic_load_explicit(&r->dctl->last_flush_ns.v, memory_order_relaxed);
        uint64_t now = fmq_now_ns();
        /* A value from the future is from another boot's clock: too old. */
        return last > now || now - last >= r->sync_interval_ns;
    }
    return 0;
}

int fmq_durable_flush(fmq_region *r) {
    if (!r->durable)
        return fmq_fail(FMQ_EINVAL, "queue %s is not a durable queue", r->name);
    return fmq_barrier(r);
}

static void fmq_durable_on_close(fmq_region *r) {
    if (r->sync_mode != FMQ_SYNC_NONE && r->dctl)
        (void)fmq_barrier(r);
}

/* The core's upcalls (fmq_region.c's set) plus the two of a durable queue. */
static const fmq_upcalls fmq_upcalls_durable = {
    FMQ_UPCALLS_CORE,
    .durable_barrier = fmq_durable_barrier_for_move,
    .durable_close = fmq_durable_on_close,
};

int fmq_durable_info_get(fmq_region *r, fmq_durable_info *out) {
    memset(out, 0, sizeof *out);
    if (!r->durable)
        return fmq_fail(FMQ_EINVAL, "queue %s is not a durable queue", r->name);
    out->sync_mode = r->sync_mode;
    out->sync_interval_ns = r->sync_interval_ns;
    out->generation = r->dur_generation;
    out->kept = r->dur_kept;
    out->dropped = r->dur_dropped;
    out->flushes = atomic_load_explicit(&r->dctl->flushes.v, memory_order_relaxed);
    /* The superblock's figures, from its valid copy (read with pread: a
     * copy is only ever rewritten by a rebuild, under the init lock). */
    fmq_superblock sb;
    for (int k = 0; k < 2; k++) {
        if (pread(r->fd, &sb, sizeof sb, (off_t)(r->g.total_size + (uint64_t)k * FMQ_PAGE)) ==
                (ssize_t)sizeof sb &&
            sb.crc == fmq_crc32c(0, &sb, offsetof(fmq_superblock, crc)) &&
            sb.generation == r->dur_generation) {
            out->recoveries = sb.recoveries;
            out->dropped_total = sb.dropped_total;
        }
    }
    return FMQ_OK;
}

/* ======================================================================== */
/* superblocks                                                              */
/* ======================================================================== */

static void fmq_sb_seal(fmq_superblock *sb) {
    sb->crc = fmq_crc32c(0, sb, offsetof(fmq_superblock, crc));
}

/* 1: valid and ours; 0: not a superblock at all; -1: another version. */
static int fmq_sb_check(const fmq_superblock *sb, uint64_t file_size) {
    if (memcmp(sb->magic, FMQ_FILE_MAGIC, 7) != 0)
        return 0;
    if (sb->crc != fmq_crc32c(0, sb, offsetof(fmq_superblock, crc)))
        return 0;
    if (sb->magic[7] != FMQ_FILE_MAGIC[7] || sb->version != FMQ_FILE_VERSION ||
        sb->abi_version != FMQ_ABI_VERSION || sb->layout_hash != fmq_layout_hash())
        return -1;
    if (sb->segment_size + FMQ_TRAILER != file_size || sb->sync_mode > FMQ_SYNC_COMMIT)
        return 0;
    return 1;
}

static int fmq_sb_write(fmq_region *r, int which, fmq_superblock *sb) {
    fmq_sb_seal(sb);
    unsigned char page[FMQ_PAGE];
    memset(page, 0, sizeof page);
    memcpy(page, sb, sizeof *sb);
    if (pwrite(r->fd, page, sizeof page, (off_t)(r->g.total_size + (uint64_t)which * FMQ_PAGE)) !=
        (ssize_t)sizeof page)
        return fmq_os_fail("cannot write the superblock of", r->name);
    return FMQ_OK;
}

/* ======================================================================== */
/* create                                                                   */
/* ======================================================================== */

static int fmq_dir_fsync(const char *path) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (slash == dir)
        dir[1] = '\0';
    else
        *slash = '\0';
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

static int fmq_bind_durable(fmq_region *r, const char *path) {
    r->durable = 1;
    r->up = &fmq_upcalls_durable;
    r->dctl = (struct fmq_dctl *)(r->base + FMQ_DCTL_OFFSET);
    r->dur_path = strdup(path);
    return r->dur_path ? FMQ_OK : fmq_fail(FMQ_EOS, "out of memory");
}

/* Page-sized faults on the file's mapping, without read-around. Pages
 * faulted in with read-around (as by the rebuild's scan when a closed file
 * is opened) can enter the page cache as large folios, and a store into one
 * page of a folio dirties all of it: every commit's fdatasync then writes
 * whole folios for a record of one page (measured on ext4: a sync="commit"
 * put on a reopened file took about ten times as long). With this advice a
 * flush writes the pages that were stored into. */
static void fmq_durable_advise(fmq_region *r) {
    (void)madvise(r->base, r->size, MADV_RANDOM);
}

/* Without read-around, a rebuild after a reboot faults the file in a page
 * at a time: ask the kernel to read the file's data ahead instead (its
 * allocated ranges only: the file is sparse), so that the rebuild's faults
 * mostly find it in memory. */
static void fmq_durable_prefetch(fmq_region *r) {
    off_t size = (off_t)r->size;
    for (off_t at = 0; at < size;) {
        off_t d = lseek(r->fd, at, SEEK_DATA);
        if (d < 0)
            break;
        off_t h = lseek(r->fd, d, SEEK_HOLE);
        if (h <= d)
            break;
        (void)posix_fadvise(r->fd, d, h - d, POSIX_FADV_WILLNEED);
        at = h;
    }
}

/* tmpfs and ramfs keep nothing across a reboot: not a place for a durable
 * queue (use shm: for that). */
static int fmq_fs_is_durable(int fd) {
    struct statfs sf;
    if (fstatfs(fd, &sf) != 0)
        return 1;
    return sf.f_type != 0x01021994 /* TMPFS_MAGIC */ && sf.f_type != (long)0x858458f6 /* RAMFS */;
}

int fmq_durable_create(const char *path, const char *name, const fmq_params *p, unsigned mode,
                       int exist_ok, uint32_t sync_mode, uint64_t sync_interval_ns,
                       fmq_region **out) {
    int rc;
    if (!fmq_name_ok(name))
        return fmq_fail(FMQ_EINVAL, "invalid queue name %.64s", name);
    fmq_geometry g;
    if ((rc = fmq_region_create_check(p, mode, &g)))
        return rc;
    if (sync_mode > FMQ_SYNC_COMMIT)
        return fmq_fail(FMQ_EINVAL, "unknown sync mode %u", sync_mode);
    if (strlen(path) > 4000)
        return fmq_fail(FMQ_EINVAL, "path too long");
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!exist_ok)
            return fmq_fail(FMQ_EEXIST, "durable queue %s already exists (%s)", name, path);
        return fmq_durable_open(path, name, out);
    }

    char tmp[4200];
    uint64_t rnd = fmq_now_ns() ^ ((uint64_t)getpid() << 32);
    snprintf(tmp, sizeof tmp, "%s.tmp-%ld-%llx", path, (long)getpid(), (unsigned long long)rnd);
    int fd = fmq_open_path(tmp, O_RDWR | O_CREAT | O_EXCL, mode);
    if (fd < 0)
        return fmq_os_fail("cannot create the file of durable queue", name);
    if (!fmq_fs_is_durable(fd)) {
        close(fd);
        unlink(tmp);
        return fmq_fail(FMQ_EINVAL, "%s is on tmpfs or ramfs, which does not survive a reboot: "
                                    "put durable queues on a disk filesystem (or use shm: for "
                                    "a queue in memory)", path);
    }
    fmq_region *r;
    if ((rc = fmq_region_create_new(name, fd, tmp, mode, &r)))
        return rc;
    uint64_t fsize = g.total_size + FMQ_TRAILER;
    if (ftruncate(fd, (off_t)fsize) != 0)
        goto os_error;
    /* Header, control lines, participants and the trailer: reserved now, so
     * a full disk is an error here rather than a SIGBUS later. */
    if ((rc = posix_fallocate(fd, 0, (off_t)g.ring_offset)) != 0 ||
        (rc = posix_fallocate(fd, (off_t)g.total_size, FMQ_TRAILER)) != 0) {
        if (rc != EOPNOTSUPP && rc != EINVAL) {
            errno = rc;
            goto os_error;
        }
    }
    if ((rc = fmq_region_map(r, (size_t)fsize, MAP_SHARED,
                             "cannot set up the file of durable queue")) != FMQ_OK)
        goto fail;
    fmq_durable_advise(r);
    /* A durable queue's handle before the format (fmq_region_format). */
    if ((rc = fmq_bind_durable(r, path)) != FMQ_OK)
        goto fail;
    r->sync_mode = sync_mode;
    r->sync_interval_ns = sync_interval_ns;

    if (fmq_region_format(r, &g, p) != FMQ_OK) {
        errno = ENOSPC;
        goto os_error;
    }
    fmq_header *h = r->hdr;
    atomic_store_explicit(&h->init_state, FMQ_INIT_READY, memory_order_release);

    fmq_superblock sb;
    memset(&sb, 0, sizeof sb);
    memcpy(sb.magic, FMQ_FILE_MAGIC, 8);
    sb.version = FMQ_FILE_VERSION;
    sb.abi_version = FMQ_ABI_VERSION;
    sb.layout_hash = fmq_layout_hash();
    sb.sync_mode = sync_mode;
    sb.sync_interval_ns = sync_interval_ns;
    sb.segment_size = g.total_size;
    memcpy(&sb.header, h, sizeof sb.header);
    for (int k = 0; k < 2; k++) {
        sb.generation = (uint64_t)k + 1;
        if ((rc = fmq_sb_write(r, k, &sb)) != FMQ_OK)
            goto fail;
    }
    r->dur_generation = 2;
    atomic_store_explicit(&r->dctl->last_flush_ns.v, fmq_now_ns(), memory_order_relaxed);
    /* The whole file is on disk before its name appears. */
    if (fmq_fdatasync(fd) != 0)
        goto os_error;
    if ((rc = fmq_live_register(r)) != FMQ_OK)
        goto fail;
    FMQ_CRASHPOINT("durable.create.before_link");
    if (fmq_region_create_link(r, tmp, path) != 0) {
        if (errno == EEXIST) {
            if (!exist_ok)
                return fmq_fail(FMQ_EEXIST, "durable queue %s already exists (%s)", name, path);
            return fmq_durable_open(path, name, out);
        }
        return fmq_os_fail("cannot link the file into place for durable queue", name);
    }
    (void)fmq_dir_fsync(path);
    *out = r;
    return FMQ_OK;

os_error:
    rc = fmq_os_fail("cannot set up the file of durable queue", name);
fail:
    unlink(tmp);
    fmq_region_free(r);
    return rc;
}

/* ======================================================================== */
/* rebuild                                                                  */
/* ======================================================================== */

typedef struct {
    uint64_t ticket;    /* full ticket, laps taken near the reference lap */
    uint32_t slot;
    uint32_t block;
    uint32_t len;
} fmq_cand;

static int fmq_cand_cmp(const void *a, const void *b) {
    uint64_t x = ((const fmq_cand *)a)->ticket, y = ((const fmq_cand *)b)->ticket;
    return x < y ? -1 : x > y;
}

static inline fmq_slot *fmq_dslot(fmq_region *r, uint64_t i) {
    return (fmq_slot *)(r->ring + i * r->g.slot_stride);
}

static inline fmq_lease *fmq_dlease(fmq_region *r, uint64_t i) {
    return (fmq_lease *)(r->leases + i * r->g.lease_stride);
}

/* The payload of a record if len/block are in range, else NULL. Blocks are
 * checked against the class's whole index range (carved[] is rebuilt). */
static const unsigned char *fmq_rec_payload(fmq_region *r, uint32_t len, uint32_t block,
                                            const unsigned char *inline_at) {
    if (block == FMQ_NO_BLOCK)
        return len <= r->inline_max ? inline_at : NULL;
    uint32_t c = FMQ_BLOCK_CLASS(block);
    if (c >= r->g.nclasses || FMQ_BLOCK_INDEX(block) >= r->g.classes[c].nblocks ||
        len > r->g.classes[c].block_size)
        return NULL;
    return r->base + r->g.classes[c].data_offset +
           (uint64_t)FMQ_BLOCK_INDEX(block) * r->g.classes[c].block_size;
}

static uint64_t fmq_dlap_near(uint64_t stamp_lap, uint64_t ref_lap) {
    const uint64_t m = FMQ_LAP_MASK;
    int64_t d = (int64_t)(((stamp_lap - ref_lap) & m) << (64 - (FMQ_STAMP_BITS - 2))) >>
                (64 - (FMQ_STAMP_BITS - 2));
    return d < 0 && (uint64_t)-d > ref_lap ? stamp_lap : ref_lap + (uint64_t)d;
}

static inline uint64_t fmq_dword(uint64_t ticket, uint64_t n, uint32_t phase_plus) {
    return fmq_word((ticket / n) * 4 + phase_plus, 0);   /* nobody owns it */
}

static void fmq_reserve_range(fmq_region *r, uint64_t off, uint64_t len) {
    if (!len)
        return;
    uint64_t a = off / FMQ_PAGE * FMQ_PAGE, b = (off + len + FMQ_PAGE - 1) / FMQ_PAGE * FMQ_PAGE;
    (void)fallocate(r->fd, 0, (off_t)a, (off_t)(b - a));
}

static void fmq_punch_range(fmq_region *r, uint64_t off, uint64_t len) {
    uint64_t a = (off + FMQ_PAGE - 1) / FMQ_PAGE * FMQ_PAGE, b = (off + len) / FMQ_PAGE * FMQ_PAGE;
    if (b > a)
        (void)fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)a,
                        (off_t)(b - a));
}

/* Journal of a compaction: a header, then per record its new slot image. */
typedef struct {
    char magic[8];
    uint64_t count, stride, generation;
    uint32_t crc, pad_;
} fmq_journal_hdr;
#define FMQ_JOURNAL_MAGIC "FMQJRNL\x01"

static int fmq_journal_apply(fmq_region *r, const char *jpath, int *applied) {
    *applied = 0;
    int fd = open(jpath, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return FMQ_OK;
    fmq_journal_hdr jh;
    struct stat st;
    int ok = fstat(fd, &st) == 0 && pread(fd, &jh, sizeof jh, 0) == (ssize_t)sizeof jh &&
             memcmp(jh.magic, FMQ_JOURNAL_MAGIC, 8) == 0 && jh.stride == r->g.slot_stride &&
             jh.count <= r->g.slot_count &&
             (uint64_t)st.st_size == sizeof jh + jh.count * jh.stride;
    unsigned char *img = NULL;
    if (ok && jh.count) {
        img = malloc(jh.count * jh.stride);
        ok = img && pread(fd, img, jh.count * jh.stride, sizeof jh) ==
                        (ssize_t)(jh.count * jh.stride);
    }
    if (ok) {
        uint32_t c = fmq_crc32c(0, &jh, offsetof(fmq_journal_hdr, crc));
        ok = jh.crc == (img ? fmq_crc32c(c, img, jh.count * jh.stride) : c);
    }
    close(fd);
    if (ok) {
        /* Slots 0..count-1 get the records; every other slot that was ever
         * written gets the all-zero word (EMPTY, lap 0). */
        uint64_t n = r->g.slot_count, hi = jh.count + FMQ_RING_MARGIN + 256;
        fmq_reserve_range(r, r->g.ring_offset, (hi < n ? hi : n) * r->g.slot_stride);
        for (uint64_t i = 0; i < jh.count; i++)
            memcpy(fmq_dslot(r, i), img + i * jh.stride, jh.stride);
        for (uint64_t i = jh.count; i < n; i++)
            if (atomic_load_explicit(&fmq_dslot(r, i)->word, memory_order_relaxed) != 0)
                atomic_store_explicit(&fmq_dslot(r, i)->word, 0, memory_order_relaxed);
        FMQ_CRASHPOINT("durable.journal.applied");
        if (fmq_fdatasync(r->fd) != 0) {
            free(img);
            return fmq_os_fail("cannot flush durable queue", r->name);
        }
        *applied = 1;
    }
    free(img);
    /* Applied and on disk, or invalid (a rebuild died while writing it,
     * before touching the ring): either way it must not be applied again. */
    unlink(jpath);
    (void)fmq_dir_fsync(jpath);
    return FMQ_OK;
}

static int fmq_journal_write(fmq_region *r, const char *jpath, const unsigned char *img,
                             uint64_t count) {
    char tmp[4400];
    snprintf(tmp, sizeof tmp, "%s.tmp", jpath);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return fmq_os_fail("cannot write the recovery journal of", r->name);
    fmq_journal_hdr jh;
    memset(&jh, 0, sizeof jh);
    memcpy(jh.magic, FMQ_JOURNAL_MAGIC, 8);
    jh.count = count;
    jh.stride = r->g.slot_stride;
    jh.generation = r->dur_generation;
    uint32_t c = fmq_crc32c(0, &jh, offsetof(fmq_journal_hdr, crc));
    jh.crc = count ? fmq_crc32c(c, img, count * jh.stride) : c;
    int ok = write(fd, &jh, sizeof jh) == (ssize_t)sizeof jh &&
             (count == 0 ||
              write(fd, img, count * jh.stride) == (ssize_t)(count * jh.stride)) &&
             fmq_fdatasync(fd) == 0;
    close(fd);
    if (!ok || rename(tmp, jpath) != 0 || fmq_dir_fsync(jpath) != 0) {
        unlink(tmp);
        return fmq_os_fail("cannot write the recovery journal of", r->name);
    }
    FMQ_CRASHPOINT("durable.journal.written");
    return FMQ_OK;
}

/* Alone, holding the init lock: rebuild everything from the records. */
static int fmq_durable_rebuild(fmq_region *r, fmq_superblock *sb, int which_old) {
    const uint64_t n = r->g.slot_count;
    uint64_t total_blocks = 0;
    for (uint32_t c = 0; c < r->g.nclasses; c++)
        total_blocks += r->g.classes[c].nblocks;
    char jpath[4300];
    snprintf(jpath, sizeof jpath, "%s.rebuild", r->dur_path);
    int applied, rc;
    if ((rc = fmq_journal_apply(r, jpath, &applied)) != FMQ_OK)
        return rc;

    /* claimed[ordinal]: pages+1 of the record that keeps the block (0: free) */
    uint32_t *claimed = calloc(total_blocks ? total_blocks : 1, sizeof *claimed);
    fmq_cand *cand = calloc(n, sizeof *cand);
    uint64_t *taken = calloc(n, sizeof *taken);   /* src tickets of kept leases */
    if (!claimed || !cand || !taken) {
        free(claimed);
        free(cand);
        free(taken);
        return fmq_fail(FMQ_EOS, "out of memory rebuilding durable queue %s", r->name);
    }
    uint64_t kept = 0, dropped = 0, abandoned = 0, ntaken = 0, lease_hi = 0, orphans = 0;

    /* 1. in-flight entries (all of them: the reservation mark may be stale) */
    for (uint64_t i = 0; i < n; i++) {
        fmq_lease *e = fmq_dlease(r, i);
        uint64_t w = atomic_load_explicit(&e->word, memory_order_relaxed);
        uint32_t st = FMQ_LSTATE(w), tok = FMQ_LTOKEN(w);
        if (st == FMQ_LS_FREE) {
            if (FMQ_LOWNER(w))   /* a FREE word names nobody */
                atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_FREE, 0),
                                      memory_order_relaxed);
            continue;
        }
        int keep = 0;
        uint32_t len = FMQ_ONCE(e->len), block = FMQ_ONCE(e->block);
        if (st == FMQ_LS_LEASED || st == FMQ_LS_REQUEUING || st == FMQ_LS_DEAD ||
            st == FMQ_LS_TAKING) {
            const unsigned char *pl =
                fmq_rec_payload(r, len, block, (unsigned char *)e + FMQ_LEASE_HEADER);
            keep = pl && FMQ_ONCE(e->crc) == fmq_record_crc(len, pl);
            if (keep && block != FMQ_NO_BLOCK) {
                int64_t o = fmq_block_ordinal(r, block);
                if (o < 0 || claimed[o])
                    keep = 0;   /* another entry keeps that block */
                else
                    claimed[o] = (len + FMQ_PAGE - 1) / FMQ_PAGE + 1;
            }
            if (!keep)
                dropped++;
        }
        if (!keep) {
            atomic_store_explicit(&e->holder, 0, memory_order_relaxed);
            atomic_store_explicit(&e->word, FMQ_LWORD(tok, FMQ_LS_FREE, 0),
                                  memory_order_relaxed);
            continue;
        }
        int dead = st == FMQ_LS_DEAD || st == FMQ_LS_TAKING;
        taken[ntaken++] = FMQ_ONCE(e->src_ticket);
        atomic_store_explicit(&e->holder, 0, memory_order_relaxed);
        atomic_store_explicit(&e->pin, FMQ_PIN(tok, FMQ_PIN_NONE), memory_order_relaxed);
        atomic_store_explicit(&e->deadline_ns, 0, memory_order_relaxed);   /* due now */
        atomic_store_explicit(&e->word, FMQ_LWORD(tok, dead ? FMQ_LS_DEAD : FMQ_LS_LEASED, 0),
                              memory_order_relaxed);
        orphans += !dead;
        kept++;
        if (i + 1 > lease_hi)
            lease_hi = i + 1;
    }
    FMQ_CRASHPOINT("durable.rebuild.leases");

    /* 2. slots */
    uint64_t k = 0, ref = 0;
    int have_ref = 0;
    const uint64_t lapmask = FMQ_LAP_MASK;
    for (uint64_t i = 0; i < n; i++) {
        fmq_slot *s = fmq_dslot(r, i);
        uint64_t w = atomic_load_explicit(&s->word, memory_order_relaxed);
        uint64_t stamp = fmq_stamp(w);
        uint32_t ph = fmq_stamp_phase(stamp);
        if (ph == FMQ_PH_WRITING) {
            abandoned++;
            continue;
        }
        if (ph != FMQ_PH_READY && ph != FMQ_PH_READING)
            continue;
        uint64_t lap = fmq_stamp_lap(stamp);
        if (ph == FMQ_PH_READING) {
            int was_taken = 0;
            for (uint64_t t = 0; t < ntaken && !was_taken; t++)
                was_taken = taken[t] % n == i && ((taken[t] / n) & lapmask) == lap;
            if (was_taken)
                continue;   /* its message lives on in a kept entry */
        }
        uint32_t len = FMQ_ONCE(s->len), block = FMQ_ONCE(s->block);
        const unsigned char *pl =
            fmq_rec_payload(r, len, block, (unsigned char *)s + FMQ_SLOT_HEADER);
        if (!pl || FMQ_ONCE(s->crc) != fmq_record_crc(len, pl)) {
            dropped++;
            continue;
        }
        if (!have_ref) {
            ref = lap;
            have_ref = 1;
        }
        cand[k].ticket = fmq_dlap_near(lap, ref) * n + i;
        cand[k].slot = (uint32_t)i;
        cand[k].block = block;
        cand[k].len = len;
        k++;
    }
    qsort(cand, k, sizeof *cand, fmq_cand_cmp);
    /* Block claims, newest record first; a loser is an older copy whose
     * block was reused (so it was consumed): not kept, not counted torn. */
    uint64_t m = 0;
    for (uint64_t j = k; j-- > 0;) {
        if (cand[j].block != FMQ_NO_BLOCK) {
            int64_t o = fmq_block_ordinal(r, cand[j].block);
            if (o < 0 || claimed[o]) {
                cand[j].slot = UINT32_MAX;
                continue;
            }
            claimed[o] = (cand[j].len + FMQ_PAGE - 1) / FMQ_PAGE + 1;
        }
    }
    for (uint64_t j = 0; j < k; j++)
        if (cand[j].slot != UINT32_MAX)
            cand[m++] = cand[j];
    k = m;
    kept += k;
    FMQ_CRASHPOINT("durable.rebuild.scanned");

    /* 3. the ring */
    uint64_t head = 0, tail = 0, ring_hi = 0;
    if (k && cand[k - 1].ticket - cand[0].ticket < n) {
        /* In place: each slot gets the stamp its ticket in the window
         * [first, first + n) calls for. */
        head = cand[0].ticket;
        tail = cand[k - 1].ticket + 1;
        unsigned char *is_kept = calloc(n, 1);
        if (!is_kept) {
            free(claimed);
            free(cand);
            free(taken);
            return fmq_fail(FMQ_EOS, "out of memory rebuilding durable queue %s", r->name);
        }
        for (uint64_t j = 0; j < k; j++)
            is_kept[cand[j].slot] = 1;
        /* Slots that will be written: reserve their pages first. */
        for (uint64_t i = 0; i < n; i++)
            if (is_kept[i] || atomic_load_explicit(&fmq_dslot(r, i)->word,
                                                   memory_order_relaxed) != 0)
                ring_hi = i + 1;
        uint64_t first_lap_end = head < n ? (tail < n ? tail : n) : n;
        if (first_lap_end > ring_hi)
            ring_hi = first_lap_end;
        fmq_reserve_range(r, r->g.ring_offset, ring_hi * r->g.slot_stride);
        for (uint64_t i = 0; i < n; i++) {
            uint64_t x = head + ((i + n - head % n) % n);   /* i's ticket in the window */
            uint64_t want = is_kept[i] ? fmq_dword(x, n, FMQ_PH_READY)
                            : x < tail ? fmq_dword(x, n, 4)   /* consumed */
                                       : fmq_dword(x, n, FMQ_PH_EMPTY);
            _Atomic uint64_t *sw = &fmq_dslot(r, i)->word;
            if (atomic_load_explicit(sw, memory_order_relaxed) != want)
                atomic_store_explicit(sw, want, memory_order_relaxed);
        }
        free(is_kept);
    } else if (k) {
        /* More than a lap apart (a power loss kept pages of different
         * laps): compact through the journal, from ticket 0. */
        unsigned char *img = malloc(k * r->g.slot_stride);
        if (!img) {
            free(claimed);
            free(cand);
            free(taken);
            return fmq_fail(FMQ_EOS, "out of memory rebuilding durable queue %s", r->name);
        }
        for (uint64_t j = 0; j < k; j++) {
            unsigned char *dst = img + j * r->g.slot_stride;
            memcpy(dst, fmq_dslot(r, cand[j].slot), r->g.slot_stride);
            uint64_t word = fmq_dword(j, n, FMQ_PH_READY);
            memcpy(dst, &word, sizeof word);
        }
        rc = fmq_journal_write(r, jpath, img, k);
        free(img);
        if (rc == FMQ_OK)
            rc = fmq_journal_apply(r, jpath, &applied);
        if (rc != FMQ_OK) {
            free(claimed);
            free(cand);
            free(taken);
            return rc;
        }
        head = 0;
        tail = k;
        ring_hi = k;
    } else {
        for (uint64_t i = 0; i < n; i++) {
            _Atomic uint64_t *sw = &fmq_dslot(r, i)->word;
            if (atomic_load_explicit(sw, memory_order_relaxed) != 0)
                atomic_store_explicit(sw, 0, memory_order_relaxed);
        }
    }
    free(cand);
    free(taken);
    FMQ_CRASHPOINT("durable.rebuild.ring");

    /* 4. control lines and participants: recomputed from scratch (the
     * carve marks are kept when sane, raised to cover every kept block). */
    fmq_ctl *ctl = r->ctl;
    uint64_t carved_of[FMQ_MAX_CLASSES];
    for (uint32_t c = 0; c < r->g.nclasses; c++)
        carved_of[c] = atomic_load_explicit(&ctl->carved[c], memory_order_relaxed);
    uint64_t rc_mark = (ring_hi + FMQ_RING_MARGIN + 256) / 256 * 256;
    if (rc_mark > n)
        rc_mark = n;
    uint64_t old_mark = atomic_load_explicit(&ctl->ring_committed.v, memory_order_relaxed);
    if (old_mark <= n && old_mark > rc_mark)
        rc_mark = old_mark;
    fmq_reserve_range(r, r->g.ring_offset, rc_mark * r->g.slot_stride);
    uint64_t lc_mark = atomic_load_explicit(&ctl->lease_committed.v, memory_order_relaxed);
    if (lc_mark > n)
        lc_mark = 0;
    if (lease_hi > lc_mark)
        lc_mark = lease_hi;
    lc_mark = (lc_mark + 255) / 256 * 256;
    if (lc_mark < 256)
        lc_mark = 256;
    if (lc_mark > n)
        lc_mark = n;
    fmq_reserve_range(r, r->g.lease_offset, lc_mark * r->g.lease_stride);
    uint64_t retired[FMQ_NSTATS];
    for (int i = 0; i < FMQ_NSTATS; i++)
        retired[i] = atomic_load_explicit(&ctl->retired[i], memory_order_relaxed);
    for (uint32_t p = 0; p < r->g.nparticipants; p++) {
        fmq_participant *pp = &r->parts[p];
        for (int i = 0; i < FMQ_NSTATS; i++)
            retired[i] += atomic_load_explicit(&pp->stats[i], memory_order_relaxed);
        uint64_t id = atomic_load_explicit(&pp->ident, memory_order_relaxed);
        memset((void *)pp, 0, sizeof *pp);
        /* keep the generation, so a tag of the previous run never matches */
        atomic_store_explicit(&pp->ident, FMQ_PART_IDENT(0, FMQ_PART_GEN(id), FMQ_PART_FREE),
                              memory_order_relaxed);
    }
    retired[FMQ_ST_ABANDONED] += abandoned;
    uint64_t recoveries = atomic_load_explicit(&ctl->recoveries.v, memory_order_relaxed);
    memset((void *)ctl, 0, sizeof *ctl);
    for (int i = 0; i < FMQ_NSTATS; i++)
        atomic_store_explicit(&ctl->retired[i], retired[i], memory_order_relaxed);
    atomic_store_explicit(&ctl->recoveries.v, recoveries, memory_order_relaxed);
    atomic_store_explicit(&ctl->head.v, head, memory_order_relaxed);
    atomic_store_explicit(&ctl->tail.v, tail, memory_order_relaxed);
    atomic_store_explicit(&ctl->ring_committed.v, rc_mark, memory_order_relaxed);
    atomic_store_explicit(&ctl->lease_committed.v, lc_mark, memory_order_relaxed);
    atomic_store_explicit(&ctl->next_due.v, orphans ? 1 : 0, memory_order_relaxed);

    /* 5. the pool: kept blocks hold the ring's share, every other carved
     * block is free, without pages, on its cold stack. */
    uint64_t in_use = 0;
    int64_t base = 0;
    for (uint32_t c = 0; c < r->g.nclasses; c++) {
        uint64_t nb = r->g.classes[c].nblocks;
        uint64_t carved = carved_of[c];
        if (carved > nb)
            carved = 0;   /* scribbled: recomputed from the records */
        for (uint64_t b = carved; b < nb; b++)
            if (claimed[base + (int64_t)b])
                carved = b + 1;
        carved = (carved + 255) / 256 * 256;   /* whole metadata pages (FMQ_CARVE) */
        if (carved > nb)
            carved = nb;
        fmq_block_meta *meta = (fmq_block_meta *)(r->base + r->g.classes[c].meta_offset);
        fmq_reserve_range(r, r->g.classes[c].meta_offset, carved * sizeof(fmq_block_meta));
        uint64_t bs = r->g.classes[c].block_size;
        uint32_t first = FMQ_NIL, prev = FMQ_NIL;
        uint64_t run = UINT64_MAX;   /* start of a run of free blocks to punch */
        for (uint64_t b = 0; b <= carved; b++) {
            uint32_t cl = b < carved ? claimed[base + (int64_t)b] : 1;
            if (cl && run != UINT64_MAX) {
                fmq_punch_range(r, r->g.classes[c].data_offset + run * bs, (b - run) * bs);
                run = UINT64_MAX;
            }
            if (b == carved)
                break;
            if (cl) {
                uint64_t pages = cl - 1;
                fmq_reserve_range(r, r->g.classes[c].data_offset + b * bs, pages * FMQ_PAGE);
                atomic_store_explicit(&meta[b].state, FMQ_BLK_IN_RING, memory_order_relaxed);
                atomic_store_explicit(&meta[b].pages, (uint32_t)pages, memory_order_relaxed);
                atomic_store_explicit(&meta[b].next, FMQ_NIL, memory_order_relaxed);
                in_use += pages * FMQ_PAGE;
                continue;
            }
            if (run == UINT64_MAX)
                run = b;
            atomic_store_explicit(&meta[b].state, 0, memory_order_relaxed);
            atomic_store_explicit(&meta[b].pages, 0, memory_order_relaxed);
            atomic_store_explicit(&meta[b].next, FMQ_NIL, memory_order_relaxed);
            if (prev == FMQ_NIL)
                first = (uint32_t)b;
            else
                atomic_store_explicit(&meta[prev].next, (uint32_t)b, memory_order_relaxed);
            prev = (uint32_t)b;
        }
        atomic_store_explicit(&ctl->carved[c], carved, memory_order_relaxed);
        atomic_store_explicit(&ctl->free_top[c].v, FMQ_NIL, memory_order_relaxed);
        atomic_store_explicit(&ctl->cold_top[c].v, first, memory_order_relaxed);
        base += (int64_t)nb;
    }
    free(claimed);
    atomic_store_explicit(&ctl->pool_in_use.v, in_use, memory_order_relaxed);
    FMQ_CRASHPOINT("durable.rebuild.pool");

    /* 6. flush words, then the superblock's other copy, then one flush. */
    memset((void *)r->dctl, 0, sizeof *r->dctl);
    atomic_store_explicit(&r->dctl->last_flush_ns.v, fmq_now_ns(), memory_order_relaxed);
    atomic_store_explicit(&r->hdr->init_state, FMQ_INIT_READY, memory_order_relaxed);
    sb->generation++;
    sb->recoveries++;
    sb->last_kept = kept;
    sb->last_dropped = dropped;
    sb->dropped_total += dropped;
    if ((rc = fmq_sb_write(r, which_old, sb)) != FMQ_OK)
        return rc;
    FMQ_CRASHPOINT("durable.rebuild.before_flush");
    if (fmq_fdatasync(r->fd) != 0)
        return fmq_os_fail("cannot flush durable queue", r->name);
    r->dur_generation = sb->generation;
    r->dur_kept = kept;
    r->dur_dropped = dropped;
    return FMQ_OK;
}

/* ======================================================================== */
/* open                                                                     */
/* ======================================================================== */

static void fmq_nap(void) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
}

int fmq_durable_open(const char *path, const char *name, fmq_region **out) {
    int rc;
    if (!fmq_name_ok(name))
        return fmq_fail(FMQ_EINVAL, "invalid queue name %.64s", name);
    fmq_region *r;
    uint64_t fsize;
    rc = fmq_region_open_file(path, name, path, "cannot open the file of durable queue", &r,
                              &fsize);
    if (rc == FMQ_ENOTFOUND)
        return fmq_fail(FMQ_ENOTFOUND, "no durable queue named %s (%s)", name, path);
    if (rc != FMQ_OK)
        return rc;
    int fd = r->fd;
    r->me = UINT32_MAX;   /* not registered yet: recovery skips no entry */
    if (fsize < FMQ_PAGE + FMQ_TRAILER || fsize % FMQ_PAGE) {
        fmq_region_free(r);
        return fmq_fail(FMQ_ECORRUPT, "%s is not a fastmq durable queue (size %llu: truncated "
                                      "or another kind of file)", path,
                        (unsigned long long)fsize);
    }
    /* The superblocks, read with pread before anything is mapped. */
    fmq_superblock sbs[2];
    int ok[2], best = -1;
    for (int k = 0; k < 2; k++) {
        off_t at = (off_t)(fsize - FMQ_TRAILER + (uint64_t)k * FMQ_PAGE);
        ok[k] = pread(fd, &sbs[k], sizeof sbs[k], at) == (ssize_t)sizeof sbs[k]
                    ? fmq_sb_check(&sbs[k], fsize) : 0;
        if (ok[k] == 1 && (best < 0 || sbs[k].generation > sbs[best].generation))
            best = k;
    }
    if (best < 0) {
        fmq_region_free(r);
        if (ok[0] < 0 || ok[1] < 0)
            return fmq_fail(FMQ_EVERSION, "%s was written by another version of fastmq's "
                                          "durable format (this fastmq reads version %u)",
                            path, FMQ_FILE_VERSION);
        return fmq_fail(FMQ_ECORRUPT, "%s is not a fastmq durable queue or both copies of its "
                                      "superblock are damaged", path);
    }
    fmq_superblock sb = sbs[best];
    if ((rc = fmq_region_map(r, (size_t)fsize, MAP_SHARED,
                             "cannot map the file of durable queue")) != FMQ_OK) {
        fmq_region_free(r);
        return rc;
    }
    fmq_durable_advise(r);
    r->hdr = (fmq_header *)r->base;
    /* Openers take turns (a rebuild must see nobody else). */
    for (uint64_t until = fmq_now_ns() + FMQ_OPEN_PATIENCE_NS; fmq_live_init_lock(fd, F_WRLCK);) {
        if (fmq_now_ns() > until) {
            fmq_region_free(r);
            return fmq_fail(FMQ_ECORRUPT, "durable queue %s stayed busy (another process "
                                          "rebuilding it) for over 60 s", name);
        }
        fmq_nap();
    }
    /* The segment header must be the superblock's copy (the init word
     * aside): a torn or damaged header page is rewritten from it. */
    fmq_header want = sb.header;
    want.init_state = atomic_load_explicit(&r->hdr->init_state, memory_order_relaxed);
    if (memcmp(&want, r->hdr, sizeof want) != 0 ||
        (want.init_state != FMQ_INIT_READY && want.init_state != FMQ_INIT_AUDITING)) {
        want.init_state = FMQ_INIT_READY;
        memcpy((void *)r->hdr, &want, sizeof want);
    }
    if ((rc = fmq_region_attach(r, fsize - FMQ_TRAILER)) != FMQ_OK)
        goto fail;
    if ((rc = fmq_bind_durable(r, path)) != FMQ_OK)
        goto fail;
    r->sync_mode = sb.sync_mode;
    r->sync_interval_ns = sb.sync_interval_ns;
    r->dur_generation = sb.generation;
    /* Alone? Then rebuild from the records alone; else reap the dead as
     * usual. Decided before any repair, and the alone case runs no kill -9
     * recovery at all: after a power loss the control lines, block words
     * and participant table may each come from another flush than the
     * records (any page written since the last flush may be older or
     * newer), and fmq_recover acts on them without checking any record:
     * a dead reader's share on a block word from after a lease, next to a
     * slot page from before it, frees that block (punching its pages), and
     * the rebuild then finds the slot's message torn; a dead consumer's
     * entry whose second page was lost (so it fails its CRC) still reads
     * as a finished move, so its READING slot is freed and the message is
     * in neither. The rebuild needs none of that repair: it recomputes
     * every one of those words from the records, checked. */
    int alone = 1;
    for (uint32_t idx = 0; idx < r->g.nparticipants && alone; idx++) {
        uint64_t id = atomic_load_explicit(&r->parts[idx].ident, memory_order_acquire);
        if (FMQ_PART_STATE(id) == FMQ_PART_ACTIVE && fmq_live_is_alive(r, idx))
            alone = 0;
    }
    if (!alone)
        fmq_recover(r);
    else {
        fmq_durable_prefetch(r);
        if ((rc = fmq_durable_rebuild(r, &sb, 1 - best)) != FMQ_OK)
            goto fail;
    }
    /* Register, then let the next opener in: the init lock sits on the
     * description the mapping refers to, which registration moves r->fd
     * away from (fmq_live.c), so keep a descriptor of it to unlock with. */
    int keep = dup(r->fd);
    if (keep < 0) {
        rc = fmq_os_fail("cannot open durable queue", name);
        goto fail;
    }
    rc = fmq_live_register(r);
    fmq_live_init_lock(keep, F_UNLCK);
    close(keep);
    if (rc != FMQ_OK) {
        r->durable = 0;
        fmq_region_free(r);
        return rc;
    }
    *out = r;
    return FMQ_OK;

fail:
    fmq_live_init_lock(r->fd, F_UNLCK);
    fmq_region_free(r);
    return rc;
}
