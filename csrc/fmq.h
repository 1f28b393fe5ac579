/*
 * fmq.h -- the C core of fastmq: what the Cython binding may call.
 *
 * A queue is one POSIX shared-memory segment (see fmq_layout.h for the bytes)
 * mapped by every process that uses it. This header is the whole surface of
 * the core; nothing here touches Python. Naming grid (DPDK style):
 *
 *   fmq_region_*   create / open / validate / close / unlink a segment, its
 *                  parameters and stats (fmq_region.c)
 *   fmq_ring_*     the slot state machine: reserve (claim to write), commit,
 *                  claim (to read), release, unclaim, and waiting (fmq_ring.c)
 *   fmq_pool_*     size-classed blocks for messages too big to live in a slot
 *                  (fmq_pool.c)
 *   fmq_lease_*    at-least-once delivery: the in-flight table (fmq_lease.c)
 *   fmq_recover    crash recovery on demand (fmq_recover.c)
 *   fmq_now_ns, fmq_last_error   clock and error text (fmq_base.c)
 *
 * How the files are layered, and what each keeps to itself, is in
 * fmq_internal.h; the futex shim and waiter handshake are fmq_wait.h's, the
 * participant table fmq_live.c's, and none of those is called from here.
 *
 * Return codes: FMQ_OK (0) or a negative FMQ_E* code; the binding maps each
 * code to exactly one Python exception (its "error funnel"). Functions that can
 * fail with an errno-style cause leave it in errno.
 */
#ifndef FMQ_H
#define FMQ_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    FMQ_OK = 0,
    FMQ_EMPTY = -1,        /* nothing to read right now                      */
    FMQ_FULL = -2,         /* no free slot right now                         */
    FMQ_NOSPACE = -3,      /* no free block big enough right now             */
    FMQ_TOOBIG = -4,       /* message larger than max_message_size           */
    FMQ_TIMEDOUT = -5,     /* the caller's deadline passed while waiting     */
    FMQ_AGAIN = -6,        /* a wait slice ended: check signals, retry       */
    FMQ_EINTR = -7,        /* a signal arrived while waiting                 */
    FMQ_ECORRUPT = -8,     /* a shared field failed validation               */
    FMQ_ENOTFOUND = -9,    /* no segment of that name                        */
    FMQ_EEXIST = -10,      /* segment exists and exist_ok was false          */
    FMQ_EINVAL = -11,      /* bad argument (message in fmq_last_error)       */
    FMQ_EOS = -12,         /* an OS call failed; errno says why              */
    FMQ_ETABLEFULL = -13,  /* participant table full                         */
    FMQ_ELOST = -14,       /* the slot was taken from us (reaped)            */
    FMQ_EVERSION = -15,    /* segment written by an incompatible fastmq      */
    FMQ_ESTATE = -16,      /* operation not valid in the current state       */
    FMQ_EDEADINIT = -17    /* the segment's creator died while initialising  */
};

/* A human-readable reason for the last FMQ_EINVAL / FMQ_ECORRUPT / FMQ_EVERSION
 * in this thread. */
const char *fmq_last_error(void);

typedef struct fmq_params {
    uint64_t maxsize;           /* slots == messages the ring holds, >= 1      */
    uint64_t max_message_size;  /* bytes, >= 1                                 */
    uint64_t capacity_bytes;    /* bytes of block pool, >= max_message_size    */
    uint32_t slot_size;         /* stride of one slot incl. its header; 0=default */
    uint32_t max_deliveries;    /* for acks (stored now, used later)           */
    const char *dead_letter;    /* segment name or NULL/""                     */
} fmq_params;

typedef struct fmq_region fmq_region;   /* one process-local handle */

/* A message claimed for reading, or a slot claimed for writing. */
typedef struct fmq_msg {
    uint64_t ticket;
    uint64_t word;          /* the slot word we claimed with                  */
    uint32_t len;
    uint32_t block;         /* FMQ_NO_BLOCK or a block reference              */
    uint32_t deliveries;
    int detached;           /* the slot was released, only the block is ours  */
    uint32_t crc;           /* durable queues: the record's checksum, as claimed */
    unsigned char *data;    /* payload inside the mapping                     */
    uint32_t flags;         /* FMQ_MSG_BATCH: an atomic batch (see below)     */
    uint64_t cursor;        /* batch: its next message (read at the claim)    */
} fmq_msg;

