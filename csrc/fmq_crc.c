/*
 * fmq_crc.c -- CRC-32C (Castagnoli), the checksum of a durable queue's
 * records (fmq_durable.c; the ring writes it at commit, fmq_ring.c).
 *
 * Algorithm. SSE 4.2's crc32 instruction where the CPU has it (checked once,
 * at the first call), else slicing-by-8 tables; both give the same value.
 * The instruction takes 3 cycles but one can start every cycle, so one chain
 * of them runs at a third of the CPU's speed: long inputs are cut into
 * strides of three equal lanes whose CRCs run interleaved, then joined. The
 * crc32 register is linear over GF(2) in (register, data), so the register
 * after lane A then lane B is shift_L(reg after A) ^ (reg of B from 0), where
 * shift_L (feeding L zero bytes) is a linear map of the 32-bit register:
 * applied with four 256-entry tables per lane length, built at init from the
 * images of the 32 unit vectors (each computed with the instruction itself).
 * A 4 KiB record then costs about 40% of the single chain's time.
 * fmq_record_crc covers a record's length and payload: whatever the payload
 * holds (one message, or the framed messages of a batch), one checksum per
 * ring record.
 *
 * Failure model. Pure computation over process memory; the tables are built
 * by whichever thread gets there first (the same values, so a race is
 * harmless).
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "fmq_internal.h"

static uint32_t fmq_crc_table[8][256];
/* -1 until the first call, then 1 (instruction) or 0 (tables). Stored with
 * release after every table it selects is built, loaded with acquire. */
static int fmq_crc_hw = -1;

#if defined(__x86_64__)
#define FMQ_CRC_LONG 1024u   /* bytes per lane: strides of 3 KiB ...           */
#define FMQ_CRC_SHORT 128u   /* ... then of 384 B; the rest in one chain        */
static uint32_t fmq_crc_shift_long[4][256], fmq_crc_shift_short[4][256];
static void fmq_crc_shift_init(uint32_t t[4][256], size_t len);
#endif

static void fmq_crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        fmq_crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            fmq_crc_table[t][i] = (fmq_crc_table[t - 1][i] >> 8) ^
                                  fmq_crc_table[0][fmq_crc_table[t - 1][i] & 0xFF];
#if defined(__x86_64__)
    /* cpuid itself, not __builtin_cpu_supports: under the wheel build's
     * compiler (clang with zig's runtime library) that answers 0 for every
     * feature, which would leave every wheel on the tables. */
    unsigned a, b, c, d;
    int hw = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 20)) ? 1 : 0;   /* SSE4.2 */
    if (hw) {
        fmq_crc_shift_init(fmq_crc_shift_long, FMQ_CRC_LONG);
        fmq_crc_shift_init(fmq_crc_shift_short, FMQ_CRC_SHORT);
    }
    __atomic_store_n(&fmq_crc_hw, hw, __ATOMIC_RELEASE);
#else
    __atomic_store_n(&fmq_crc_hw, 0, __ATOMIC_RELEASE);
#endif
}

