/*
 * fmq_layout.h -- the bytes of a fastmq segment, shared by every process.
 *
 * Rules (each enforced by a static assert below, whose message says why):
 *  - offsets, never pointers: each process maps the segment at its own address;
 *  - fixed-width types only, so 32/64-bit builds and compilers agree;
 *  - every hot word alone on a 128-byte line (two 64-byte lines: adjacent-line
 *    prefetch on x86 makes 64 too small), so producers and consumers do not
 *    false-share;
 *  - every field read from the segment is validated before it is trusted
 *    (fmq_region.c re-derives the whole geometry from four numbers and refuses
 *    a segment whose header disagrees; per-message fields are range-checked).
 *
 * Segment map:
 *
 *   [0, 4096)            fmq_header        magic, ABI, layout hash, geometry
 *   ctl_offset           fmq_ctl           hints, wait words, pool stack heads
 *   participants_offset  fmq_participant[nparticipants]
 *   ring_offset          slot_count slots of slot_stride bytes
 *   lease_offset         slot_count in-flight entries of slot_stride + 64 bytes
 *   per class c:         fmq_block_meta[nblocks_c], then (page aligned) data
 *
 * The file is sparse: its size is the whole virtual layout, but only the
 * header, control lines and participant table are reserved at creation. The
 * ring is reserved in chunks as tickets first reach it (ctl->ring_committed),
 * the lease table as leases need entries (ctl->lease_committed), block metadata as blocks are carved
 * (ctl->carved[c]) and block data page by page as messages need it
 * (fmq_block_meta.pages); see fmq_pool.c. No byte outside those ranges is
 * ever touched: on tmpfs even a read of a hole allocates a page, and a page
 * that cannot be allocated is a SIGBUS.
 *
 * The slot word (64 bits) is the heart of the ring:
 *
 *      63                        24 23                 0
 *     +----------------------------+--------------------+
 *     | stamp (40 bits, modular)   | owner tag (24 bits)|
 *     +----------------------------+--------------------+
 *
 *   stamp = 4 * lap + phase, lap = ticket / slot_count,
 *   phase 0 EMPTY (free for lap), 1 WRITING, 2 READY, 3 READING.
 *   owner = participant index (10 bits) << 14 | generation (14 bits):
 *   who holds the slot in WRITING/READING, so a dead holder can be found.
 *   An all-zero slot is EMPTY for lap 0: a fresh (zero-filled) segment needs
 *   no initialisation of its ring.
 */
#ifndef FMQ_LAYOUT_H
#define FMQ_LAYOUT_H

#include <stdalign.h>
#include <stdatomic.h>
#include <stdint.h>

#define FMQ_MAGIC "FASTMQ\x01N"     /* 8 bytes; 'N' = native backend       */
#define FMQ_ABI_VERSION 3u
#define FMQ_LINE 128
#define FMQ_PAGE 4096
#define FMQ_MAX_CLASSES 15          /* class 15 would collide with FMQ_NO_BLOCK */
#define FMQ_MAX_PARTICIPANTS 1024
#define FMQ_SLOT_HEADER 32
#define FMQ_DEFAULT_SLOT_SIZE 256
#define FMQ_MIN_BLOCK 4096
#define FMQ_MAX_SLOTS (1ull << 24)
#define FMQ_MAX_BLOCKS_PER_CLASS ((1u << 24) - 1)
/* The largest message the format can hold: a slot's and an in-flight entry's
 * len field is 32 bits. The one limit for max_message_size; the layers above
 * use this value rather than a limit of their own. */
#define FMQ_MAX_MESSAGE 0xFFFFFFFFull
#define FMQ_MAX_CAPACITY (4ull << 40)   /* capacity_bytes: 4 TiB of blocks */
#define FMQ_DEAD_LETTER_MAX 256
/* Kernel lock bytes, far past any segment's end: participant i locks
 * FMQ_LOCK_BASE + i; the creator locks FMQ_LOCK_BASE - 1 while initialising. */