#define FMQ_MSG_BATCH 1u    /* the cursor word says so: FMQ_CURSOR_BATCH (fmq_layout.h) */

#define FMQ_NO_BLOCK 0xFFFFFFFFu

/* ---- process-wide -------------------------------------------------------- */
int fmq_global_init(void);               /* installs the fork handler         */
/* Bumped in every forked child (the one fork handler, installed by
 * fmq_global_init): an object that recorded it and sees another value now was
 * inherited through fork() and holds nothing of its own in shared memory. */
unsigned fmq_fork_gen(void);
uint64_t fmq_now_ns(void);               /* CLOCK_MONOTONIC                   */

/* ---- region ----------------------------------------------------------------- */
int fmq_region_create(const char *name, const fmq_params *p, unsigned mode,
                      int anonymous, int exist_ok, fmq_region **out);
int fmq_region_open(const char *name, fmq_region **out);
int fmq_region_unlink(const char *name);

/* ---- durable queues: a file on a real filesystem (fmq_durable.c) ----------- */
#define FMQ_SYNC_NONE 0u       /* the OS writes back when it likes             */
#define FMQ_SYNC_INTERVAL 1u   /* a put finding the last flush too old flushes */
#define FMQ_SYNC_COMMIT 2u     /* a put returns once it is on stable storage   */
/* path: the queue's file; name: for messages (the queue's segment name). */
int fmq_durable_create(const char *path, const char *name, const fmq_params *p, unsigned mode,
                       int exist_ok, uint32_t sync_mode, uint64_t sync_interval_ns,
                       fmq_region **out);
int fmq_durable_open(const char *path, const char *name, fmq_region **out);
/* After a put (or a batch of them) committed: 1 when the sync mode asks for
 * a flush now -- "commit" always (a flush covering it, shared with
 * concurrent producers), "interval" when the last flush is older than the
 * interval -- and the caller then calls fmq_durable_flush; 0 for "none", an
 * interval not over, or a queue that is not durable. No system call but the
 * clock's: the binding calls it holding its lock. */
int fmq_durable_sync_due(fmq_region *r);
int fmq_durable_flush(fmq_region *r);   /* flush now, whatever the mode */
typedef struct fmq_durable_info {
    uint32_t sync_mode;
    uint64_t sync_interval_ns, generation, recoveries, flushes;
    uint64_t kept, dropped, dropped_total;   /* this open's recovery; all of them */
} fmq_durable_info;
int fmq_durable_info_get(fmq_region *r, fmq_durable_info *out);   /* FMQ_EINVAL: not durable */
/* Drop the mapping and the locks; an anonymous segment is unlinked here when
 * no other handle anywhere holds it. */
void fmq_region_close(fmq_region *r);
/* Re-register after fork() (the child must not share the parent's identity). */
int fmq_region_check_fork(fmq_region *r);

uint64_t fmq_region_maxsize(const fmq_region *r);
uint64_t fmq_region_max_message_size(const fmq_region *r);
uint64_t fmq_region_capacity_bytes(const fmq_region *r);
uint32_t fmq_region_inline_max(const fmq_region *r);
int fmq_region_is_anonymous(const fmq_region *r);
const char *fmq_region_name(const fmq_region *r);
uint32_t fmq_region_max_deliveries(const fmq_region *r);
const char *fmq_region_dead_letter(const fmq_region *r);

