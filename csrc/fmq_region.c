/*
 * fmq_region.c -- create, open, validate, close and unlink a segment.
 *
 * Algorithm. The creator initialises the segment under a temporary name
 * (FMQ_TMP_PREFIX<pid>-<random>, made with O_CREAT|O_EXCL|O_NOFOLLOW): it
 * sizes it (sparse: the whole layout), reserves the pages of its header,
 * control lines and participant table with posix_fallocate (so a full
 * /dev/shm is an error now, not a SIGBUS on some later write; everything else
 * is reserved as it is first used, fmq_pool.c), writes the header and empty
 * pool free stacks, publishes init_state = FMQ_INIT_READY with a release
 * store [R-init], registers itself, and only then link()s the file into
 * place (which fails if the name exists) and removes the temporary name. So
 * a name under /dev/shm always refers to a complete segment: "being set up"
 * is a temporary file, visible as such without any clock. An opener maps the
 * file, checks READY with an acquire load [A-init], then re-derives the whole
 * geometry from four numbers in the header and refuses the segment unless
 * every offset, size and the geometry hash agree with its own computation.
 * From then on it uses its own copy of the geometry, never the shared header,
 * so a later scribble over the header cannot send it out of bounds.
 *
 * Failure model. A creator killed before the link leaves only its temporary
 * file, which fastmq.cleanup() removes once the creator's pid is gone. A
 * visible segment that is not READY (an opener auditing it, or a segment
 * from a creator that initialised in place) is waited for only while the
 * init lock (an OFD lock, dropped by the kernel when its holder dies) is
 * held, up to FMQ_INIT_PATIENCE_NS; with the lock gone it is dead at once.
 * A handle is one participant (fmq_live.c); close() drops its registration.
 * Anonymous segments: every handle holds flock(LOCK_SH) on its own open file
 * description; close() drops its descriptor without LOCK_UN (a forked child
 * may share the description) and then unlinks the name only if a fresh
 * descriptor can take LOCK_EX, i.e. nobody anywhere still holds the segment.
 * An opener takes LOCK_SH without blocking (bounded retries, no GIL: the
 * binding calls open without it) and then checks that the name still refers
 * to the inode it locked, so it never attaches to a segment the last closer
 * has just unlinked.
 *
 * Process-wide. This file is the top of the core's layers (fmq_internal.h):
 * it installs the one fork handler (fmq_global_init) and fills each handle's
 * r->up, the table through which the lower layers reach recovery and the
 * in-flight table.
 *
 * Truncation. The segment is mapped; a process that can write the file and
 * truncates it makes every mapped access past the new end a SIGBUS. That is
 * what a writer with access can do (see README, "Security"); it is not
 * survivable without guarding every shared access.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fmq_internal.h"

/* ======================================================================== */
/* errors                                                                   */
/* ======================================================================== */

/* fmq_fail and fmq_last_error live in fmq_base.c (every layer reports). */

/* ======================================================================== */
/* process-wide state                                                       */
/* ======================================================================== */

unsigned fmq_fork_gen(void) { return fmq_fork_generation; }

/* The one fork handler of the core (installed once, below). In the child:
 * every open handle gets its own open file description, so the parent's
 * participant locks are not kept alive by a child that never uses the queue
 * (fmq_live_after_fork explains why), and the generation moves on, so each
 * handle re-registers under its own identity on first use
 * (fmq_region_check_fork) and objects made before the fork know they were
 * inherited (fmq_fork_gen). */
static void fmq_on_fork_child(void) {
    fmq_fork_generation++;
    fmq_live_after_fork();
}

static pthread_once_t fmq_once = PTHREAD_ONCE_INIT;
static void fmq_init_once(void) {
    pthread_atfork(fmq_live_before_fork, fmq_live_after_fork_parent, fmq_on_fork_child);
    const char *spec = getenv("FASTMQ_CRASH_AT");
    if (spec && *spec)
        fmq_crash_spec = strdup(spec);
}

int fmq_global_init(void) {
    pthread_once(&fmq_once, fmq_init_once);
    return FMQ_OK;
}

uint64_t fmq_realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ======================================================================== */
/* geometry                                                                 */
/* ======================================================================== */

static uint64_t fmq_round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

static uint64_t fmq_fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++) {
        h ^= c[i];
        h *= 1099511628211ull;
    }
    return h;
}

uint32_t fmq_layout_hash(void) {
    /* Everything whose change would make two builds disagree about the bytes. */
    uint64_t v[] = {
        sizeof(fmq_header), sizeof(fmq_ctl), sizeof(fmq_participant), sizeof(fmq_slot),
        sizeof(fmq_block_meta), sizeof(fmq_class_desc), FMQ_MAX_CLASSES, FMQ_NSTATS,
        offsetof(fmq_header, init_state), offsetof(fmq_header, classes),
        offsetof(fmq_header, geometry_check), offsetof(fmq_ctl, data),
        offsetof(fmq_ctl, space), offsetof(fmq_ctl, free_top), offsetof(fmq_ctl, retired),
        offsetof(fmq_participant, stats), offsetof(fmq_slot, block), FMQ_STAMP_BITS,
        sizeof(fmq_lease), offsetof(fmq_lease, holder), offsetof(fmq_header, lease_offset),
        FMQ_GEN_BITS, FMQ_MIN_BLOCK, offsetof(fmq_ctl, carved), offsetof(fmq_ctl, lease_committed),
        offsetof(fmq_ctl, cold_top), offsetof(fmq_ctl, pool_peak),
        offsetof(fmq_block_meta, pages), offsetof(fmq_slot, cursor), FMQ_CURSOR_BATCH, offsetof(fmq_slot, crc),
        offsetof(fmq_lease, src_index), FMQ_BATCH_HEADER, offsetof(fmq_ctl, batch_extra),
        FMQ_BLK_NEXT_IS_TICKET,
    };
    uint64_t h = fmq_fnv1a(1469598103934665603ull, v, sizeof v);
    return (uint32_t)(h ^ (h >> 32));
}