#define FMQ_LOCK_BASE (1ll << 40)
#define FMQ_INIT_LOCK (FMQ_LOCK_BASE - 1)

/* init_state values */
#define FMQ_INIT_CREATING 0u
#define FMQ_INIT_READY 0x52454459u  /* "REDY": a random-looking value, not 1,
                                       so a zeroed or scribbled header is not
                                       mistaken for a ready one */
#define FMQ_INIT_AUDITING 0x41554454u  /* "AUDT": a lone opener is auditing */

/* slot phases */
#define FMQ_PH_EMPTY 0u
#define FMQ_PH_WRITING 1u
#define FMQ_PH_READY 2u
#define FMQ_PH_READING 3u

#define FMQ_STAMP_BITS 40
#define FMQ_OWNER_BITS 24
#define FMQ_OWNER_MASK ((1ull << FMQ_OWNER_BITS) - 1)
#define FMQ_GEN_BITS 14

/* block references: class << 24 | index */
#define FMQ_BLOCK_CLASS(b) ((b) >> 24)
#define FMQ_BLOCK_INDEX(b) ((b) & 0xFFFFFFu)
#define FMQ_BLOCK_REF(c, i) (((uint32_t)(c) << 24) | (uint32_t)(i))
#define FMQ_NIL 0xFFFFFFFFu            /* end of a free stack */

/* per-participant counters (summed by stats) */
enum {
    FMQ_ST_ENQUEUED, FMQ_ST_DEQUEUED, FMQ_ST_BYTES_IN, FMQ_ST_BYTES_OUT,
    FMQ_ST_REDELIVERED, FMQ_ST_ABANDONED, FMQ_ST_DEAD_LETTERED, FMQ_ST_RECLAIMED,
    FMQ_NSTATS
};

/* participant roles */
#define FMQ_ROLE_PRODUCER 1u
#define FMQ_ROLE_CONSUMER 2u

typedef struct fmq_class_desc {
    uint64_t block_size;
    uint64_t nblocks;
    uint64_t meta_offset;
    uint64_t data_offset;
} fmq_class_desc;

typedef struct fmq_header {
    char magic[8];
    uint32_t abi_version;
    uint32_t layout_hash;
    _Atomic uint32_t init_state;
    uint32_t creator_pid;
    uint64_t total_size;
    uint64_t slot_count;
    uint32_t slot_stride;
    uint32_t nclasses;
    uint64_t max_message_size;
    uint64_t capacity_bytes;
    uint32_t nparticipants;
    uint32_t max_deliveries;
    uint64_t ctl_offset;
    uint64_t participants_offset;
    uint64_t ring_offset;
    uint64_t lease_offset;
    uint64_t created_realtime_ns;
    fmq_class_desc classes[FMQ_MAX_CLASSES];
    char dead_letter[FMQ_DEAD_LETTER_MAX];
    uint64_t geometry_check;        /* hash of every field above except init_state */
} fmq_header;

/* A futex word and the count of sleepers on it share one line: the waker reads
 * the count right after it bumps the epoch, the sleeper writes both. */
typedef struct fmq_waitline {
    alignas(FMQ_LINE) _Atomic uint32_t epoch;
    _Atomic uint32_t waiters;
} fmq_waitline;

typedef struct fmq_u64line {
    alignas(FMQ_LINE) _Atomic uint64_t v;
} fmq_u64line;

