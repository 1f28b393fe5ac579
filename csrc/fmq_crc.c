/*
 * fmq_crc.c -- CRC-32C (Castagnoli), the checksum of a durable queue's
 * records (fmq_durable.c; the ring writes it at commit, fmq_ring.c).
 *
 * Algorithm. SSE 4.2's crc32 instruction where the CPU has it (checked once,
 * at the first call), else slicing-by-8 tables; both give the same value.
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
static int fmq_crc_hw = -1;

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
    fmq_crc_hw = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 20)) ? 1 : 0;   /* SSE4.2 */
#else
    fmq_crc_hw = 0;
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
FMQ_CRC_TARGET static uint32_t fmq_crc_x86(uint32_t crc,
                                                             const unsigned char *p,
                                                             size_t n) {
    uint64_t c = crc;
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
    if (fmq_crc_hw < 0)
        fmq_crc_init();
    int was_portable = !fmq_crc_hw;
    if (portable)
        fmq_crc_hw = 0;
    else
        fmq_crc_init();       /* back to what the CPU has */
    return was_portable;
}

uint32_t fmq_crc32c(uint32_t seed, const void *data, size_t n) {
    if (__builtin_expect(fmq_crc_hw < 0, 0))
        fmq_crc_init();   /* idempotent: racing threads compute the same table */
    uint32_t crc = ~seed;
#if defined(__x86_64__)
    if (fmq_crc_hw)
        return ~fmq_crc_x86(crc, data, n);
#endif
    return ~fmq_crc_sw(crc, data, n);
}

uint32_t fmq_record_crc(uint32_t len, const unsigned char *payload) {
    uint32_t c = fmq_crc32c(0, &len, sizeof len);
    return payload ? fmq_crc32c(c, payload, len) : c;
}