/* Size classes grow by 4x from FMQ_MIN_BLOCK; the last class is exactly the
 * largest message (rounded to a page). Blocks reserve only the pages their
 * message needs (fmq_pool.c), so block sizes cost address space, not memory:
 * each class gets enough blocks for messages of its smallest size (just over
 * the class below) to fill all of capacity_bytes, and any mix of sizes can
 * use the whole cap. */
int fmq_geometry_compute(uint64_t slot_count, uint32_t slot_stride,
                         uint64_t max_message_size, uint64_t capacity_bytes,
                         fmq_geometry *g) {
    memset(g, 0, sizeof *g);
    if (slot_count < 1 || slot_count > FMQ_MAX_SLOTS)
        return fmq_fail(FMQ_EINVAL, "maxsize must be between 1 and %llu messages, got %llu",
                        (unsigned long long)FMQ_MAX_SLOTS, (unsigned long long)slot_count);
    if (slot_stride < 64 || slot_stride > 65536 || slot_stride % 64)
        return fmq_fail(FMQ_EINVAL, "slot_size must be a multiple of 64 in [64, 65536], got %u",
                        slot_stride);
    if (max_message_size < 1 || max_message_size > FMQ_MAX_MESSAGE)
        return fmq_fail(FMQ_EINVAL, "max_message_size must be between 1 and %llu bytes, got %llu",
                        (unsigned long long)FMQ_MAX_MESSAGE, (unsigned long long)max_message_size);
    if (capacity_bytes < max_message_size || capacity_bytes > FMQ_MAX_CAPACITY)
        return fmq_fail(FMQ_EINVAL,
                        "capacity_bytes must be at least max_message_size (%llu) and at most "
                        "%llu, got %llu", (unsigned long long)max_message_size,
                        (unsigned long long)FMQ_MAX_CAPACITY,
                        (unsigned long long)capacity_bytes);

    g->slot_count = slot_count;
    g->slot_stride = slot_stride;
    g->max_message_size = max_message_size;
    g->capacity_bytes = capacity_bytes;
    g->nparticipants = FMQ_MAX_PARTICIPANTS;

    uint64_t top = fmq_round_up(max_message_size, FMQ_PAGE);
    uint64_t sizes[FMQ_MAX_CLASSES];
    uint32_t n = 0;
    for (uint64_t b = FMQ_MIN_BLOCK; b < top && n < FMQ_MAX_CLASSES - 1; b *= 4)
        sizes[n++] = b;
    sizes[n++] = top;
    g->nclasses = n;

    for (uint32_t c = 0; c < n; c++) {
        uint64_t smallest = c == 0 ? FMQ_PAGE : sizes[c - 1] + FMQ_PAGE;
        uint64_t nb = capacity_bytes / smallest;
        if (nb < 1)
            nb = 1;
        if (nb > FMQ_MAX_BLOCKS_PER_CLASS)
            nb = FMQ_MAX_BLOCKS_PER_CLASS;
        g->classes[c].block_size = sizes[c];
        g->classes[c].nblocks = nb;
    }

    uint64_t off = FMQ_PAGE;
    g->ctl_offset = off;
    off = fmq_round_up(off + sizeof(fmq_ctl), FMQ_LINE);
    g->participants_offset = off;
    off = fmq_round_up(off + (uint64_t)g->nparticipants * sizeof(fmq_participant), FMQ_PAGE);
    g->ring_offset = off;
    off = fmq_round_up(off + slot_count * slot_stride, FMQ_PAGE);
    g->lease_offset = off;
    g->lease_stride = slot_stride + 64;   /* header + a slot's inline payload */
    off = fmq_round_up(off + slot_count * g->lease_stride, FMQ_PAGE);
    for (uint32_t c = 0; c < n; c++) {
        g->classes[c].meta_offset = off;
        off = fmq_round_up(off + g->classes[c].nblocks * sizeof(fmq_block_meta), FMQ_PAGE);
        g->classes[c].data_offset = off;
        off += g->classes[c].nblocks * g->classes[c].block_size;
        if (off > (1ull << 46))
            return fmq_fail(FMQ_EINVAL, "the queue would need more than 64 TiB of address "
                                        "space; reduce capacity_bytes or maxsize");
    }
    g->total_size = off;
    return FMQ_OK;
}

uint64_t fmq_geometry_check(const fmq_header *h) {
    /* Hash every header byte before init_state and from classes to the
     * check itself, skipping only the mutable init_state word. */
    uint64_t x = fmq_fnv1a(1469598103934665603ull, h, offsetof(fmq_header, init_state));
    size_t from = offsetof(fmq_header, creator_pid);
    return fmq_fnv1a(x, (const char *)h + from, offsetof(fmq_header, geometry_check) - from);
}

/* ======================================================================== */
/* names                                                                    */
/* ======================================================================== */