typedef struct fmq_ctl {
    fmq_u64line tail;                      /* producer ticket hint            */
    fmq_u64line head;                      /* consumer ticket hint            */
    fmq_waitline data;                     /* consumers sleep here            */
    fmq_waitline space;                    /* producers sleep here            */
    fmq_u64line free_top[FMQ_MAX_CLASSES]; /* tag << 32 | index, per class:
                                              free blocks with reserved pages */
    fmq_u64line next_participant;          /* where registration scans first  */
    alignas(FMQ_LINE) struct {             /* the last stall a waiter saw      */
        _Atomic uint64_t ticket;           /* slot ticket + 1 (0 = none)       */
        _Atomic uint64_t since_ns;         /* CLOCK_MONOTONIC when first seen  */
        _Atomic uint32_t pid;              /* the live owner that holds it     */
        _Atomic uint32_t phase;            /* FMQ_PH_WRITING / FMQ_PH_READING  */
        _Atomic uint64_t word;             /* the slot word it was stuck with  */
    } stall;
    fmq_u64line recoveries;                /* dead participants reaped         */
    fmq_u64line lease_hint;                /* where lease takers scan first    */
    fmq_u64line next_due;                  /* earliest lease deadline (a hint) */
    fmq_u64line last_scan;                 /* last full lease scan (ns)        */
    alignas(FMQ_LINE) _Atomic uint64_t retired[FMQ_NSTATS]; /* folded counters of
                                              participants that are gone      */
    /* memory that follows use (fmq_pool.c); the pool counters are sums of
     * the per-block page records, recomputed by the audit */
    fmq_u64line pool_in_use;               /* bytes recorded on held blocks    */
    fmq_u64line pool_kept;                 /* bytes recorded on free blocks    */
    fmq_u64line ring_committed;            /* ring slots whose pages are
                                              reserved (grows only)           */
    fmq_u64line lease_committed;           /* lease entries likewise          */
    fmq_u64line ring_compacting;           /* 1 while a lone process gives the
                                              ring's pages back (fmq_pool.c)  */
    fmq_u64line shm_full_ns;               /* last failed reservation (ns)     */
    struct {                               /* recent demand for block memory
                                              (a policy hint, fmq_pool.c)     */
        alignas(FMQ_LINE) _Atomic uint64_t v; /* peak of pool_in_use this window */
        _Atomic uint64_t prev;             /* ... in the window before         */
        _Atomic uint64_t since_ns;         /* CLOCK_MONOTONIC: window start    */
    } pool_peak;
    fmq_u64line cold_top[FMQ_MAX_CLASSES]; /* free stacks of blocks without
                                              pages (free_top: warm ones)     */
    alignas(FMQ_LINE) _Atomic uint64_t carved[FMQ_MAX_CLASSES]; /* blocks of each
                                              class whose metadata exists     */
    fmq_u64line batch_extra;               /* messages queued in atomic batches
                                              beyond one per record, as a signed
                                              count (fmq_ring_queued)         */
} fmq_ctl;

typedef struct fmq_participant {
    alignas(FMQ_LINE) _Atomic uint64_t ident;   /* pid << 32 | gen << 16 | state:
                                                   accessors FMQ_PART_* (fmq_words.h) */
    uint64_t start_time;                        /* /proc/<pid>/stat field 22    */
    _Atomic uint32_t roles;
    uint32_t reserved_;
    _Atomic uint64_t stats[FMQ_NSTATS];
} fmq_participant;

#define FMQ_PART_FREE 0u
#define FMQ_PART_ACTIVE 1u

typedef struct fmq_slot {
    _Atomic uint64_t word;
    uint32_t len;
    uint32_t block;
    uint32_t deliveries;
    uint32_t crc;                   /* durable queues: CRC-32C of the record
                                       (fmq_durable.c)                          */
    uint64_t cursor;                /* 0: a plain record; an atomic batch:
                                       FMQ_CURSOR_BATCH | the next message not
                                       handed over (see below)                  */
    /* inline payload follows, slot_stride - FMQ_SLOT_HEADER bytes */
} fmq_slot;

/* An atomic batch is ONE ring record (one slot, one commit CAS, so the batch
 * is published or not as a whole), whose payload -- inline or a block --
 * frames its N messages:
 *
 *     u32 count | u32 0 | count x (u32 length | length bytes)
 *
 * Consumers take it whole (get_many) or one message at a time through the
 * slot's cursor: a holder (READING) copies the message at the cursor, stores
 * the cursor past it and puts the slot back to READY (an unclaim), or, for
 * the last one, frees the slot as for any message. The cursor store is the
 * hand-over of that message: a holder killed before it gives the message
 * back (recovery makes the slot READY, cursor unchanged), one killed after
 * it has consumed it. Only the holder of a slot writes its cursor. */
