/*
 * fmq_words.h -- named accessors for every packed word of the segment: the
 * one place that knows where each field sits inside a word. fmq_layout.h
 * defines the words and their widths; code everywhere else reads and builds
 * them only through these names, so a field never gets decoded two ways.
 *
 *   owner tag (24 bits)   index << FMQ_GEN_BITS | generation; 0 = nobody
 *   participant ident     pid(32) << 32 | generation << 16 | state(16)
 *   slot word             stamp(40) << 24 | owner tag(24), stamp = 4*lap+phase
 *   block word            IN_RING(1) << 48 | reader tag << 24 | writer tag
 *   in-flight entry word  token(32) << 32 | state(8) << 24 | owner tag(24)
 *   pin word              token(32) << 32 | FMQ_PIN_* state
 *   free-stack top        tag(32) << 32 | block index(32)
 *
 * Pure arithmetic on values already loaded: nothing here touches shared
 * memory except the address helpers (fmq_slot_at), which only compute where
 * a slot is.
 */
#ifndef FMQ_WORDS_H
#define FMQ_WORDS_H

#include <stdint.h>

#include "fmq_layout.h"

/* ---- owner tags ---------------------------------------------------------- */
#define FMQ_GEN_MASK ((1u << FMQ_GEN_BITS) - 1)
#define FMQ_TAG(idx, gen) (((uint32_t)(idx) << FMQ_GEN_BITS) | (uint32_t)(gen))
#define FMQ_TAG_INDEX(tag) ((uint32_t)(tag) >> FMQ_GEN_BITS)
#define FMQ_TAG_GEN(tag) ((uint32_t)(tag) & FMQ_GEN_MASK)

/* ---- participant ident word ------------------------------------------------ */
#define FMQ_PART_STATE(id) ((uint32_t)((id) & 0xFFFFu))
#define FMQ_PART_GEN(id) ((uint32_t)((id) >> 16) & FMQ_GEN_MASK)
#define FMQ_PART_PID(id) ((uint32_t)((id) >> 32))
#define FMQ_PART_IDENT(pid, gen, state) \
    (((uint64_t)(uint32_t)(pid) << 32) | ((uint64_t)(gen) << 16) | (uint64_t)(state))
/* The same ident with only its state replaced (pid and generation kept, so a
 * freed entry still says whose it was and the next occupant's generation
 * moves on from it). */
#define FMQ_PART_WITH_STATE(id, state) (((uint64_t)(id) & ~0xFFFFull) | (uint64_t)(state))

/* ---- slot word --------------------------------------------------------------- */
#define FMQ_STAMP_MASK ((1ull << FMQ_STAMP_BITS) - 1)

static inline uint64_t fmq_word(uint64_t stamp, uint32_t owner) {
    return ((stamp & FMQ_STAMP_MASK) << FMQ_OWNER_BITS) | owner;
}
static inline uint64_t fmq_stamp(uint64_t w) { return w >> FMQ_OWNER_BITS; }
static inline uint32_t fmq_slot_owner(uint64_t w) { return (uint32_t)(w & FMQ_OWNER_MASK); }
static inline uint32_t fmq_stamp_phase(uint64_t stamp) { return (uint32_t)(stamp & 3); }
static inline uint32_t fmq_slot_phase(uint64_t w) { return fmq_stamp_phase(fmq_stamp(w)); }
/* The lap number (modulo 2^38) a stamp carries. */
static inline uint64_t fmq_stamp_lap(uint64_t stamp) { return stamp >> 2; }
#define FMQ_LAP_MASK ((1ull << (FMQ_STAMP_BITS - 2)) - 1)

/* a - b for 40-bit modular stamps, as a small signed number */
static inline int64_t fmq_stamp_diff(uint64_t a, uint64_t b) {
    return (int64_t)((a - b) << FMQ_OWNER_BITS) >> FMQ_OWNER_BITS;
}

/* ---- block word ----------------------------------------------------------------- */
#define FMQ_BLK_WRITER(w) ((uint32_t)((w) & FMQ_OWNER_MASK))
#define FMQ_BLK_READER(w) ((uint32_t)(((w) >> 24) & FMQ_OWNER_MASK))
#define FMQ_BLK_MAKE(writer, reader, in_ring) \
    ((uint64_t)(writer) | ((uint64_t)(reader) << 24) | ((in_ring) ? FMQ_BLK_IN_RING : 0))
/* The reader field alone holding tag (for masks and transitions). */
#define FMQ_BLK_AS_READER(tag) ((uint64_t)(tag) << 24)

/* ---- free-stack top word (ctl->free_top / cold_top) ------------------------------ */
/* tag(32) << 32 | index(32): the tag moves on every change, so a CAS on a
 * stale top (ABA) fails. */
#define FMQ_TOP_INDEX(w) ((uint32_t)(w))
#define FMQ_TOP_NEXT(w, idx) (((((uint64_t)(w) >> 32) + 1) << 32) | (uint32_t)(idx))

/* ---- in-flight entry word ---------------------------------------------------------- */
#define FMQ_LTOKEN(w) ((uint32_t)((w) >> 32))
#define FMQ_LSTATE(w) ((uint32_t)(((w) >> 24) & 0xFF))
#define FMQ_LOWNER(w) ((uint32_t)((w) & FMQ_OWNER_MASK))
#define FMQ_LWORD(tok, st, own) \
    (((uint64_t)(tok) << 32) | ((uint64_t)(st) << 24) | (uint64_t)(own))

/* ---- pin word ------------------------------------------------------------------------ */
#define FMQ_PIN(tok, st) (((uint64_t)(tok) << 32) | (uint64_t)(st))
#define FMQ_PIN_TOKEN(p) ((uint32_t)((p) >> 32))

#endif /* FMQ_WORDS_H */