typedef struct fmq_stats {
    uint64_t depth, capacity, enqueued, dequeued, bytes_in_use;
    uint64_t producers, consumers, participants;
    uint64_t redelivered, abandoned, dead_lettered;
    uint64_t blocks_total, reclaimed, recoveries;
    uint64_t stall_ticket, stall_since_ns, stall_pid, stall_phase;  /* ticket 0: none */
} fmq_stats;
void fmq_region_stats(fmq_region *r, fmq_stats *st);
/* Memory of a segment, in bytes reserved in /dev/shm (fmq_pool.c). */
typedef struct fmq_memory {
    uint64_t reserved;          /* all of the below                            */
    uint64_t fixed;             /* header, control lines, participant table    */
    uint64_t ring;              /* reserved slots and lease entries            */
    uint64_t meta;              /* block metadata carved so far                */
    uint64_t blocks_in_use;     /* pages of blocks holding messages            */
    uint64_t blocks_kept;       /* pages of free blocks kept warm              */
    uint64_t virtual_size;      /* the sparse file's size                      */
    uint64_t slots_reserved;    /* ring slots reserved so far                  */
} fmq_memory;
void fmq_region_memory(fmq_region *r, fmq_memory *mem);
/* Why a put could not go in right now (for Full's message). */
const char *fmq_region_full_reason(fmq_region *r, uint64_t need);
/* Would a put of a small (inline) message block right now? */
int fmq_region_full(fmq_region *r);
/* Blocks carved / on a free stack / held (tests; walks every stack). */
void fmq_pool_census(fmq_region *r, uint64_t *carved, uint64_t *free_blocks, uint64_t *held);
uint64_t fmq_ring_depth(fmq_region *r);

/* ---- ring (slots) ------------------------------------------------------------ */
/* Writing: claim a slot, fill it (inline or point it at a block), commit. */
int fmq_ring_reserve(fmq_region *r, fmq_msg *m);
/* A run of reserves (put_many): reserve past from_ticket (the previous one's
 * ticket + 1), moving the tail hint only every 64 tickets; the run moves it
 * at its end and before it waits (fmq_ring_advance_tail), commits with
 * fmq_ring_commit_quiet and counts itself with fmq_ring_count_put. */
int fmq_ring_reserve_from(fmq_region *r, fmq_msg *m, uint64_t from_ticket);
void fmq_ring_advance_tail(fmq_region *r, uint64_t ticket);
int fmq_ring_commit_quiet(fmq_region *r, fmq_msg *m, uint32_t len, uint32_t block);
void fmq_ring_count_put(fmq_region *r, uint64_t n, uint64_t bytes);
unsigned char *fmq_ring_inline_ptr(fmq_region *r, const fmq_msg *m);
/* Publish. With a block: the ring takes its share; keep_writer keeps ours too
 * (a reservation whose views are still alive), otherwise ours is dropped. */
int fmq_ring_commit(fmq_region *r, fmq_msg *m, uint32_t len, uint32_t block, int wake,
                    int keep_writer);

/* Reading: find and claim the oldest ready message. */
int fmq_ring_claim(fmq_region *r, fmq_msg *m);
int fmq_ring_claim_from(fmq_region *r, fmq_msg *m, uint64_t from_ticket);
/* Hand the message over but keep the block (recv leases): the block's ring
 * share becomes our reader share and the slot is freed at once. */
int fmq_ring_detach(fmq_region *r, fmq_msg *m, int wake);
/* Done with the message: free the slot (unless detached) and its block ref. */
int fmq_ring_release(fmq_region *r, fmq_msg *m, int wake);
/* A run of releases (get_many): fmq_ring_release without wake, statistics or
 * head move, which fmq_ring_finish_get does once for the n messages (bytes
 * in all) of the run; the caller wakes producers after it. */
int fmq_ring_release_quiet(fmq_region *r, fmq_msg *m);
void fmq_ring_finish_get(fmq_region *r, uint64_t n, uint64_t bytes);
/* Undo a claim (e.g. the caller could not allocate): the message stays queued. */
int fmq_ring_unclaim(fmq_region *r, fmq_msg *m);

/* Atomic batches: one record framing `count` messages (fmq_layout.h).
 * Writing: reserve a slot (and a block if the framed batch is bigger than a
 * slot's payload), write the framing, then commit it as one record: all of
 * the batch becomes visible with the one commit CAS. The framing is checked
 * before anything is published (FMQ_EINVAL). */
int fmq_ring_commit_batch(fmq_region *r, fmq_msg *m, uint32_t len, uint32_t block,
                          uint32_t count);