#define FMQ_BATCH_HEADER 8u
#define FMQ_FRAME_HEADER 4u
#define FMQ_MAX_BATCH ((1u << 24) - 1)
/* The cursor word: byte offset << 32 | FMQ_CURSOR_BATCH | index. The mark
 * shares the word with the position (one 64-bit store, so a kill never tears
 * them apart) and makes room in the slot header for a durable record's CRC;
 * an index is below FMQ_MAX_BATCH, so bits 24..31 are free for it. */
#define FMQ_CURSOR_BATCH (1ull << 31)
#define FMQ_CURSOR(off, idx) (((uint64_t)(off) << 32) | FMQ_CURSOR_BATCH | (uint32_t)(idx))
#define FMQ_CURSOR_OFF(c) ((uint32_t)((c) >> 32))
#define FMQ_CURSOR_IDX(c) ((uint32_t)(c) & FMQ_MAX_BATCH)
#define FMQ_CURSOR_IS_BATCH(c) (((c) & FMQ_CURSOR_BATCH) != 0)

/* Who holds a block, in one word so every hand-off is one CAS and every
 * holder is named (a dead holder's share can be taken back):
 *   bits  0..23  writer tag: the producer filling it, or keeping views of it
 *   bits 24..47  reader tag: the consumer copying it out, or a recv() lease
 *   bit  48      IN_RING: a queued message (slot) refers to it
 * The block is free exactly when the word is 0. */
#define FMQ_BLK_IN_RING (1ull << 48)   /* accessors: fmq_words.h */
/* A queued message's block records its slot's ticket (fmq_block_meta.next,
 * written by the commit before the ring's share is taken): a consumer that
 * takes the ring's share checks it, so a slot whose word was damaged into
 * READY over a consumed message (its block since another message's), or a
 * block freed and queued again while a consumer copied it, is told from
 * the slot's own message. FMQ_NIL: not recorded (a durable queue's rebuilt
 * block). Part of the layout hash: a build that does not record it must
 * not share a segment with one that checks it. */
#define FMQ_BLK_NEXT_IS_TICKET 1u

/* An in-flight (leased) message: it has left the ring but not the queue.
 * The word packs token(32) << 32 | state(8) << 24 | owner tag(24); the token
 * changes on every reuse so a stale ack never matches another message.
 * holder names the block share: reader(holder) while a live consumer holds
 * the lease, or IN_RING (holder 0) while the entry is orphaned or parked. */
#define FMQ_LS_FREE 0u
#define FMQ_LS_FILLING 1u
#define FMQ_LS_LEASED 2u
#define FMQ_LS_REQUEUING 3u
#define FMQ_LS_DEAD 4u       /* parked for the dead-letter queue */
#define FMQ_LS_TAKING 5u     /* being forwarded to the dead-letter queue */
#define FMQ_LS_ACKING 6u     /* acked; its block share being dropped */
#define FMQ_LEASE_HEADER 64
typedef struct fmq_lease {
    _Atomic uint64_t word;
    _Atomic uint64_t deadline_ns;   /* CLOCK_MONOTONIC; 0 = due now */
    uint64_t src_ticket;            /* ring ticket it was taken from */
    uint64_t leased_ns;
    uint32_t len;
    uint32_t block;
    uint32_t deliveries;            /* this delivery's count (1 = first) */
    _Atomic uint32_t holder;
    _Atomic uint64_t pin;           /* token << 32 | FMQ_PIN_*, see below */
    uint32_t crc;                   /* durable queues: the record's CRC-32C, kept */
    uint32_t src_index;             /* 1 + the message's index in the atomic
                                       batch at src_ticket; 0: a plain one
                                       (an index is < FMQ_MAX_BATCH < 2^24) */
    /* inline payload follows */
} fmq_lease;

/* Zero-copy views of a leased block payload (Message.data). While the holder
 * has views, the entry's pin is PINNED: whoever ends the lease (ack, expiry,
 * nack, dead-lettering) then leaves the holder's reader share on the block
 * and marks the pin HANDED instead of freeing the block, so the views stay
 * valid; the holder drops that share when its last view goes (a failed
 * PINNED -> NONE CAS tells it the share was handed over). A pin carries the
 * entry's token, so a stale one never matches a reused entry. */
