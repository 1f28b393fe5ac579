/*
 * fmq_base.c -- what every layer of the core uses and that uses nothing of
 * theirs: error reporting, the monotonic clock, the fork generation and the
 * crash points of the crash tests.
 *
 * It sits at the bottom of the layer order (fmq_internal.h lists it); it calls
 * no other file of the core, so any file may call it.
 *
 * Failure model: nothing here touches shared memory. The error text is per
 * thread, so two threads failing at once never mix their messages.
 */
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fmq_base.h"

/* ---- errors ----------------------------------------------------------------- */

static __thread char fmq_errbuf[512];

const char *fmq_last_error(void) { return fmq_errbuf; }

int fmq_fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fmq_errbuf, sizeof fmq_errbuf, fmt, ap);
    va_end(ap);
    return code;
}

/* ---- time -------------------------------------------------------------------- */

uint64_t fmq_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- fork generation ------------------------------------------------------------ */

/* Moved on by the fork handler in the child (fmq_region.c installs it). */
volatile unsigned fmq_fork_generation = 0;

/* ---- crash points ------------------------------------------------------------------ */

/* FASTMQ_CRASH_AT=<name>[:<nth>] (read once, at import, by fmq_global_init)
 * makes the process SIGKILL itself the nth time it passes that crash point,
 * exactly like an OOM kill at that instruction. Tests only; unset, each point
 * costs one branch. */
const char *fmq_crash_spec = NULL;
void fmq_crashpoint(const char *where) {
    static _Atomic long hits = 0;
    const char *spec = fmq_crash_spec;
    size_t n = strlen(where);
    if (strncmp(spec, where, n) != 0 || (spec[n] != '\0' && spec[n] != ':'))
        return;
    long nth = spec[n] == ':' ? atol(spec + n + 1) : 1;
    /* Relaxed: a count of passes; it orders nothing else. */
    if (atomic_fetch_add_explicit(&hits, 1, memory_order_relaxed) + 1 < nth)
        return;
    /* FASTMQ_CRASH_SIGNAL=STOP freezes the process there instead, so a test
     * can act while it is frozen at that very step and then SIGKILL it. */
    const char *sig = getenv("FASTMQ_CRASH_SIGNAL");
    kill(getpid(), sig && strcmp(sig, "STOP") == 0 ? SIGSTOP : SIGKILL);
}