/* Sleep until the ring looks to have room for `nslots` more records (the
 * admission of an atomic batch of that many messages), like
 * fmq_ring_wait_space. */
int fmq_ring_wait_room(fmq_region *r, uint64_t deadline_ns, uint64_t nslots);
/* The message at `cursor` of a claimed batch: its payload, the batch's
 * count and the cursor past it. FMQ_ECORRUPT: the framing is damaged (the
 * caller discards the record with fmq_ring_discard_claimed). */
int fmq_ring_batch_frame(fmq_region *r, const fmq_msg *m, uint64_t cursor,
                         const unsigned char **data, uint32_t *len, uint32_t *count,
                         uint64_t *next);
/* The index of the message a batch cursor names (the cursor word also
 * carries the batch mark: fmq_layout.h). */
uint32_t fmq_ring_batch_index(uint64_t cursor);
/* Hand over the `taken` messages before `next` of a claimed batch whose rest
 * stays queued: the cursor moves to `next` and the slot goes back to READY
 * (the next claim, by anyone, starts there). For the batch's last message
 * use fmq_ring_release, as for any message. */
int fmq_ring_batch_advance(fmq_region *r, fmq_msg *m, uint64_t next, uint32_t taken);
/* The batch's last message and the `taken` - 1 before it: the record is freed
 * (fmq_ring_release). */
int fmq_ring_batch_release(fmq_region *r, fmq_msg *m, uint32_t taken);
/* Messages queued: records (fmq_ring_depth) plus the messages of atomic
 * batches beyond their first. Approximate, as the depth: a process killed
 * between a batch's publish (or a take from it) and the count's update
 * leaves the count low by what that step moved, never high, so a batch's
 * admission (fmq_ring_wait_room) can be too lenient, never stuck. */
uint64_t fmq_ring_queued(fmq_region *r);
/* Consume a claimed record that cannot be delivered (counted as abandoned);
 * returns FMQ_ECORRUPT with the reason. */
int fmq_ring_discard_claimed(fmq_region *r, fmq_msg *m);

/* Wake whoever waits for data / for space, if anyone does. */
void fmq_ring_wake_consumers(fmq_region *r, int all);
void fmq_ring_wake_producers(fmq_region *r);

/* Sleep until data might be there / space might be free, the deadline passes
 * (FMQ_TIMEDOUT; deadline_ns 0 = none), a slice of <= 100 ms ends (FMQ_AGAIN)
 * or a signal arrives (FMQ_EINTR). Never returns FMQ_OK without re-checking. */
int fmq_ring_wait_data(fmq_region *r, uint64_t deadline_ns);
int fmq_ring_wait_space(fmq_region *r, uint64_t deadline_ns, uint64_t need_bytes);

/* ---- pool (blocks) --------------------------------------------------------- */
int fmq_pool_alloc(fmq_region *r, uint64_t nbytes, uint32_t *block_out);
unsigned char *fmq_pool_ptr(fmq_region *r, uint32_t block);
uint64_t fmq_pool_block_size(fmq_region *r, uint32_t block);
/* Drop our share of a block: as its writer (reservation views gone, or a put
 * that never published) or as its reader (a recv() lease released). */
int fmq_pool_release_writer(fmq_region *r, uint32_t block);
int fmq_pool_release_reader(fmq_region *r, uint32_t block);

/* ---- leases: at-least-once delivery (fmq_lease.c) -------------------------- */
/* Move a claimed message (fmq_ring_claim) into a free in-flight entry, leased
 * to us until now + lease_ns, and free its slot. FMQ_FULL: no free entry (the
 * caller unclaims and waits with fmq_lease_wait_free). */
int fmq_lease_take(fmq_region *r, fmq_msg *m, uint64_t lease_ns, uint32_t *slot,
                   uint32_t *token, uint32_t *deliveries);
/* The same for the message at m->cursor of a claimed atomic batch: the entry
 * gets its own copy of that one message (inline, or a new block), so each
 * leased message of a batch is acked, nacked and redelivered on its own; then
 * the cursor moves past it (or, for the last one, the batch's slot and block
 * are freed). FMQ_NOSPACE: no block for the copy (the caller unclaims and
 * waits for space). */
