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
 * Three compressions of the same function: the portable one below
 * (scalar, every round unrolled so the SIGMA lookups are constants), and on
 * x86-64 two that keep each row of the working vector in one 256-bit
 * register, so a round's four column G's (then its four diagonal ones) run
 * as one G on vectors; between the halves three rows are rotated by whole
 * lanes, which lines the diagonals up as columns. The AVX2 one builds
 * rotations from shuffles and shifts; the AVX-512VL one uses native 64-bit
 * rotates and gathers the message words with one permute per half-round.
 * Each is compiled with a function target attribute and chosen at run time
 * (once, by cpuid: the best one the CPU and OS support), so the extension
 * built for any x86-64 still runs on one without them. The small message
 * paths cost one compression per message per side, so this is most of
 * what a sealed small message costs; its dependency chain (each G needs
 * the previous one's result), not the instruction count, bounds how fast
 * one compression runs. All three are checked against hashlib in the
 * tests (fmq_mac_select forces each).
 *
 * Failure model: none at run time; sizes are checked in fmq_mac_init.
 */
#include <string.h>

#include "fmq_mac.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FMQ_MAC_SIMD 1
#include <cpuid.h>
#include <immintrin.h>
#endif

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

#ifdef FMQ_MAC_SIMD
/* Rows as vectors: a = v[0..3], b = v[4..7], c = v[8..11], d = v[12..15];
 * lane i of a G on vectors is the spec's G number i of that half-round. */
#define FMQ_V_ROT32(x) _mm256_shuffle_epi32((x), _MM_SHUFFLE(2, 3, 0, 1))
#define FMQ_V_ROT24(x) _mm256_shuffle_epi8((x), rot24)
#define FMQ_V_ROT16(x) _mm256_shuffle_epi8((x), rot16)
#define FMQ_V_ROT63(x) _mm256_or_si256(_mm256_srli_epi64((x), 63), _mm256_add_epi64((x), (x)))

#define FMQ_VG(x, y)                                                    \
    do {                                                                \
        a = _mm256_add_epi64(_mm256_add_epi64(a, (x)), b);              \
        d = FMQ_V_ROT32(_mm256_xor_si256(d, a));                        \
        c = _mm256_add_epi64(c, d);                                     \
        b = FMQ_V_ROT24(_mm256_xor_si256(b, c));                        \
        a = _mm256_add_epi64(_mm256_add_epi64(a, (y)), b);              \
        d = FMQ_V_ROT16(_mm256_xor_si256(d, a));                        \
        c = _mm256_add_epi64(c, d);                                     \
        b = FMQ_V_ROT63(_mm256_xor_si256(b, c));                        \
    } while (0)

/* _mm256_set_epi64x takes lanes high to low. Columns: lane i gets the
 * words of column G number i. Diagonals (see below): lane i gets those of
 * diagonal G number i - 1 (mod 4). */
#define FMQ_VM(r, k)                                                    \
    _mm256_set_epi64x((long long)m[fmq_mac_sigma[r][6 + (k)]],          \
                      (long long)m[fmq_mac_sigma[r][4 + (k)]],          \
                      (long long)m[fmq_mac_sigma[r][2 + (k)]],          \
                      (long long)m[fmq_mac_sigma[r][0 + (k)]])
#define FMQ_VMD(r, k)                                                   \
    _mm256_set_epi64x((long long)m[fmq_mac_sigma[r][12 + (k)]],         \
                      (long long)m[fmq_mac_sigma[r][10 + (k)]],         \
                      (long long)m[fmq_mac_sigma[r][8 + (k)]],          \
                      (long long)m[fmq_mac_sigma[r][14 + (k)]])

/* Between the halves, a goes right by one lane, c left by one and d by
 * two, so lane i holds diagonal G number i - 1: (v3, v4, v9, v14) in lane
 * 0, (v0, v5, v10, v15) in lane 1, and so on. b stays put: it is the last
 * row a G computes, and not moving it keeps the lane shuffles (3 cycles)
 * off the chain from one G to the next. */
#define FMQ_VROUND(r)                                                   \
    do {                                                                \
        FMQ_VG(FMQ_VM(r, 0), FMQ_VM(r, 1));             /* columns */   \
        a = _mm256_permute4x64_epi64(a, _MM_SHUFFLE(2, 1, 0, 3));       \
        c = _mm256_permute4x64_epi64(c, _MM_SHUFFLE(0, 3, 2, 1));       \
        d = _mm256_permute4x64_epi64(d, _MM_SHUFFLE(1, 0, 3, 2));       \
        FMQ_VG(FMQ_VMD(r, 0), FMQ_VMD(r, 1));           /* diagonals */ \
        a = _mm256_permute4x64_epi64(a, _MM_SHUFFLE(0, 3, 2, 1));       \
        c = _mm256_permute4x64_epi64(c, _MM_SHUFFLE(2, 1, 0, 3));       \
        d = _mm256_permute4x64_epi64(d, _MM_SHUFFLE(1, 0, 3, 2));       \
    } while (0)

__attribute__((target("avx2")))
static void fmq_mac_compress_avx2(fmq_mac_state *s, const unsigned char *block, int last) {
    uint64_t m[16];
    memcpy(m, block, sizeof m);                 /* little-endian hosts only */
    /* Byte shuffles rotating each 64-bit lane right by 3 and 2 bytes. */
    const __m256i rot24 = _mm256_setr_epi8(
        3, 4, 5, 6, 7, 0, 1, 2, 11, 12, 13, 14, 15, 8, 9, 10,
        3, 4, 5, 6, 7, 0, 1, 2, 11, 12, 13, 14, 15, 8, 9, 10);
    const __m256i rot16 = _mm256_setr_epi8(
        2, 3, 4, 5, 6, 7, 0, 1, 10, 11, 12, 13, 14, 15, 8, 9,
        2, 3, 4, 5, 6, 7, 0, 1, 10, 11, 12, 13, 14, 15, 8, 9);
    const __m256i h0 = _mm256_loadu_si256((const __m256i *)(const void *)&s->h[0]);
    const __m256i h1 = _mm256_loadu_si256((const __m256i *)(const void *)&s->h[4]);
    __m256i a = h0, b = h1;
    __m256i c = _mm256_loadu_si256((const __m256i *)(const void *)&fmq_mac_iv[0]);
    __m256i d = _mm256_xor_si256(
        _mm256_loadu_si256((const __m256i *)(const void *)&fmq_mac_iv[4]),
        _mm256_set_epi64x(0, last ? -1 : 0, (long long)s->t[1], (long long)s->t[0]));
    FMQ_VROUND(0);
    FMQ_VROUND(1);
    FMQ_VROUND(2);
    FMQ_VROUND(3);
    FMQ_VROUND(4);
    FMQ_VROUND(5);
    FMQ_VROUND(6);
    FMQ_VROUND(7);
    FMQ_VROUND(8);
    FMQ_VROUND(9);
    FMQ_VROUND(10);
    FMQ_VROUND(11);
    _mm256_storeu_si256((__m256i *)(void *)&s->h[0], _mm256_xor_si256(h0, _mm256_xor_si256(a, c)));
    _mm256_storeu_si256((__m256i *)(void *)&s->h[4], _mm256_xor_si256(h1, _mm256_xor_si256(b, d)));
}

/* AVX-512VL: the same vectors and the same schedule as the AVX2 one, with
 * two things AVX-512 has and AVX2 lacks. The four rotations are native
 * 64-bit rotates (vprorq: one instruction each, where AVX2 needs a byte
 * shuffle and, for 63, a shift, an add and an or). And the message words
 * of a half-round are gathered from the block by one two-table permute
 * (vpermt2q over the block's 16 words in two 512-bit registers) giving
 * both of its word vectors, instead of eight scalar loads and inserts.
 * The rows stay 256-bit vectors (VL): only the permute uses a 512-bit
 * register, and the message is loaded into two of them once per block. */
#define FMQ_W_ROT(x, n) _mm256_ror_epi64((x), (n))

#define FMQ_WG(x, y)                                                    \
    do {                                                                \
        a = _mm256_add_epi64(_mm256_add_epi64(a, (x)), b);              \
        d = FMQ_W_ROT(_mm256_xor_si256(d, a), 32);                      \
        c = _mm256_add_epi64(c, d);                                     \
        b = FMQ_W_ROT(_mm256_xor_si256(b, c), 24);                      \
        a = _mm256_add_epi64(_mm256_add_epi64(a, (y)), b);              \
        d = FMQ_W_ROT(_mm256_xor_si256(d, a), 16);                      \
        c = _mm256_add_epi64(c, d);                                     \
        b = FMQ_W_ROT(_mm256_xor_si256(b, c), 63);                      \
    } while (0)

/* The permute index of a half-round: lanes 0-3 are its first word vector
 * (the x of each lane's G), lanes 4-7 its second (the y), each naming one
 * of the block's 16 words. Lanes as in FMQ_VM (columns) and FMQ_VMD
 * (diagonals, lane i = diagonal G number i - 1). _mm512_set_epi64 takes
 * lanes high to low; SIGMA is constant, so these fold to constants. */
#define FMQ_WIDX(r, l0, l1, l2, l3)                                     \
    _mm512_set_epi64(fmq_mac_sigma[r][(l3) + 1], fmq_mac_sigma[r][(l2) + 1], \
                     fmq_mac_sigma[r][(l1) + 1], fmq_mac_sigma[r][(l0) + 1], \
                     fmq_mac_sigma[r][l3], fmq_mac_sigma[r][l2],        \
                     fmq_mac_sigma[r][l1], fmq_mac_sigma[r][l0])

#define FMQ_WROUND(r)                                                   \
    do {                                                                \
        __m512i xy = _mm512_permutex2var_epi64(m0, FMQ_WIDX(r, 0, 2, 4, 6), m1); \
        FMQ_WG(_mm512_castsi512_si256(xy), _mm512_extracti64x4_epi64(xy, 1));  \
        a = _mm256_permute4x64_epi64(a, _MM_SHUFFLE(2, 1, 0, 3));       \
        c = _mm256_permute4x64_epi64(c, _MM_SHUFFLE(0, 3, 2, 1));       \
        d = _mm256_permute4x64_epi64(d, _MM_SHUFFLE(1, 0, 3, 2));       \
        xy = _mm512_permutex2var_epi64(m0, FMQ_WIDX(r, 14, 8, 10, 12), m1); \
        FMQ_WG(_mm512_castsi512_si256(xy), _mm512_extracti64x4_epi64(xy, 1));  \
        a = _mm256_permute4x64_epi64(a, _MM_SHUFFLE(0, 3, 2, 1));       \
        c = _mm256_permute4x64_epi64(c, _MM_SHUFFLE(2, 1, 0, 3));       \
        d = _mm256_permute4x64_epi64(d, _MM_SHUFFLE(1, 0, 3, 2));       \
    } while (0)

/* "avx2,avx512f,avx512vl,avx512bw": names gcc and clang both accept in the
 * target attribute. Nothing outside these functions is compiled for
 * AVX-512, so the module still loads and runs on any x86-64 (the CPU check
 * picks them). One compression of the block in m0/m1 on state h_in, into
 * h_out (which may be h_in). */
#define FMQ_AVX512_TARGET __attribute__((target("avx2,avx512f,avx512vl,avx512bw")))

static inline FMQ_AVX512_TARGET __attribute__((always_inline))
void fmq_mac_rounds_avx512(__m512i m0, __m512i m1, const uint64_t *h_in, uint64_t t0,
                           uint64_t t1, int last, uint64_t *h_out) {
    const __m256i h0 = _mm256_loadu_si256((const __m256i *)(const void *)&h_in[0]);
    const __m256i h1 = _mm256_loadu_si256((const __m256i *)(const void *)&h_in[4]);
    __m256i a = h0, b = h1;
    __m256i c = _mm256_loadu_si256((const __m256i *)(const void *)&fmq_mac_iv[0]);
    __m256i d = _mm256_xor_si256(
        _mm256_loadu_si256((const __m256i *)(const void *)&fmq_mac_iv[4]),
        _mm256_set_epi64x(0, last ? -1 : 0, (long long)t1, (long long)t0));
    FMQ_WROUND(0);
    FMQ_WROUND(1);
    FMQ_WROUND(2);
    FMQ_WROUND(3);
    FMQ_WROUND(4);
    FMQ_WROUND(5);
    FMQ_WROUND(6);
    FMQ_WROUND(7);
    FMQ_WROUND(8);
    FMQ_WROUND(9);
    FMQ_WROUND(10);
    FMQ_WROUND(11);
    _mm256_storeu_si256((__m256i *)(void *)&h_out[0], _mm256_xor_si256(h0, _mm256_xor_si256(a, c)));
    _mm256_storeu_si256((__m256i *)(void *)&h_out[4], _mm256_xor_si256(h1, _mm256_xor_si256(b, d)));
}

FMQ_AVX512_TARGET
static void fmq_mac_compress_avx512(fmq_mac_state *s, const unsigned char *block, int last) {
    fmq_mac_rounds_avx512(_mm512_loadu_si512((const void *)block),          /* words 0-7  */
                          _mm512_loadu_si512((const void *)(block + 64)),   /* words 8-15 */
                          s->h, s->t[0], s->t[1], last, s->h);
}

/* A whole message of 1..128 bytes after the key block (fmq_mac_oneshot's
 * common case): the block is read with byte-masked loads, which read
 * nothing past data[len) and give the zero padding, so the message is not
 * copied into a padded buffer first; the state is read from the keyed one
 * and only the tag is written. */
FMQ_AVX512_TARGET
static void fmq_mac_short_avx512(const fmq_mac_state *keyed, const unsigned char *data,
                                 size_t len, unsigned char *out) {
    uint64_t h[8];
    __mmask64 lo = len >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << len) - 1);
    __mmask64 hi = len <= 64 ? 0 : len >= 128 ? ~(__mmask64)0
                                              : (((__mmask64)1 << (len - 64)) - 1);
    uint64_t t0 = keyed->t[0] + len, t1 = keyed->t[1] + (t0 < len);
    fmq_mac_rounds_avx512(_mm512_maskz_loadu_epi8(lo, data),
                          _mm512_maskz_loadu_epi8(hi, data + 64), keyed->h, t0, t1, 1, h);
    memcpy(out, h, keyed->outlen);          /* little-endian words, as the spec's output */
}