int fmq_name_ok(const char *name) {
    size_t n = strlen(name);
    if (n < 1 || n > 250 || name[0] == '.')
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

/* Segments live in /dev/shm, where shm_open(3) puts them and where the Python
 * layer (cleanup, the pure backend) looks; link(2) needs real paths. */
#define FMQ_SHM_DIR "/dev/shm/"
#define FMQ_TMP_PREFIX "fastmq-tmp-"
#define FMQ_PURE_MAGIC "FMQPURE\x01"   /* the pure-Python backend's segments */

static int fmq_shm_path(const char *name, char *out, size_t outlen) {
    if (!fmq_name_ok(name))
        return fmq_fail(FMQ_EINVAL, "invalid segment name %.64s: use 1-250 characters of "
                                    "[A-Za-z0-9._-], not starting with '.'", name);
    snprintf(out, outlen, FMQ_SHM_DIR "%s", name);
    return FMQ_OK;
}

/* A fresh temporary path: the pid tells cleanup whose it is (removed once
 * that process is gone), the random part makes it unguessable. */
static void fmq_tmp_path(char *out, size_t outlen) {
    /* /dev/urandom rather than getrandom(), which glibc has only from 2.25
     * (the wheels target 2.17). O_CREAT|O_EXCL|O_NOFOLLOW makes any name safe;
     * randomness only keeps it from being guessed in advance. */
    uint64_t rnd = 0;
    int ufd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (ufd < 0 || read(ufd, &rnd, sizeof rnd) != (ssize_t)sizeof rnd)
        rnd = fmq_now_ns() ^ ((uint64_t)(uintptr_t)out << 16);
    if (ufd >= 0)
        close(ufd);
    snprintf(out, outlen, FMQ_SHM_DIR FMQ_TMP_PREFIX "%ld-%016llx", (long)getpid(),
             (unsigned long long)rnd);
}

int fmq_open_path(const char *path, int flags, unsigned mode) {
    /* O_NOFOLLOW: a symlink planted under a queue's name is not followed. */
    return open(path, flags | O_NOFOLLOW | O_CLOEXEC, mode);
}

/* ======================================================================== */
/* mapping and validation                                                   */
/* ======================================================================== */

/* The calls the lower layers make upward (fmq_internal.h, "Layers"): this
 * file is above all of them, so it is the one that wires them. */
static const fmq_upcalls fmq_upcalls_core = {FMQ_UPCALLS_CORE};

fmq_region *fmq_region_new(const char *name, int fd) {
    fmq_region *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->fd = fd;
    r->up = &fmq_upcalls_core;
    snprintf(r->name, sizeof r->name, "%s", name);
    return r;
}

void fmq_region_bind(fmq_region *r) {
    r->hdr = (fmq_header *)r->base;
    r->ctl = (fmq_ctl *)(r->base + r->g.ctl_offset);
    r->parts = (fmq_participant *)(r->base + r->g.participants_offset);
    r->ring = r->base + r->g.ring_offset;
    r->leases = r->base + r->g.lease_offset;
    r->inline_max = r->g.slot_stride - FMQ_SLOT_HEADER;
    fmq_ticket_lap_init(r);
}

/* The reciprocal of fmq_ticket_lap (fmq_internal.h); slot_count is validated
 * to [1, FMQ_MAX_SLOTS], so l <= 25 and 2^(64+l) fits in 128 bits. */
void fmq_ticket_lap_init(fmq_region *r) {
    uint64_t n = r->g.slot_count;
    if ((n & (n - 1)) == 0) {
        r->lap_magic = 0;
        r->lap_shift = (uint32_t)__builtin_ctzll(n);
    } else {
        uint32_t l = 64u - (uint32_t)__builtin_clzll(n);   /* ceil(log2 n): n is no power */
        r->lap_magic = (uint64_t)(((unsigned __int128)1 << (64 + l)) / n + 1);
        r->lap_shift = l - 1;
    }
}

void fmq_region_free(fmq_region *r) {
    if (r->base && r->base != MAP_FAILED)
        munmap(r->base, r->size);
    if (r->fd >= 0)
        close(r->fd);
    free(r->dur_path);
    free(r);
}

/* Checks the header of a mapped segment against file_size and, if it holds,
 * takes its geometry into r. Any process that can write the segment can
 * change the header while we read it, so it is copied once and every check
 * and every value taken reads the copy: what was checked is what is used. */
int fmq_validate(fmq_region *r, size_t file_size) {
    fmq_header snap;
    memcpy(&snap, (const void *)r->hdr, sizeof snap);
    const fmq_header *h = &snap;
    if (memcmp(h->magic, FMQ_MAGIC, 6) != 0)
        return fmq_fail(FMQ_ECORRUPT, "segment %s is not a fastmq queue (bad magic)", r->name);
    if (memcmp(h->magic, FMQ_MAGIC, 8) != 0)
        return fmq_fail(FMQ_EVERSION, "segment %s was made by another fastmq backend or "
                                      "format (magic %.8s)", r->name, h->magic);
    if (h->abi_version != FMQ_ABI_VERSION)
        return fmq_fail(FMQ_EVERSION, "segment %s has format version %u; this fastmq reads "
                                      "version %u (use the same fastmq version everywhere)",
                        r->name, h->abi_version, FMQ_ABI_VERSION);
    if (h->layout_hash != fmq_layout_hash())
        return fmq_fail(FMQ_EVERSION, "segment %s has a different shared layout (built by an "
                                      "incompatible fastmq build)", r->name);
    if (h->geometry_check != fmq_geometry_check(h))
        return fmq_fail(FMQ_ECORRUPT, "segment %s header is corrupted (checksum mismatch)",
                        r->name);
    fmq_geometry g;
    if (fmq_geometry_compute(h->slot_count, h->slot_stride, h->max_message_size,
                             h->capacity_bytes, &g) != FMQ_OK)
        return fmq_fail(FMQ_ECORRUPT, "segment %s has an impossible geometry: %s", r->name,
                        fmq_last_error());
    if (g.total_size != h->total_size || g.total_size != file_size ||
        g.nclasses != h->nclasses || g.ctl_offset != h->ctl_offset ||
        g.participants_offset != h->participants_offset || g.ring_offset != h->ring_offset ||
        g.lease_offset != h->lease_offset ||
        g.nparticipants != h->nparticipants ||
        memcmp(g.classes, h->classes, sizeof g.classes) != 0)
        return fmq_fail(FMQ_ECORRUPT, "segment %s is truncated or its geometry is inconsistent "
                                      "(file %zu bytes, expected %llu)", r->name, file_size,
                        (unsigned long long)g.total_size);
    r->g = g;
    memcpy(r->dead_letter, h->dead_letter, sizeof r->dead_letter);
    r->dead_letter[sizeof r->dead_letter - 1] = '\0';
    r->max_deliveries = h->max_deliveries;
    return FMQ_OK;
}

/* The steps of opening an existing segment that shared memory and a durable
 * queue's file share (fmq_region_open, fmq_durable_open). What lies between
 * them is each medium's own: here the init word's wait; there the
 * superblocks, the openers' turn and the header's repair.
 *
 * fmq_region_open_file: opens the file at path for reading and writing and
 * makes its handle (*out, holding the descriptor; *size_out, unless NULL:
 * the file's size). O_NONBLOCK: opening a FIFO planted under the name must not hang (it
 * changes nothing for a regular file); fmq_open_path does not follow a
 * symbolic link; anything but a regular file is refused. label names the
 * file in those errors ("segment NAME", a path), os_what words any other
 * failure to open it (fmq_os_fail). FMQ_ENOTFOUND, no such file, is left for
 * the caller to word for its medium. */
int fmq_region_open_file(const char *path, const char *name, const char *label,
                         const char *os_what, fmq_region **out, uint64_t *size_out) {
    int fd = fmq_open_path(path, O_RDWR | O_NONBLOCK, 0);
    if (fd < 0) {
        if (errno == ENOENT)
            return FMQ_ENOTFOUND;
        if (errno == ELOOP)
            return fmq_fail(FMQ_ECORRUPT, "%s is a symbolic link, not a queue", label);
        return fmq_os_fail(os_what, name);
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return fmq_fail(FMQ_ECORRUPT, "%s is not a regular file", label);
    }
    fmq_region *r = fmq_region_new(name, fd);
    if (!r) {
        close(fd);
        return fmq_fail(FMQ_EOS, "out of memory");
    }
    *out = r;
    if (size_out)
        *size_out = (uint64_t)st.st_size;
    return FMQ_OK;
}

/* Maps size bytes of r's file (flags: MAP_SHARED and the medium's own);
 * os_what words a failure (fmq_os_fail). On failure r->base is NULL and the
 * caller frees r. */
int fmq_region_map(fmq_region *r, size_t size, int flags, const char *os_what) {
    r->size = size;
    r->base = mmap(NULL, r->size, PROT_READ | PROT_WRITE, flags, r->fd, 0);
    if (r->base == MAP_FAILED) {
        r->base = NULL;
        return fmq_os_fail(os_what, r->name);
    }
    return FMQ_OK;
}

/* Attaches r to its mapped segment, once the medium has made its header the
 * one to trust (READY; a durable file's header rewritten from its
 * superblock): the header is validated against segment_size (fmq_validate),
 * and from then on r uses its own copy of the geometry (fmq_region_bind) and
 * its block budget (fmq_region_set_keep). */
int fmq_region_attach(fmq_region *r, size_t segment_size) {
    r->hdr = (fmq_header *)r->base;
    int rc = fmq_validate(r, segment_size);
    if (rc != FMQ_OK)
        return rc;
    fmq_region_bind(r);
    fmq_region_set_keep(r);
    return FMQ_OK;
}

/* ======================================================================== */
/* create / open                                                            */
/* ======================================================================== */

/* Nothing to write per block: blocks are carved on demand (fmq_pool.c) from
 * zeroed, freshly reserved metadata. Only the empty stacks need a value. */
void fmq_pool_init(fmq_region *r) {
    for (uint32_t c = 0; c < r->g.nclasses; c++) {
        atomic_store_explicit(&r->ctl->free_top[c].v, FMQ_NIL, memory_order_relaxed);
        atomic_store_explicit(&r->ctl->cold_top[c].v, FMQ_NIL, memory_order_relaxed);
    }
}

/* The block budget: capacity_bytes in whole pages. (How much free-block
 * memory stays warm follows recent demand: fmq_pool.c.) Also used by
 * fmq_durable.c when it maps a queue's file. */
void fmq_region_set_keep(fmq_region *r) {
    r->budget = fmq_round_up(r->g.capacity_bytes, FMQ_PAGE);
}

/* The steps of creating a queue that shared memory and a durable queue's
 * file share (fmq_region_create, fmq_durable_create), in the order both run
 * them. What lies between them is each medium's own: here the temporary
 * name under /dev/shm, the init lock, the sparse sizing and the words of
 * a full /dev/shm; there the filesystem check, the trailer, the flush
 * words and the superblocks. Each medium checks its name itself (the two
 * word a bad one differently), looks for an existing queue, publishes READY
 * and registers, and words or acts on a lost race for the name.
 *
 * fmq_region_create_check: the parameters both take, checked before
 * anything is made or looked up, so that a bad value is refused even with
 * exist_ok and a queue of that name in place: the permission bits, the
 * geometry (into *g; slot_size 0 means the default) and the dead-letter
 * name's length. */
int fmq_region_create_check(const fmq_params *p, unsigned mode, fmq_geometry *g) {
    if (mode > 0777)
        return fmq_fail(FMQ_EINVAL, "mode must be permission bits only (0 to 0o777), got %#o",
                        mode);
    uint32_t stride = p->slot_size ? p->slot_size : FMQ_DEFAULT_SLOT_SIZE;
    int rc = fmq_geometry_compute(p->maxsize, stride, p->max_message_size, p->capacity_bytes, g);
    if (rc)
        return rc;
    if (p->dead_letter && strlen(p->dead_letter) >= FMQ_DEAD_LETTER_MAX)
        return fmq_fail(FMQ_EINVAL, "dead_letter name too long");
    return FMQ_OK;
}

/* fmq_region_create_new: the handle (*out) of a new queue's temporary file
 * tmp, just made with O_CREAT|O_EXCL as fd, with the caller's mode (open()
 * applied the umask; the caller's mode is what they asked for). When the
 * handle cannot be made, fd is closed and tmp removed. */
int fmq_region_create_new(const char *name, int fd, const char *tmp, unsigned mode,
                          fmq_region **out) {
    fmq_region *r = fmq_region_new(name, fd);
    if (!r) {
        close(fd);
        unlink(tmp);
        return fmq_fail(FMQ_EOS, "out of memory");
    }
    (void)fchmod(fd, mode);
    *out = r;
    return FMQ_OK;
}

/* fmq_region_format: once the caller has sized its file and mapped it
 * (fmq_region_map), takes g as r's geometry (fmq_region_bind, its block
 * budget: fmq_region_set_keep), writes the new segment's header from g and
 * p, empties the pool's stacks and reserves the first chunks of slots and
 * leases. r is the medium's handle already (a durable file's: its upcalls
 * and flush words, fmq_bind_durable), so nothing here runs as another
 * medium's. Nonzero when those chunks cannot be reserved; the caller words
 * that error for its medium (and publishes READY itself). */
int fmq_region_format(fmq_region *r, const fmq_geometry *g, const fmq_params *p) {
    r->g = *g;
    fmq_region_bind(r);
    fmq_region_set_keep(r);
    fmq_header *h = r->hdr;
    memcpy(h->magic, FMQ_MAGIC, 8);
    h->abi_version = FMQ_ABI_VERSION;
    h->layout_hash = fmq_layout_hash();
    h->creator_pid = (uint32_t)getpid();
    h->total_size = g->total_size;
    h->slot_count = g->slot_count;
    h->slot_stride = g->slot_stride;
    h->nclasses = g->nclasses;
    h->max_message_size = g->max_message_size;
    h->capacity_bytes = g->capacity_bytes;
    h->nparticipants = g->nparticipants;
    h->max_deliveries = p->max_deliveries;
    h->ctl_offset = g->ctl_offset;
    h->participants_offset = g->participants_offset;
    h->ring_offset = g->ring_offset;
    h->lease_offset = g->lease_offset;
    h->created_realtime_ns = fmq_realtime_ns();
    memcpy(h->classes, g->classes, sizeof h->classes);
    if (p->dead_letter)
        snprintf(h->dead_letter, sizeof h->dead_letter, "%s", p->dead_letter);
    h->geometry_check = fmq_geometry_check(h);
    memcpy(r->dead_letter, h->dead_letter, sizeof r->dead_letter);
    r->max_deliveries = p->max_deliveries;
    fmq_pool_init(r);
    if (fmq_ring_grow(r, 0) != FMQ_OK ||   /* the first chunks of slots and leases */
        fmq_lease_grow(r, 0) != FMQ_OK)
        return FMQ_EOS;
    return FMQ_OK;
}

/* fmq_region_create_link: the last step, once the new queue is complete and
 * r registered: links tmp into place at path, which fails if the name
 * exists (so of two creators exactly one wins it), and removes the name tmp.
 * Nonzero on failure, with errno link(2)'s (EEXIST: another creator won the
 * name), for the caller to word or act on for its medium; r is then
 * unregistered and freed, and nothing of it is left. */
int fmq_region_create_link(fmq_region *r, const char *tmp, const char *path) {
    if (link(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        fmq_live_unregister(r);
        fmq_region_free(r);
        errno = e;
        return -1;
    }
    unlink(tmp);
    return 0;
}

int fmq_os_fail(const char *what, const char *name) {
    int e = errno;
    int rc = fmq_fail(FMQ_EOS, "%s %s: %s", what, name, strerror(e));
    errno = e;
    return rc;
}

/* How long an opener waits for a segment a live process is still working on
 * (an auditing opener; see the header comment), and for a closer's
 * momentary exclusive lock on an anonymous segment. */
#define FMQ_INIT_PATIENCE_NS 60000000000ull
#define FMQ_ATTACH_PATIENCE_NS 1000000000ull

static void fmq_nap_1ms(void) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
}

int fmq_region_create(const char *name, const fmq_params *p, unsigned mode, int anonymous,
                      int exist_ok, fmq_region **out) {
    char path[300], tmp[300];
    int rc = fmq_shm_path(name, path, sizeof path);
    if (rc)
        return rc;
    fmq_geometry g;
    if ((rc = fmq_region_create_check(p, mode, &g)))
        return rc;

    /* An early answer for a name that exists (the link below is what
     * decides): no point initialising a large segment to throw it away. */
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!exist_ok)
            return fmq_fail(FMQ_EEXIST, "queue segment %s already exists", name);
        rc = fmq_region_open(name, out);
        if (rc != FMQ_EDEADINIT)
            return rc;
        /* Not READY and nobody working on it: nobody can be using it. */
        unlink(path);
    }

    int fd = -1;
    for (int tries = 0; fd < 0; tries++) {
        fmq_tmp_path(tmp, sizeof tmp);
        fd = fmq_open_path(tmp, O_RDWR | O_CREAT | O_EXCL, mode);
        if (fd < 0 && (errno != EEXIST || tries >= 8))
            return fmq_os_fail("cannot create shared memory for", name);
    }
    /* Held until READY: tells an opener of a not-yet-READY segment that its
     * initialiser is alive (the kernel drops it if we die). The flock tells
     * cleanup the same about the temporary file (it is converted below). */
    fmq_live_init_lock(fd, F_WRLCK);
    (void)flock(fd, LOCK_EX);
    fmq_region *r;
    if ((rc = fmq_region_create_new(name, fd, tmp, mode, &r)))
        return rc;
    r->anonymous = anonymous;
    /* Sparse: the size is the whole layout, but only the header, control
     * lines and participant table are reserved now; the rest is reserved as
     * it is first used (fmq_pool.c). */
    if (ftruncate(fd, (off_t)g.total_size) != 0)
        goto os_error;
    rc = posix_fallocate(fd, 0, (off_t)g.ring_offset);
    if (rc != 0) {
        errno = rc;
        if (rc == ENOSPC || rc == ENOMEM) {
            int e = errno;
            unlink(tmp);
            fmq_region_free(r);
            errno = e;
            return fmq_fail(FMQ_EOS, "not enough space in /dev/shm for queue %s (%llu bytes); "
                                     "enlarge /dev/shm or drain other queues",
                            name, (unsigned long long)g.ring_offset);
        }
        /* EOPNOTSUPP etc.: carry on; pages come on first touch */
    }
    if ((rc = fmq_region_map(r, g.total_size, MAP_SHARED | MAP_NORESERVE,
                             "cannot set up shared memory for")) != FMQ_OK) {
        unlink(tmp);
        fmq_region_free(r);
        return rc;
    }
    if (fmq_region_format(r, &g, p) != FMQ_OK) {
        unlink(tmp);
        fmq_region_free(r);
        errno = ENOSPC;
        return fmq_fail(FMQ_EOS, "not enough space in /dev/shm for queue %s; enlarge "
                                 "/dev/shm or drain other queues", name);
    }
    FMQ_CRASHPOINT("init.before_ready");
    /* [R-init] everything above is visible to whoever acquires READY. */
    atomic_store_explicit(&r->hdr->init_state, FMQ_INIT_READY, memory_order_release);
    fmq_live_init_lock(fd, F_UNLCK);

    /* An anonymous segment keeps LOCK_SH from before its name is visible (a
     * cleanup may probe it at once); a named one uses no flock at all. This
     * comes before registering: registration gives the handle a description
     * of its own (fmq_live.c), and the LOCK_EX taken above stays on the one
     * the mapping refers to, where it would shut out the handle's own
     * LOCK_SH (and every opener's). */
    if (flock(fd, anonymous ? LOCK_SH : LOCK_UN) != 0) {
        rc = fmq_os_fail("cannot lock", name);
        unlink(tmp);
        fmq_region_free(r);
        return rc;
    }
    /* Registered before the name appears, so the first opener does not take
     * itself for the only participant (and audit a brand-new queue). */
    if ((rc = fmq_live_register(r)) != FMQ_OK) {
        unlink(tmp);
        fmq_region_free(r);
        return rc;
    }
    FMQ_CRASHPOINT("init.before_link");
    if (fmq_region_create_link(r, tmp, path) != 0) {
        if (errno == EEXIST) {
            /* Another creator won the race for the name. */
            if (!exist_ok)
                return fmq_fail(FMQ_EEXIST, "queue segment %s already exists", name);
            return fmq_region_open(name, out);
        }
        return fmq_os_fail("cannot link shared memory into place for", name);
    }
    *out = r;
    return FMQ_OK;