static uint32_t fmq_crc_sw(uint32_t crc, const unsigned char *p, size_t n) {
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = fmq_crc_table[7][v & 0xFF] ^ fmq_crc_table[6][(v >> 8) & 0xFF] ^
              fmq_crc_table[5][(v >> 16) & 0xFF] ^ fmq_crc_table[4][(v >> 24) & 0xFF] ^
              fmq_crc_table[3][(v >> 32) & 0xFF] ^ fmq_crc_table[2][(v >> 40) & 0xFF] ^
              fmq_crc_table[1][(v >> 48) & 0xFF] ^ fmq_crc_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ fmq_crc_table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

#if defined(__x86_64__)
/* clang (the wheel builds compile with `zig cc`) names the CRC32 instruction
 * a feature of its own; gcc has it in SSE4.2. */
#if defined(__clang__)
#define FMQ_CRC_TARGET __attribute__((target("sse4.2,crc32")))
#else
#define FMQ_CRC_TARGET __attribute__((target("sse4.2")))
#endif
/* The register after `len` (a multiple of 8) zero bytes: shift_len(c). */
FMQ_CRC_TARGET static uint32_t fmq_crc_zeros(uint32_t c, size_t len) {
    uint64_t x = c;
    for (size_t i = 0; i < len; i += 8)
        x = __builtin_ia32_crc32di(x, 0);
    return (uint32_t)x;
}

static void fmq_crc_shift_init(uint32_t t[4][256], size_t len) {
    uint32_t unit[32];
    for (int i = 0; i < 32; i++)
        unit[i] = fmq_crc_zeros(1u << i, len);
    for (int k = 0; k < 4; k++)
        for (uint32_t v = 0; v < 256; v++) {
            uint32_t x = 0;
            for (int j = 0; j < 8; j++)
                if (v >> j & 1)
                    x ^= unit[8 * k + j];
            t[k][v] = x;
        }
}

static inline uint32_t fmq_crc_shift(const uint32_t t[4][256], uint32_t c) {
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
}

/* Whole strides of three lanes of `lane` bytes from p; the register and p
 * advance past them. */
FMQ_CRC_TARGET static inline uint64_t fmq_crc_lanes(uint64_t c, const unsigned char **pp,
                                                   size_t *np, size_t lane,
                                                   const uint32_t t[4][256]) {
    const unsigned char *p = *pp;
    size_t n = *np;
    while (n >= 3 * lane) {
        uint64_t a = c, b = 0, d = 0;
        for (size_t i = 0; i < lane; i += 8) {
            uint64_t va, vb, vd;
            memcpy(&va, p + i, 8);
            memcpy(&vb, p + lane + i, 8);
            memcpy(&vd, p + 2 * lane + i, 8);
            a = __builtin_ia32_crc32di(a, va);
            b = __builtin_ia32_crc32di(b, vb);
            d = __builtin_ia32_crc32di(d, vd);
        }
        c = fmq_crc_shift(t, fmq_crc_shift(t, (uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)d;
        p += 3 * lane;
        n -= 3 * lane;
    }
    *pp = p;
    *np = n;
    return c;
}

FMQ_CRC_TARGET static uint32_t fmq_crc_x86(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = crc;
    c = fmq_crc_lanes(c, &p, &n, FMQ_CRC_LONG, fmq_crc_shift_long);
    c = fmq_crc_lanes(c, &p, &n, FMQ_CRC_SHORT, fmq_crc_shift_short);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

int fmq_crc_force_portable(int portable) {
    if (__atomic_load_n(&fmq_crc_hw, __ATOMIC_ACQUIRE) < 0)
        fmq_crc_init();
    int was_portable = !__atomic_load_n(&fmq_crc_hw, __ATOMIC_ACQUIRE);
    if (portable)
        __atomic_store_n(&fmq_crc_hw, 0, __ATOMIC_RELEASE);
    else
        fmq_crc_init();       /* back to what the CPU has */
    return was_portable;
}

uint32_t fmq_crc32c(uint32_t seed, const void *data, size_t n) {
    int hw = __atomic_load_n(&fmq_crc_hw, __ATOMIC_ACQUIRE);
    if (__builtin_expect(hw < 0, 0)) {
        fmq_crc_init();   /* idempotent: racing threads compute the same table */
        hw = __atomic_load_n(&fmq_crc_hw, __ATOMIC_ACQUIRE);
    }
    uint32_t crc = ~seed;
#if defined(__x86_64__)
    if (hw)
        return ~fmq_crc_x86(crc, data, n);
#endif
    return ~fmq_crc_sw(crc, data, n);
}

uint32_t fmq_record_crc(uint32_t len, const unsigned char *payload) {
    uint32_t c = fmq_crc32c(0, &len, sizeof len);
    return payload ? fmq_crc32c(c, payload, len) : c;
}
