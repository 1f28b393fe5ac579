/*
 * fmq_base.h -- the bottom layer (fmq_base.c): error reporting, crash points
 * and the fork generation, which every file of the core may use. It needs
 * nothing but fmq.h, so the bottom layer includes nothing above it.
 */
#ifndef FMQ_BASE_H
#define FMQ_BASE_H

#include "fmq.h"

int fmq_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* crash injection (tests only): compiled into every build (one predictable
 * branch each) and armed only when FASTMQ_CRASH_AT was set at import, so the
 * crash tests exercise the very binary users run, not a special build. */
extern const char *fmq_crash_spec;
void fmq_crashpoint(const char *where);
#define FMQ_CRASHPOINT(where) \
    do { if (__builtin_expect(fmq_crash_spec != NULL, 0)) fmq_crashpoint(where); } while (0)

/* fork detection: moved on in the child by the fork handler (fmq_region.c) */
extern volatile unsigned fmq_fork_generation;

#endif /* FMQ_BASE_H */