os_error:
    rc = fmq_os_fail("cannot set up shared memory for", name);
    unlink(tmp);
    fmq_region_free(r);
    return rc;
}

/* AUDITING with nobody holding the init lock: the lone opener that was
 * auditing died. The audit only ever makes the pool more complete, so the
 * segment is as usable as before it started: put it back to READY (under the
 * init lock, so two openers do not race). Returns 1 if it is READY now. */
static int fmq_region_end_dead_audit(fmq_region *r, int fd) {
    if (fmq_live_init_lock(fd, F_WRLCK) != 0)
        return 0;   /* an auditor is alive and working */
    /* It may have died giving the ring back (fmq_pool.c): finish that
     * before anyone uses the ring. A segment that fails validation is left
     * to the checks after READY, which report it. */
    r->hdr = (fmq_header *)r->base;
    if (fmq_validate(r, r->size) == FMQ_OK) {
        fmq_region_bind(r);
        fmq_ring_compact_finish(r);
    }
    uint32_t expect = FMQ_INIT_AUDITING;
    /* [R-init] / [A-init], as in fmq_region_create / fmq_region_open. */
    atomic_compare_exchange_strong_explicit(&((fmq_header *)r->base)->init_state, &expect,
                                            FMQ_INIT_READY, memory_order_release,
                                            memory_order_acquire);
    fmq_live_init_lock(fd, F_UNLCK);
    return atomic_load_explicit(&((fmq_header *)r->base)->init_state, memory_order_acquire) ==
           FMQ_INIT_READY;
}

