/*
 * fmq_selftest.c -- a multi-threaded stress of the ring and pool, in C.
 *
 * Driven from pytest (tests/test_c_core.py) through the binding, so it runs
 * under the same sanitizer build as everything else. Threads share one handle
 * (threads of a process are one participant). Each producer sends
 * n_per_producer messages {producer, seq, length, checksum, filler} whose
 * lengths cycle through inline and block sizes up to max_len; consumers check
 * every message (checksum, per-producer order as seen by that consumer) and
 * mark it in a seen-bitmap, which at the end must show every message exactly
 * once. Waiting uses the real wait path (futex) with deadlines, so a lost wake
 * shows up as a timeout failure, not a hang.
 *
 * fmq_selftest_ticket_lap checks the lap arithmetic every slot access uses
 * (fmq_ticket_lap: a multiply by a per-handle reciprocal instead of a divide)
 * against the division it replaces, with no segment at all.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fmq_internal.h"

typedef struct {
    uint32_t producer;
    uint32_t len;
    uint64_t seq;
    uint64_t sum;
} fmq_st_head;

typedef struct {
    fmq_region *r;
    int nprod, ncons;
    uint64_t n;
    uint32_t max_len;
    _Atomic uint64_t received;
    _Atomic int failed;
    _Atomic unsigned char *seen;
    char *report;
    size_t report_len;
    pthread_mutex_t report_lock;   /* test-only: guards the report text */
} fmq_st;

typedef struct {
    fmq_st *st;
    int id;
} fmq_st_arg;

static void fmq_st_fail(fmq_st *st, const char *msg, unsigned long long a, unsigned long long b) {
    pthread_mutex_lock(&st->report_lock);
    if (!atomic_exchange(&st->failed, 1))
        snprintf(st->report, st->report_len, "%s (%llu, %llu)", msg, a, b);
    pthread_mutex_unlock(&st->report_lock);
}