/* The fastest compression this CPU runs, read from cpuid and XCR0 here
 * rather than with __builtin_cpu_supports: the wheel build (clang with
 * zig's runtime library) gets 0 from that for every feature, which would
 * leave every wheel on the portable code. A feature counts only when the
 * OS saves its registers (XCR0: the YMM state for AVX2; the opmask and
 * both ZMM halves too for AVX-512). The AVX-512 one needs AVX2 as well
 * (the rows' lane permutes are AVX2 instructions) and BW (the byte-masked
 * loads of a short message). */
static int fmq_mac_best(void) {
    unsigned a, b, c, d;
    uint32_t xcr0_lo, xcr0_hi;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return FMQ_MAC_PORTABLE;
    if (!(c & (1u << 27)) || !(c & (1u << 28)))     /* OSXSAVE, AVX */
        return FMQ_MAC_PORTABLE;
    /* xgetbv by its encoding-independent mnemonic: _xgetbv would need the
     * xsave target feature on this function. */
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    (void)xcr0_hi;
    if ((xcr0_lo & 0x6u) != 0x6u)                    /* XMM and YMM state */
        return FMQ_MAC_PORTABLE;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 5)))  /* AVX2 */
        return FMQ_MAC_PORTABLE;
    if ((b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31)) &&  /* F, BW, VL */
        (xcr0_lo & 0xe6u) == 0xe6u)                  /* + opmask, ZMM_Hi256, Hi16_ZMM */
        return FMQ_MAC_AVX512;
    return FMQ_MAC_AVX2;
}