/* Take LOCK_SH on an anonymous segment without blocking: a closer or cleanup
 * holds LOCK_EX only for a moment (probe, unlink, close), so retry for up to
 * FMQ_ATTACH_PATIENCE_NS. Then check that the name still refers to the inode
 * we locked: a closer that won LOCK_EX unlinks before it lets go, so a
 * different (or no) inode means the segment is gone. */
static int fmq_attach_anonymous(int fd, const char *path, const char *name) {
    uint64_t until = fmq_now_ns() + FMQ_ATTACH_PATIENCE_NS;
    while (flock(fd, LOCK_SH | LOCK_NB) != 0) {
        if (errno == EINTR)
            continue;
        if (errno != EWOULDBLOCK)
            return fmq_os_fail("cannot lock", name);
        if (fmq_now_ns() > until)
            return fmq_fail(FMQ_ENOTFOUND, "anonymous segment %s is being removed (a process "
                                           "has held its exclusive lock for over 1 s)", name);
        fmq_nap_1ms();
    }
    struct stat mine, named;
    if (fstat(fd, &mine) != 0)
        return fmq_os_fail("cannot stat", name);
    if (lstat(path, &named) != 0 || mine.st_dev != named.st_dev ||
        mine.st_ino != named.st_ino)
        return fmq_fail(FMQ_ENOTFOUND, "anonymous segment %s was removed by its last user "
                                       "while we opened it", name);
    return FMQ_OK;
}

