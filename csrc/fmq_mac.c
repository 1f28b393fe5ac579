/*
 * fmq_mac.c -- keyed BLAKE2b (RFC 7693), written from the specification.
 *
 * Algorithm: the state h[0..7] starts as the SHA-512 IV with the parameter
 * block (digest length, key length, fanout 1, depth 1) folded into h[0]. A
 * key is padded with zeros to one full 128-byte block and compressed as the
 * first block of input. Input is compressed 128 bytes at a time; the last
 * block -- never compressed early, because it alone gets the final flag --
 * is zero-padded, and the byte counter t counts real bytes only. Each
 * compression mixes a 16-word working vector through 12 rounds of the G
 * function, whose message-word order each round takes from SIGMA.
 *
 * Failure model: none at run time; sizes are checked in fmq_mac_init.
 */
#include <string.h>

#include "fmq_mac.h"

static const uint64_t fmq_mac_iv[8] = {
    0x6a09e667f3bcc908ull, 0xbb67ae8584caa73bull, 0x3c6ef372fe94f82bull,
    0xa54ff53a5f1d36f1ull, 0x510e527fade682d1ull, 0x9b05688c2b3e6c1full,
    0x1f83d9abfb41bd6bull, 0x5be0cd19137e2179ull,
};

static const uint8_t fmq_mac_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},   /* rounds 10, 11 */
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},   /* repeat 0, 1   */
};

static inline uint64_t fmq_rotr64(uint64_t x, unsigned n) {
    return (x >> n) | (x << (64 - n));
}

static inline uint64_t fmq_load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);           /* little-endian hosts only (x86, arm64 LE) */
    return v;
}

#define FMQ_G(a, b, c, d, x, y)                 \
    do {                                        \
        a = a + b + (x);                        \
        d = fmq_rotr64(d ^ a, 32);              \
        c = c + d;                              \
        b = fmq_rotr64(b ^ c, 24);              \
        a = a + b + (y);                        \
        d = fmq_rotr64(d ^ a, 16);              \
        c = c + d;                              \
        b = fmq_rotr64(b ^ c, 63);              \
    } while (0)

/* One round: the columns, then the diagonals; with r a constant the SIGMA
 * lookups fold to constants, so m[] and v[] live in registers. */
#define FMQ_ROUND(r)                                                              \
    do {                                                                          \
        FMQ_G(v[0], v[4], v[8], v[12], m[fmq_mac_sigma[r][0]], m[fmq_mac_sigma[r][1]]);   \
        FMQ_G(v[1], v[5], v[9], v[13], m[fmq_mac_sigma[r][2]], m[fmq_mac_sigma[r][3]]);   \
        FMQ_G(v[2], v[6], v[10], v[14], m[fmq_mac_sigma[r][4]], m[fmq_mac_sigma[r][5]]);  \
        FMQ_G(v[3], v[7], v[11], v[15], m[fmq_mac_sigma[r][6]], m[fmq_mac_sigma[r][7]]);  \
        FMQ_G(v[0], v[5], v[10], v[15], m[fmq_mac_sigma[r][8]], m[fmq_mac_sigma[r][9]]);  \
        FMQ_G(v[1], v[6], v[11], v[12], m[fmq_mac_sigma[r][10]], m[fmq_mac_sigma[r][11]]); \
        FMQ_G(v[2], v[7], v[8], v[13], m[fmq_mac_sigma[r][12]], m[fmq_mac_sigma[r][13]]);  \
        FMQ_G(v[3], v[4], v[9], v[14], m[fmq_mac_sigma[r][14]], m[fmq_mac_sigma[r][15]]);  \
    } while (0)

static void fmq_mac_compress(fmq_mac_state *s, const unsigned char *block, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = fmq_load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = fmq_mac_iv[i];
    }
    v[12] ^= s->t[0];
    v[13] ^= s->t[1];
    if (last)
        v[14] = ~v[14];
    FMQ_ROUND(0);
    FMQ_ROUND(1);
    FMQ_ROUND(2);
    FMQ_ROUND(3);
    FMQ_ROUND(4);
    FMQ_ROUND(5);
    FMQ_ROUND(6);
    FMQ_ROUND(7);
    FMQ_ROUND(8);
    FMQ_ROUND(9);
    FMQ_ROUND(10);
    FMQ_ROUND(11);
    for (int i = 0; i < 8; i++)
        s->h[i] ^= v[i] ^ v[i + 8];
}

static inline void fmq_mac_count(fmq_mac_state *s, uint64_t n) {
    s->t[0] += n;
    if (s->t[0] < n)
        s->t[1]++;
}

int fmq_mac_init(fmq_mac_state *s, const unsigned char *key, size_t keylen, size_t outlen) {
    if (keylen < 1 || keylen > FMQ_MAC_MAX_KEY || outlen < 1 || outlen > FMQ_MAC_MAX_DIGEST)
        return -1;
    memset(s, 0, sizeof *s);
    memcpy(s->h, fmq_mac_iv, sizeof s->h);
    s->h[0] ^= 0x01010000ull ^ ((uint64_t)keylen << 8) ^ (uint64_t)outlen;
    s->outlen = outlen;
    /* The padded key is a full pending block: compressed (not as the last
     * block) as soon as any data follows, or as the last one if none does. */
    memcpy(s->buf, key, keylen);
    s->buflen = FMQ_MAC_BLOCK;
    return 0;
}

void fmq_mac_absorb_key(fmq_mac_state *s) {
    if (s->buflen == FMQ_MAC_BLOCK) {
        fmq_mac_count(s, FMQ_MAC_BLOCK);
        fmq_mac_compress(s, s->buf, 0);
        s->buflen = 0;
    }
}

void fmq_mac_update(fmq_mac_state *s, const unsigned char *data, size_t len) {
    while (len > 0) {
        if (s->buflen == FMQ_MAC_BLOCK) {       /* more input follows: not the last */
            fmq_mac_count(s, FMQ_MAC_BLOCK);
            fmq_mac_compress(s, s->buf, 0);
            s->buflen = 0;
        }
        if (s->buflen == 0) {
            /* Whole blocks straight from the input, keeping the final one back. */
            while (len > FMQ_MAC_BLOCK) {
                fmq_mac_count(s, FMQ_MAC_BLOCK);
                fmq_mac_compress(s, data, 0);
                data += FMQ_MAC_BLOCK;
                len -= FMQ_MAC_BLOCK;
            }
        }
        size_t take = FMQ_MAC_BLOCK - s->buflen;
        if (take > len)
            take = len;
        memcpy(s->buf + s->buflen, data, take);
        s->buflen += take;
        data += take;
        len -= take;
    }
}

void fmq_mac_final(fmq_mac_state *s, unsigned char *out) {
    fmq_mac_count(s, s->buflen);
    memset(s->buf + s->buflen, 0, FMQ_MAC_BLOCK - s->buflen);
    fmq_mac_compress(s, s->buf, 1);
    unsigned char full[64];
    memcpy(full, s->h, sizeof full);            /* little-endian words, as the spec's output */
    memcpy(out, full, s->outlen);
}
