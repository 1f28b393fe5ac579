/*
 * fmq_mac.h -- keyed BLAKE2b (RFC 7693) for fastmq's message authentication.
 *
 * The Python layer's authkey= puts a 16-byte keyed BLAKE2b tag in front of
 * every message (src/fastmq/_auth.py). hashlib computes the same function;
 * this C version exists because the per-message Python calls of hashlib
 * cost more than a whole small put or get. Tags are identical to
 * hashlib.blake2b(data, key=key, digest_size=n).digest() (a test checks it).
 *
 * Nothing here touches shared memory: the caller passes private bytes, or
 * a view it has decided to hash in place.
 */
#ifndef FMQ_MAC_H
#define FMQ_MAC_H

#include <stddef.h>
#include <stdint.h>

#define FMQ_MAC_BLOCK 128
#define FMQ_MAC_MAX_KEY 64
#define FMQ_MAC_MAX_DIGEST 64

typedef struct fmq_mac_state {
    uint64_t h[8];
    uint64_t t[2];                      /* bytes compressed so far            */
    unsigned char buf[FMQ_MAC_BLOCK];   /* pending input (at most one block)  */
    size_t buflen;
    size_t outlen;
} fmq_mac_state;

/* The state after the key block: copy it per message (keying costs one
 * compression). keylen 1..64, outlen 1..64; returns 0, or -1 on bad sizes. */
int fmq_mac_init(fmq_mac_state *s, const unsigned char *key, size_t keylen, size_t outlen);
/* Compress the pending key block now (as a non-final block): the state for
 * any message of at least one byte, copied per message. */
void fmq_mac_absorb_key(fmq_mac_state *s);
void fmq_mac_update(fmq_mac_state *s, const unsigned char *data, size_t len);
void fmq_mac_final(fmq_mac_state *s, unsigned char *out);
/* The tag of data[0..len) in one call, from a state after
 * fmq_mac_absorb_key (len must be at least 1: the tag of empty input
 * compresses the key block as the last one, which fmq_mac_final does). */
void fmq_mac_oneshot(const fmq_mac_state *keyed, const unsigned char *data, size_t len,
                     unsigned char *out);
/* The compression functions (fmq_mac.c), each needing the CPU features of
 * the ones below it: the one in use is chosen by the CPU on first use. */
#define FMQ_MAC_PORTABLE 0
#define FMQ_MAC_AVX2 1
#define FMQ_MAC_AVX512 2
/* The FMQ_MAC_* compression in use. */
int fmq_mac_path(void);
/* Tests and benchmarks: use compression FMQ_MAC_* path from now on (-1:
 * the CPU's best again). Returns the one in use before, or -1 (nothing
 * changed) if this CPU or build cannot run that one. */
int fmq_mac_select(int path);

#endif