int fmq_region_open(const char *name, fmq_region **out) {
    char path[300], label[300];
    int rc = fmq_shm_path(name, path, sizeof path);
    if (rc)
        return rc;
    snprintf(label, sizeof label, "segment %s", name);   /* name: at most 250 */
    fmq_region *r;   /* its size is read where it is mapped, below */
    rc = fmq_region_open_file(path, name, label, "cannot open shared memory", &r, NULL);
    if (rc == FMQ_ENOTFOUND)
        return fmq_fail(FMQ_ENOTFOUND, "no queue segment named %s", name);
    if (rc != FMQ_OK)
        return rc;
    int fd = r->fd;
    struct stat st;
    r->anonymous = strncmp(name, "fastmq-anon-", 12) == 0;
    if (r->anonymous && (rc = fmq_attach_anonymous(fd, path, name)) != FMQ_OK) {
        fmq_region_free(r);
        return rc;
    }

    /* A visible segment is READY unless an opener is auditing it (or it was
     * initialised in place by a creator that died). Wait only while the init
     * lock says a live process is working on it. */
    uint64_t deadline = fmq_now_ns() + FMQ_INIT_PATIENCE_NS;
    int looked_again = 0;
    for (;;) {
        if (fstat(fd, &st) != 0) {
            rc = fmq_os_fail("cannot stat", name);
            fmq_region_free(r);
            return rc;
        }
        if ((size_t)st.st_size >= sizeof(fmq_header)) {
            if ((rc = fmq_region_map(r, (size_t)st.st_size, MAP_SHARED | MAP_NORESERVE,
                                     "cannot map")) != FMQ_OK) {
                fmq_region_free(r);
                return rc;
            }
            if (memcmp(r->base, FMQ_PURE_MAGIC, 8) == 0) {
                fmq_region_free(r);
                return fmq_fail(FMQ_EVERSION, "segment %s was created by fastmq's pure-Python "
                                              "backend; open it with FASTMQ_BACKEND=pure (every "
                                              "process of a queue must use the same backend)",
                                name);
            }
            /* [A-init] pairs with [R-init] in fmq_region_create. */
            uint32_t st8 = atomic_load_explicit(&((fmq_header *)r->base)->init_state,
                                                memory_order_acquire);
            if (st8 == FMQ_INIT_READY)
                break;
            if (st8 != FMQ_INIT_CREATING && st8 != FMQ_INIT_AUDITING) {
                fmq_region_free(r);
                return fmq_fail(FMQ_ECORRUPT, "segment %s is not a fastmq queue or is "
                                              "corrupted (bad init state %#x)", name, st8);
            }
            if (st8 == FMQ_INIT_AUDITING && fmq_region_end_dead_audit(r, fd))
                continue;   /* the auditor died: the segment is READY again */
            munmap(r->base, r->size);
            r->base = NULL;
        }
        if (!fmq_live_init_in_progress(fd)) {
            /* Its worker may have finished between our load and the lock
             * test: look once more before calling it dead. */
            if (!looked_again) {
                looked_again = 1;
                continue;
            }
            fmq_region_free(r);
            return fmq_fail(FMQ_EDEADINIT, "segment %s is unusable: its creator died during "
                                           "initialization; remove it with Queue.unlink (or "
                                           "create it again with exist_ok=True)", name);
        }
        looked_again = 0;
        if (fmq_now_ns() > deadline) {
            fmq_region_free(r);
            return fmq_fail(FMQ_ECORRUPT, "segment %s is still being initialized by a live "
                                          "process after %llu s", name,
                            FMQ_INIT_PATIENCE_NS / 1000000000ull);
        }
        fmq_nap_1ms();
    }
    if ((rc = fmq_region_attach(r, r->size)) != FMQ_OK) {
        fmq_region_free(r);
        return rc;
    }
    if ((rc = fmq_live_register(r)) != FMQ_OK) {
        fmq_region_free(r);
        return rc;
    }
    /* An audit may have started between our READY check and our
     * registration; it could not see us, so wait for it to finish (while
     * its auditor is alive: a dead one's audit is ended here). */
    for (uint64_t until = fmq_now_ns() + FMQ_INIT_PATIENCE_NS;
         atomic_load_explicit(&r->hdr->init_state, memory_order_acquire) != FMQ_INIT_READY;) {
        if (fmq_region_end_dead_audit(r, r->fd))
            continue;
        if (fmq_now_ns() > until || !fmq_live_init_in_progress(r->fd)) {
            if (atomic_load_explicit(&r->hdr->init_state, memory_order_acquire) ==
                FMQ_INIT_READY)
                break;
            fmq_live_unregister(r);
            fmq_region_free(r);
            return fmq_fail(FMQ_ECORRUPT, "segment %s stayed busy (audit) too long", name);
        }
        fmq_nap_1ms();
    }
    fmq_audit_if_alone(r);
    *out = r;
    return FMQ_OK;
}