int fmq_lease_take_batch(fmq_region *r, fmq_msg *m, uint64_t lease_ns, uint32_t *slot,
                         uint32_t *token, uint32_t *deliveries);
/* Payload of an entry we hold (LEASED or TAKING by us). */
int fmq_lease_payload(fmq_region *r, uint32_t slot, uint32_t token, const unsigned char **data,
                      uint32_t *len);
/* Zero-copy view of a held block payload: pin it (FMQ_AGAIN: inline or not
 * pinnable, copy it instead); unpin when the last view is gone. The block
 * stays valid until then even if the lease ends (ack, expiry, redelivery). */
int fmq_lease_pin(fmq_region *r, uint32_t slot, uint32_t token, const unsigned char **data,
                  uint32_t *len, uint32_t *block);
int fmq_lease_unpin(fmq_region *r, uint32_t slot, uint32_t token, uint32_t block);
int fmq_lease_ack(fmq_region *r, uint32_t slot, uint32_t token);
int fmq_lease_nack(fmq_region *r, uint32_t slot, uint32_t token, int requeue);
int fmq_lease_touch(fmq_region *r, uint32_t slot, uint32_t token, uint64_t lease_ns);
/* Requeue due leases (expired, or holder dead). force=0 returns at once
 * unless the earliest deadline passed or a liveness sweep is due. */
int fmq_lease_redeliver_due(fmq_region *r, int force);
int fmq_lease_wait_free(fmq_region *r, uint64_t deadline_ns);
/* Both the table and the ring full, a lease due: take that message directly
 * (a redelivery). FMQ_EMPTY if there is none to take. */
int fmq_lease_adopt(fmq_region *r, uint64_t lease_ns, uint32_t *slot, uint32_t *token,
                    uint32_t *deliveries);
/* One in-flight entry: a lease (dead_letter 0), or a message parked for the
 * dead-letter queue or being forwarded there (dead_letter 1; pid is its
 * taker's while forwarded, else 0). */
typedef struct fmq_pending {
    uint32_t slot, token, pid, deliveries, state, dead_letter;
    uint64_t leased_ns, deadline_ns;
} fmq_pending;
int fmq_lease_pending(fmq_region *r, fmq_pending *out, int max);
int fmq_lease_take_dead(fmq_region *r, uint32_t *slot, uint32_t *token);
/* The handle is closing: its leases go back to the queue now (a departed
 * holder) and the dead letters it took are parked again. Returns how many. */
int fmq_lease_release_owned(fmq_region *r);
int fmq_lease_ack_dead(fmq_region *r, uint32_t slot, uint32_t token);
uint32_t fmq_lease_count(const fmq_region *r);

/* ---- crash recovery --------------------------------------------------------- */
/* Reap every participant that is provably dead (its lock is gone): its slots
 * are repaired (a half-written message skipped, an unfinished read put back)
 * and its blocks freed. Returns the number reaped, or a negative FMQ_E*. */
int fmq_recover(fmq_region *r);

/* ---- test hooks -------------------------------------------------------------- */
/* Multi-threaded stress of the ring inside one process (driven from pytest):
 * nprod producers and ncons consumers move n messages each producer through r;
 * returns 0 when every message arrived once, in per-producer order, intact. */
int fmq_selftest_stress(fmq_region *r, int nprod, int ncons, uint64_t n_per_producer,
                        uint32_t max_len, char *report, size_t report_len);
/* The ring's lap arithmetic (fmq_ticket_lap, a multiply by a reciprocal)
 * against 64-bit division, for every slot count in [1, n_all], n_random more
 * up to FMQ_MAX_SLOTS and the edges of that range, each at lap edges, at the
 * top of the 64-bit range and at pseudo-random tickets; returns 0 when all
 * agree, else the first disagreement in report. */
int fmq_selftest_ticket_lap(uint64_t n_all, uint64_t n_random, uint64_t seed, char *report,
                            size_t report_len);

#ifdef __cplusplus
}
#endif
#endif /* FMQ_H */
