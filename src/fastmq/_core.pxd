# Declarations of the C core (csrc/fmq.h) for the Cython binding. Extern only:
# no Python-visible definitions live here.
from libc.stdint cimport uint32_t, uint64_t


cdef extern from "fmq.h" nogil:
    enum:
        FMQ_OK
        FMQ_EMPTY
        FMQ_FULL
        FMQ_NOSPACE
        FMQ_TOOBIG
        FMQ_TIMEDOUT
        FMQ_AGAIN
        FMQ_EINTR
        FMQ_ECORRUPT
        FMQ_ENOTFOUND
        FMQ_EEXIST
        FMQ_EINVAL
        FMQ_EOS
        FMQ_ETABLEFULL
        FMQ_ELOST
        FMQ_EVERSION
        FMQ_ESTATE
        FMQ_EDEADINIT

    uint32_t FMQ_NO_BLOCK
    uint32_t FMQ_MSG_BATCH

    ctypedef struct fmq_params:
        uint64_t maxsize
        uint64_t max_message_size
        uint64_t capacity_bytes
        uint32_t slot_size
        uint32_t max_deliveries
        const char *dead_letter

    ctypedef struct fmq_region:
        pass

    ctypedef struct fmq_msg:
        uint64_t ticket
        uint64_t word
        uint32_t len
        uint32_t block
        uint32_t deliveries
        int detached
        unsigned char *data
        uint32_t flags
        uint64_t cursor

    ctypedef struct fmq_stats:
        uint64_t depth, capacity, enqueued, dequeued, bytes_in_use
        uint64_t producers, consumers, participants
        uint64_t redelivered, abandoned, dead_lettered
        uint64_t blocks_total, reclaimed, recoveries
        uint64_t stall_ticket, stall_since_ns, stall_pid, stall_phase

    const char *fmq_last_error()
    int fmq_global_init()
    unsigned fmq_fork_gen()
    uint64_t fmq_now_ns()

    int fmq_region_create(const char *name, const fmq_params *p, unsigned mode,
                          int anonymous, int exist_ok, fmq_region **out)
    int fmq_region_open(const char *name, fmq_region **out)
    int fmq_region_unlink(const char *name)
    enum:
        FMQ_SYNC_NONE
        FMQ_SYNC_INTERVAL
        FMQ_SYNC_COMMIT
    int fmq_durable_create(const char *path, const char *name, const fmq_params *p,
                           unsigned mode, int exist_ok, uint32_t sync_mode,
                           uint64_t sync_interval_ns, fmq_region **out)
    int fmq_durable_open(const char *path, const char *name, fmq_region **out)
    int fmq_durable_sync_due(fmq_region *r)
    int fmq_durable_flush(fmq_region *r)
    ctypedef struct fmq_durable_info:
        uint32_t sync_mode
        uint64_t sync_interval_ns, generation, recoveries, flushes
        uint64_t kept, dropped, dropped_total
    int fmq_durable_info_get(fmq_region *r, fmq_durable_info *out)
    void fmq_region_close(fmq_region *r)
    int fmq_region_check_fork(fmq_region *r)
    uint64_t fmq_region_maxsize(const fmq_region *r)
    uint64_t fmq_region_max_message_size(const fmq_region *r)
    uint64_t fmq_region_capacity_bytes(const fmq_region *r)
    uint32_t fmq_region_inline_max(const fmq_region *r)
    int fmq_region_is_anonymous(const fmq_region *r)
    const char *fmq_region_name(const fmq_region *r)
    uint32_t fmq_region_max_deliveries(const fmq_region *r)
    const char *fmq_region_dead_letter(const fmq_region *r)
    void fmq_region_stats(fmq_region *r, fmq_stats *st)
    ctypedef struct fmq_memory:
        uint64_t reserved, fixed, ring, meta, blocks_in_use, blocks_kept
        uint64_t virtual_size, slots_reserved
    void fmq_region_memory(fmq_region *r, fmq_memory *mem)
    const char *fmq_region_full_reason(fmq_region *r, uint64_t need)
    int fmq_region_full(fmq_region *r)
    void fmq_pool_census(fmq_region *r, uint64_t *carved, uint64_t *free_blocks, uint64_t *held)
    uint64_t fmq_ring_depth(fmq_region *r)

    int fmq_ring_reserve(fmq_region *r, fmq_msg *m)
    int fmq_ring_reserve_from(fmq_region *r, fmq_msg *m, uint64_t from_ticket)
    void fmq_ring_advance_tail(fmq_region *r, uint64_t ticket)
    int fmq_ring_commit_quiet(fmq_region *r, fmq_msg *m, uint32_t len, uint32_t block)
    void fmq_ring_count_put(fmq_region *r, uint64_t n, uint64_t bytes)
    unsigned char *fmq_ring_inline_ptr(fmq_region *r, const fmq_msg *m)
    int fmq_ring_commit(fmq_region *r, fmq_msg *m, uint32_t len, uint32_t block, int wake,
                        int keep_writer)
    int fmq_ring_claim(fmq_region *r, fmq_msg *m)
    int fmq_ring_claim_from(fmq_region *r, fmq_msg *m, uint64_t from_ticket)
    int fmq_ring_detach(fmq_region *r, fmq_msg *m, int wake)
    int fmq_ring_release(fmq_region *r, fmq_msg *m, int wake)
    int fmq_ring_release_quiet(fmq_region *r, fmq_msg *m)
    void fmq_ring_finish_get(fmq_region *r, uint64_t n, uint64_t bytes)
    int fmq_ring_unclaim(fmq_region *r, fmq_msg *m)
    int fmq_ring_commit_batch(fmq_region *r, fmq_msg *m, uint32_t len, uint32_t block,
                              uint32_t count)
    int fmq_ring_wait_room(fmq_region *r, uint64_t deadline_ns, uint64_t nslots)
    int fmq_ring_batch_frame(fmq_region *r, const fmq_msg *m, uint64_t cursor,
                             const unsigned char **data, uint32_t *len, uint32_t *count,
                             uint64_t *next)
    uint32_t fmq_ring_batch_index(uint64_t cursor)
    int fmq_ring_batch_advance(fmq_region *r, fmq_msg *m, uint64_t next, uint32_t taken)
    int fmq_ring_discard_claimed(fmq_region *r, fmq_msg *m)
    int fmq_ring_batch_release(fmq_region *r, fmq_msg *m, uint32_t taken)
    uint64_t fmq_ring_queued(fmq_region *r)
    void fmq_ring_wake_consumers(fmq_region *r, int all)
    void fmq_ring_wake_producers(fmq_region *r)
    int fmq_ring_wait_data(fmq_region *r, uint64_t deadline_ns)
    int fmq_ring_wait_space(fmq_region *r, uint64_t deadline_ns, uint64_t need_bytes)

    int fmq_pool_alloc(fmq_region *r, uint64_t nbytes, uint32_t *block_out)
    unsigned char *fmq_pool_ptr(fmq_region *r, uint32_t block)
    uint64_t fmq_pool_block_size(fmq_region *r, uint32_t block)
    int fmq_pool_release_writer(fmq_region *r, uint32_t block)
    int fmq_pool_release_reader(fmq_region *r, uint32_t block)
    int fmq_recover(fmq_region *r)

    int fmq_lease_take(fmq_region *r, fmq_msg *m, uint64_t lease_ns, uint32_t *slot,
                       uint32_t *token, uint32_t *deliveries)
    int fmq_lease_take_batch(fmq_region *r, fmq_msg *m, uint64_t lease_ns, uint32_t *slot,
                             uint32_t *token, uint32_t *deliveries)
    int fmq_lease_payload(fmq_region *r, uint32_t slot, uint32_t token,
                          const unsigned char **data, uint32_t *len)
    int fmq_lease_pin(fmq_region *r, uint32_t slot, uint32_t token,
                      const unsigned char **data, uint32_t *len, uint32_t *block)
    int fmq_lease_unpin(fmq_region *r, uint32_t slot, uint32_t token, uint32_t block)
    int fmq_lease_ack(fmq_region *r, uint32_t slot, uint32_t token)
    int fmq_lease_nack(fmq_region *r, uint32_t slot, uint32_t token, int requeue)
    int fmq_lease_touch(fmq_region *r, uint32_t slot, uint32_t token, uint64_t lease_ns)
    int fmq_lease_redeliver_due(fmq_region *r, int force)
    int fmq_lease_wait_free(fmq_region *r, uint64_t deadline_ns)
    int fmq_lease_adopt(fmq_region *r, uint64_t lease_ns, uint32_t *slot, uint32_t *token,
                        uint32_t *deliveries)
    ctypedef struct fmq_pending:
        uint32_t slot, token, pid, deliveries, state, dead_letter
        uint64_t leased_ns, deadline_ns
    int fmq_lease_pending(fmq_region *r, fmq_pending *out, int max)
    int fmq_lease_take_dead(fmq_region *r, uint32_t *slot, uint32_t *token)
    int fmq_lease_release_owned(fmq_region *r)
    int fmq_lease_ack_dead(fmq_region *r, uint32_t slot, uint32_t token)
    uint32_t fmq_lease_count(const fmq_region *r)

    int fmq_selftest_stress(fmq_region *r, int nprod, int ncons, uint64_t n_per_producer,
                            uint32_t max_len, char *report, size_t report_len)
    int fmq_selftest_ticket_lap(uint64_t n_all, uint64_t n_random, uint64_t seed,
                                char *report, size_t report_len)