int fmq_region_unlink(const char *name) {
    char path[300];
    int rc = fmq_shm_path(name, path, sizeof path);
    if (rc)
        return rc;
    if (unlink(path) != 0) {
        if (errno == ENOENT)
            return fmq_fail(FMQ_ENOTFOUND, "no queue segment named %s", name);
        return fmq_os_fail("cannot unlink", name);
    }
    return FMQ_OK;
}

void fmq_region_close(fmq_region *r) {
    if (!r)
        return;
    if (r->up && r->up->durable_close)
        r->up->durable_close(r);   /* the last flush of "interval" / "commit" */
    /* An anonymous queue goes with its last handle; a durable one keeps its
     * file's ring as it is (its first opener rebuilds it: fmq_durable.c). */
    if (!r->anonymous && !r->durable)
        fmq_release_if_alone(r);
    fmq_live_unregister(r);
    munmap(r->base, r->size);
    r->base = NULL;
    /* Close without LOCK_UN: a forked child may share this description. */
    close(r->fd);
    r->fd = -1;
    if (r->anonymous) {
        char path[300];
        snprintf(path, sizeof path, FMQ_SHM_DIR "%s", r->name);
        int fd = fmq_open_path(path, O_RDONLY | O_NONBLOCK, 0);
        if (fd >= 0) {
            /* Unlink before letting go of LOCK_EX: an opener that was waiting
             * for it then finds the name gone (fmq_attach_anonymous). */
            if (flock(fd, LOCK_EX | LOCK_NB) == 0)
                unlink(path);   /* nobody else holds it: we were the last */
            close(fd);
        }
    }
    free(r->dur_path);
    free(r);
}