/* -1: not decided yet; else the FMQ_MAC_* compression in use. A benign
 * race: every thread that decides writes the same value. */
static int fmq_mac_simd = -1;

static int fmq_mac_path_now(void) {
    int use = __atomic_load_n(&fmq_mac_simd, __ATOMIC_RELAXED);
    if (use < 0) {
        use = fmq_mac_best();
        __atomic_store_n(&fmq_mac_simd, use, __ATOMIC_RELAXED);
    }
    return use;
}
#endif

int fmq_mac_path(void) {
#ifdef FMQ_MAC_SIMD
    return fmq_mac_path_now();
#else
    return FMQ_MAC_PORTABLE;
#endif
}

int fmq_mac_select(int path) {
#ifdef FMQ_MAC_SIMD
    int was = fmq_mac_path_now();
    int best = fmq_mac_best();
    if (path < 0)
        path = best;
    if (path > best)
        return -1;          /* each path's CPU runs every lower one */
    __atomic_store_n(&fmq_mac_simd, path, __ATOMIC_RELAXED);
    return was;
#else
    if (path > FMQ_MAC_PORTABLE)
        return -1;
    return FMQ_MAC_PORTABLE;
#endif
}

static inline void fmq_mac_block(fmq_mac_state *s, const unsigned char *block, int last) {
#ifdef FMQ_MAC_SIMD
    int use = fmq_mac_path_now();
    if (use == FMQ_MAC_AVX512) {
        fmq_mac_compress_avx512(s, block, last);
        return;
    }
    if (use == FMQ_MAC_AVX2) {
        fmq_mac_compress_avx2(s, block, last);
        return;
    }
#endif
    fmq_mac_compress(s, block, last);
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
        fmq_mac_block(s, s->buf, 0);
        s->buflen = 0;
    }
}