#define FMQ_PIN_NONE 0u
#define FMQ_PIN_PINNED 1u
#define FMQ_PIN_HANDED 2u
/* pin word accessors (FMQ_PIN, FMQ_PIN_TOKEN): fmq_words.h */

typedef struct fmq_block_meta {
    _Atomic uint64_t state;     /* holders, see above                         */
    _Atomic uint32_t next;      /* free-stack link while free; while a slot
                                   names the block, the low 32 bits of that
                                   slot's ticket (FMQ_BLK_NEXT_IS_TICKET)    */
    _Atomic uint32_t pages;     /* data pages reserved from the block's start;
                                   written only by whoever has the block to
                                   itself (popped, or about to be pushed).
                                   Never more than are really reserved: a
                                   crash leaves it low (a leak the audit
                                   finds), never high (a SIGBUS)            */
} fmq_block_meta;

_Static_assert(sizeof(fmq_header) <= FMQ_PAGE,
               "the header must fit the first page: openers map and validate it alone");
_Static_assert(sizeof(fmq_slot) == FMQ_SLOT_HEADER,
               "inline payload starts at FMQ_SLOT_HEADER; change both together");
_Static_assert(sizeof(fmq_participant) == FMQ_LINE,
               "one participant per line: its counters are written on every message "
               "and must not false-share with a neighbour's");
_Static_assert(sizeof(fmq_waitline) == FMQ_LINE && sizeof(fmq_u64line) == FMQ_LINE,
               "each hot word must own its line");
_Static_assert(sizeof(fmq_lease) == FMQ_LEASE_HEADER,
               "an entry's inline payload starts at FMQ_LEASE_HEADER and must hold a slot's");
_Static_assert(sizeof(((fmq_ctl *)0)->pool_peak) == FMQ_LINE,
               "the demand words share one line, written by every free of a block");
_Static_assert(sizeof(fmq_block_meta) == 16, "block metadata is an array indexed by block");
_Static_assert(sizeof(_Atomic uint64_t) == 8 && sizeof(_Atomic uint32_t) == 4,
               "shared atomics must have the size of their plain type (lock-free, "
               "no hidden lock inside shared memory)");
_Static_assert(FMQ_MAX_PARTICIPANTS <= (1u << (FMQ_OWNER_BITS - FMQ_GEN_BITS)),
               "the participant index must fit in the owner tag of a slot word");
_Static_assert(FMQ_STAMP_BITS + FMQ_OWNER_BITS == 64, "the slot word is exactly 64 bits");
_Static_assert(FMQ_MAX_MESSAGE == (uint32_t)-1 && sizeof(((fmq_slot *)0)->len) == 4 &&
                   sizeof(((fmq_lease *)0)->len) == 4,
               "FMQ_MAX_MESSAGE is what a 32-bit len field records, no more, no less");
_Static_assert(FMQ_MAX_CLASSES < 15 + 1 && FMQ_MAX_BLOCKS_PER_CLASS < (1u << 24),
               "a block reference must never equal FMQ_NO_BLOCK");

/* Geometry derived from the creation parameters; identical in every process. */
typedef struct fmq_geometry {
    uint64_t slot_count;
    uint32_t slot_stride;
    uint32_t nclasses;
    uint64_t max_message_size;
    uint64_t capacity_bytes;
    uint32_t nparticipants;
    uint64_t ctl_offset, participants_offset, ring_offset, lease_offset, total_size;
    uint32_t lease_stride;
    fmq_class_desc classes[FMQ_MAX_CLASSES];
} fmq_geometry;

int fmq_geometry_compute(uint64_t slot_count, uint32_t slot_stride,
                         uint64_t max_message_size, uint64_t capacity_bytes,
                         fmq_geometry *g);
uint32_t fmq_layout_hash(void);

#endif /* FMQ_LAYOUT_H */