int fmq_region_check_fork(fmq_region *r) {
    if (r->fork_gen == fmq_fork_generation)
        return FMQ_OK;
    /* We are a forked child using the parent's handle. The fork handler gave
     * us our own open file description already (fmq_live_after_fork); now
     * take our own identity. */
    if (r->fd < 0)
        return fmq_fail(FMQ_EOS, "cannot use queue %s in this forked child: reopening its "
                                 "file after fork() failed; open the queue again", r->name);
    r->roles = 0;
    r->ring_ready = 0;   /* the ring may have been given back since (fmq_pool.c) */
    int rc = fmq_live_register(r);
    if (rc != FMQ_OK)
        return rc;
    /* As an opener does: a lone process may be auditing (or giving the ring
     * back) and could not see us; wait until it is done. */
    for (uint64_t until = fmq_now_ns() + FMQ_INIT_PATIENCE_NS;
         atomic_load_explicit(&r->hdr->init_state, memory_order_acquire) != FMQ_INIT_READY;) {
        if (fmq_region_end_dead_audit(r, r->fd))
            continue;
        if (fmq_now_ns() > until)
            return fmq_fail(FMQ_ECORRUPT, "segment %s stayed busy (audit) too long", r->name);
        fmq_nap_1ms();
    }
    return FMQ_OK;
}

/* ======================================================================== */
/* accessors and stats                                                      */
/* ======================================================================== */

uint64_t fmq_region_maxsize(const fmq_region *r) { return r->g.slot_count; }
uint64_t fmq_region_max_message_size(const fmq_region *r) { return r->g.max_message_size; }
uint64_t fmq_region_capacity_bytes(const fmq_region *r) { return r->g.capacity_bytes; }
uint32_t fmq_region_inline_max(const fmq_region *r) { return r->inline_max; }
int fmq_region_is_anonymous(const fmq_region *r) { return r->anonymous; }
const char *fmq_region_name(const fmq_region *r) { return r->name; }
uint32_t fmq_region_max_deliveries(const fmq_region *r) { return r->max_deliveries; }
const char *fmq_region_dead_letter(const fmq_region *r) { return r->dead_letter; }

void fmq_region_stats(fmq_region *r, fmq_stats *st) {
    uint64_t sum[FMQ_NSTATS];
    memset(st, 0, sizeof *st);
    for (int i = 0; i < FMQ_NSTATS; i++)
        sum[i] = atomic_load_explicit(&r->ctl->retired[i], memory_order_relaxed);
    for (uint32_t p = 0; p < r->g.nparticipants; p++) {
        fmq_participant *pp = &r->parts[p];
        uint64_t id = atomic_load_explicit(&pp->ident, memory_order_acquire);
        for (int i = 0; i < FMQ_NSTATS; i++)
            sum[i] += atomic_load_explicit(&pp->stats[i], memory_order_relaxed);
        if (FMQ_PART_STATE(id) == FMQ_PART_ACTIVE && fmq_live_is_alive(r, p)) {
            uint32_t roles = atomic_load_explicit(&pp->roles, memory_order_relaxed);
            st->participants++;
            st->producers += (roles & FMQ_ROLE_PRODUCER) != 0;
            st->consumers += (roles & FMQ_ROLE_CONSUMER) != 0;
        }
    }
    st->capacity = r->g.slot_count;
    st->enqueued = sum[FMQ_ST_ENQUEUED];
    st->dequeued = sum[FMQ_ST_DEQUEUED];
    st->depth = fmq_ring_queued(r);
    st->bytes_in_use = sum[FMQ_ST_BYTES_IN] > sum[FMQ_ST_BYTES_OUT]
                           ? sum[FMQ_ST_BYTES_IN] - sum[FMQ_ST_BYTES_OUT] : 0;
    st->redelivered = sum[FMQ_ST_REDELIVERED];
    st->abandoned = sum[FMQ_ST_ABANDONED];
    st->dead_lettered = sum[FMQ_ST_DEAD_LETTERED];
    for (uint32_t c = 0; c < r->g.nclasses; c++)
        st->blocks_total += r->g.classes[c].nblocks;
    st->reclaimed = sum[FMQ_ST_RECLAIMED];
    st->recoveries = atomic_load_explicit(&r->ctl->recoveries.v, memory_order_relaxed);
    /* [A-stall]: pairs with [R-stall] (fmq_recover_stalled), so the record's
     * relaxed fields read below are the ones written with this ticket. */
    st->stall_ticket = atomic_load_explicit(&r->ctl->stall.ticket, memory_order_acquire);
    if (st->stall_ticket) {
        /* Report it only while that slot is still stuck as it was: a frozen
         * process that resumed has moved on, and the record is stale. */
        uint64_t t = st->stall_ticket - 1;
        const fmq_slot *s = fmq_slot_at(r, t);
        if (atomic_load_explicit(&s->word, memory_order_acquire) !=
            atomic_load_explicit(&r->ctl->stall.word, memory_order_relaxed)) {
            uint64_t expect = st->stall_ticket;
            /* relaxed: clears a stale record (a compare; nothing read under it) */
            atomic_compare_exchange_strong_explicit(&r->ctl->stall.ticket, &expect, 0,
                                                    memory_order_relaxed,
                                                    memory_order_relaxed);
            st->stall_ticket = 0;
        }
    }
    if (st->stall_ticket) {
        st->stall_since_ns = atomic_load_explicit(&r->ctl->stall.since_ns, memory_order_relaxed);
        st->stall_pid = atomic_load_explicit(&r->ctl->stall.pid, memory_order_relaxed);
        st->stall_phase = atomic_load_explicit(&r->ctl->stall.phase, memory_order_relaxed);
    }
}