void fmq_mac_update(fmq_mac_state *s, const unsigned char *data, size_t len) {
    while (len > 0) {
        if (s->buflen == FMQ_MAC_BLOCK) {       /* more input follows: not the last */
            fmq_mac_count(s, FMQ_MAC_BLOCK);
            fmq_mac_block(s, s->buf, 0);
            s->buflen = 0;
        }
        if (s->buflen == 0) {
            /* Whole blocks straight from the input, keeping the final one back. */
            while (len > FMQ_MAC_BLOCK) {
                fmq_mac_count(s, FMQ_MAC_BLOCK);
                fmq_mac_block(s, data, 0);
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
    fmq_mac_block(s, s->buf, 1);
    unsigned char full[64];
    memcpy(full, s->h, sizeof full);            /* little-endian words, as the spec's output */
    memcpy(out, full, s->outlen);
}

void fmq_mac_oneshot(const fmq_mac_state *keyed, const unsigned char *data, size_t len,
                     unsigned char *out) {
    /* Only h and t are copied: the key block is already absorbed, so no
     * input is pending and the 128-byte buffer of the state is not used. */
    fmq_mac_state s;
#ifdef FMQ_MAC_SIMD
    if (len <= FMQ_MAC_BLOCK && len > 0 && fmq_mac_path_now() == FMQ_MAC_AVX512) {
        fmq_mac_short_avx512(keyed, data, len, out);
        return;
    }
#endif
    memcpy(s.h, keyed->h, sizeof s.h);
    memcpy(s.t, keyed->t, sizeof s.t);
    while (len > FMQ_MAC_BLOCK) {               /* keep the final block back */
        fmq_mac_count(&s, FMQ_MAC_BLOCK);
        fmq_mac_block(&s, data, 0);
        data += FMQ_MAC_BLOCK;
        len -= FMQ_MAC_BLOCK;
    }
    unsigned char last[FMQ_MAC_BLOCK];
    memcpy(last, data, len);
    memset(last + len, 0, FMQ_MAC_BLOCK - len);
    fmq_mac_count(&s, len);
    fmq_mac_block(&s, last, 1);
    unsigned char full[64];
    memcpy(full, s.h, sizeof full);
    memcpy(out, full, keyed->outlen);
}