static uint64_t fmq_st_sum(const unsigned char *p, uint32_t n) {
    uint64_t h = 1469598103934665603ull;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static uint32_t fmq_st_len(fmq_st *st, uint32_t id, uint64_t seq) {
    static const uint32_t menu[] = {24, 64, 200, 1000, 5000, 70000};
    uint32_t len = menu[(seq * 7 + id) % 6];
    if (len > st->max_len)
        len = st->max_len;
    return len < sizeof(fmq_st_head) ? (uint32_t)sizeof(fmq_st_head) : len;
}

static void *fmq_st_producer(void *p) {
    fmq_st_arg *a = p;
    fmq_st *st = a->st;
    fmq_region *r = st->r;
    unsigned char *buf = malloc(st->max_len + sizeof(fmq_st_head));
    for (uint64_t seq = 0; seq < st->n && !st->failed; seq++) {
        uint32_t len = fmq_st_len(st, (uint32_t)a->id, seq);
        for (uint32_t i = sizeof(fmq_st_head); i < len; i++)
            buf[i] = (unsigned char)(seq * 31 + i + (uint32_t)a->id);
        fmq_st_head h = {(uint32_t)a->id, len, seq,
                         fmq_st_sum(buf + sizeof h, len - (uint32_t)sizeof h)};
        memcpy(buf, &h, sizeof h);
        uint32_t block = FMQ_NO_BLOCK;
        unsigned char *dst = NULL;
        uint64_t deadline = fmq_now_ns() + 10000000000ull;
        if (len > fmq_region_inline_max(r)) {
            int rc;
            while ((rc = fmq_pool_alloc(r, len, &block)) == FMQ_NOSPACE)
                if (fmq_ring_wait_space(r, deadline, len) == FMQ_TIMEDOUT) {
                    fmq_st_fail(st, "producer timed out waiting for a block", seq, len);
                    goto out;
                }
            if (rc != FMQ_OK) {
                fmq_st_fail(st, "block alloc failed", (unsigned long long)-rc, len);
                goto out;
            }
            dst = fmq_pool_ptr(r, block);
            memcpy(dst, buf, len);
        }
        fmq_msg m;
        int rc;
        while ((rc = fmq_ring_reserve(r, &m)) == FMQ_FULL)
            if (fmq_ring_wait_space(r, deadline, 0) == FMQ_TIMEDOUT) {
                fmq_st_fail(st, "producer timed out waiting for a slot", seq, 0);
                goto out;
            }
        if (rc != FMQ_OK) {
            fmq_st_fail(st, "reserve failed", (unsigned long long)-rc, seq);
            goto out;
        }
        if (block == FMQ_NO_BLOCK)
            memcpy(fmq_ring_inline_ptr(r, &m), buf, len);
        if (fmq_ring_commit(r, &m, len, block, 1, 0) != FMQ_OK) {
            fmq_st_fail(st, "commit lost its slot", seq, 0);
            goto out;
        }
    }
out:
    free(buf);
    return NULL;
}

static void *fmq_st_consumer(void *p) {
    fmq_st_arg *a = p;
    fmq_st *st = a->st;
    fmq_region *r = st->r;
    uint64_t total = st->n * (uint64_t)st->nprod;
    uint64_t *last = calloc((size_t)st->nprod, sizeof *last);
    for (;;) {
        if (st->failed || atomic_load(&st->received) >= total)
            break;
        fmq_msg m;
        int rc = fmq_ring_claim(r, &m);
        if (rc == FMQ_EMPTY) {
            if (fmq_ring_wait_data(r, fmq_now_ns() + 20000000ull) == FMQ_TIMEDOUT &&
                atomic_load(&st->received) >= total)
                break;
            continue;
        }
        if (rc != FMQ_OK) {
            fmq_st_fail(st, "claim failed", (unsigned long long)-rc, 0);
            break;
        }
        fmq_st_head h;
        if (m.len < sizeof h) {
            fmq_st_fail(st, "short message", m.len, 0);
            break;
        }
        memcpy(&h, m.data, sizeof h);
        if (h.producer >= (uint32_t)st->nprod || h.seq >= st->n || h.len != m.len ||
            fmq_st_sum(m.data + sizeof h, m.len - (uint32_t)sizeof h) != h.sum) {
            fmq_st_fail(st, "torn or corrupted message", h.producer, h.seq);
            break;
        }
        if (last[h.producer] && h.seq + 1 <= last[h.producer]) {
            fmq_st_fail(st, "per-producer order broken", h.seq, last[h.producer] - 1);
            break;
        }
        last[h.producer] = h.seq + 1;
        uint64_t idx = (uint64_t)h.producer * st->n + h.seq;
        if (atomic_fetch_add(&st->seen[idx], 1) != 0) {
            fmq_st_fail(st, "duplicate delivery", h.producer, h.seq);
            break;
        }
        if (fmq_ring_release(r, &m, 1) != FMQ_OK) {
            fmq_st_fail(st, "release failed", h.producer, h.seq);
            break;
        }
        atomic_fetch_add(&st->received, 1);
    }
    free(last);
    return NULL;
}

int fmq_selftest_stress(fmq_region *r, int nprod, int ncons, uint64_t n, uint32_t max_len,
                        char *report, size_t report_len) {
    if (nprod < 1 || ncons < 1 || nprod > 64 || ncons > 64 || n < 1 || n > 100000000ull)
        return fmq_fail(FMQ_EINVAL, "selftest: bad arguments");
    if (max_len > r->g.max_message_size)
        max_len = (uint32_t)r->g.max_message_size;
    fmq_st st;
    memset(&st, 0, sizeof st);
    st.r = r;
    st.nprod = nprod;
    st.ncons = ncons;
    st.n = n;
    st.max_len = max_len;
    st.report = report;
    st.report_len = report_len;
    report[0] = '\0';
    pthread_mutex_init(&st.report_lock, NULL);
    st.seen = calloc((size_t)(n * (uint64_t)nprod), 1);
    pthread_t th[128];
    fmq_st_arg args[128];
    int nt = 0;
    for (int i = 0; i < ncons; i++, nt++) {
        args[nt] = (fmq_st_arg){&st, i};
        pthread_create(&th[nt], NULL, fmq_st_consumer, &args[nt]);
    }
    for (int i = 0; i < nprod; i++, nt++) {
        args[nt] = (fmq_st_arg){&st, i};
        pthread_create(&th[nt], NULL, fmq_st_producer, &args[nt]);
    }
    for (int i = 0; i < nt; i++)
        pthread_join(th[i], NULL);
    if (!st.failed) {
        for (uint64_t i = 0; i < n * (uint64_t)nprod; i++)
            if (st.seen[i] != 1) {
                fmq_st_fail(&st, "message lost", i / n, i % n);
                break;
            }
    }
    free((void *)st.seen);
    pthread_mutex_destroy(&st.report_lock);
    if (!st.failed)
        snprintf(report, report_len, "ok: %llu messages, %d producers, %d consumers",
                 (unsigned long long)(n * (uint64_t)nprod), nprod, ncons);
    return st.failed ? FMQ_ECORRUPT : FMQ_OK;
}

/* splitmix64: a reproducible stream of 64-bit tickets and slot counts. */
static uint64_t fmq_st_next(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int fmq_st_lap_one(uint64_t n, uint64_t *rng, char *report, size_t report_len) {
    fmq_region r;
    memset(&r, 0, sizeof r);
    r.g.slot_count = n;
    fmq_ticket_lap_init(&r);
    uint64_t edges[] = {0, 1, n - 1, n, n + 1, 2 * n - 1, 2 * n, 1ull << 32,
                        (1ull << 32) - 1, 1ull << 63, (1ull << 63) - 1, ~0ull, ~0ull - 1,
                        ~0ull - n, (~0ull / n) * n, (~0ull / n) * n - 1};
    for (size_t k = 0; k < sizeof edges / sizeof edges[0] + 16; k++) {
        uint64_t t = k < sizeof edges / sizeof edges[0] ? edges[k] : fmq_st_next(rng);
        uint64_t lap = fmq_ticket_lap(&r, t);
        if (lap != t / n) {
            snprintf(report, report_len, "slot count %llu, ticket %llu: lap %llu, not %llu",
                     (unsigned long long)n, (unsigned long long)t,
                     (unsigned long long)lap, (unsigned long long)(t / n));
            return FMQ_ECORRUPT;
        }
    }
    return FMQ_OK;
}

int fmq_selftest_ticket_lap(uint64_t n_all, uint64_t n_random, uint64_t seed, char *report,
                            size_t report_len) {
    if (n_all > FMQ_MAX_SLOTS) {
        snprintf(report, report_len, "n_all %llu is above FMQ_MAX_SLOTS",
                 (unsigned long long)n_all);
        return FMQ_EINVAL;
    }
    uint64_t rng = seed;
    for (uint64_t n = 1; n <= n_all; n++)
        if (fmq_st_lap_one(n, &rng, report, report_len) != FMQ_OK)
            return FMQ_ECORRUPT;
    for (uint64_t k = 0; k < n_random + 4; k++) {
        uint64_t n = k == 0 ? FMQ_MAX_SLOTS : k == 1 ? FMQ_MAX_SLOTS - 1
                   : k == 2 ? FMQ_MAX_SLOTS / 2 + 1 : k == 3 ? 3
                   : 1 + fmq_st_next(&rng) % FMQ_MAX_SLOTS;
        if (fmq_st_lap_one(n, &rng, report, report_len) != FMQ_OK)
            return FMQ_ECORRUPT;
    }
    snprintf(report, report_len, "ok: slot counts 1..%llu and %llu more",
             (unsigned long long)n_all, (unsigned long long)(n_random + 4));
    return FMQ_OK;
}
