#!/usr/bin/env bash
# Check the protocol model with spin: the CI bound, then each recorded
# counterexample as a mutation that the checker must still catch.
#
#   model/check.sh            the CI bounds (one message, one death; an atomic
#                             batch of two, one death; ~5 min)
#   model/check.sh --large    two messages, one death (by hand; a bitstate
#                             search: ~10 min in 0.6 GB, most but not
#                             provably all of the states)
#
# Needs spin and a C compiler (Debian: apt-get install spin gcc).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
command -v spin >/dev/null || { echo "model/check.sh: spin is not installed (apt-get install spin)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# run NAME EXPECT SPIN-DEFINES... : EXPECT is "pass" (no error) or "fail"
run() {
    local name=$1 expect=$2; shift 2
    mkdir -p "$work/$name"
    ( cd "$work/$name"
      cp "$here/fastmq.pml" .
      spin "$@" -a fastmq.pml
      gcc -O2 -DSAFETY ${STORE:--DCOLLAPSE} -DMEMLIM=${MEMLIM:-6000} -w -o pan pan.c
      start=$(date +%s)
      ./pan -m400000 ${PANFLAGS:--w26} > out.txt 2>&1 || true
      errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' out.txt | head -1)
      states=$(sed -n 's/^ *\([0-9e+.]*\) states, stored.*/\1/p' out.txt | head -1)
      printf '%-28s %-4s errors=%s states=%s time=%ss\n' "$name" "$expect" "${errors:-?}" \
          "${states:-?}" "$(( $(date +%s) - start ))"
      if [ "$expect" = pass ] &&
         grep -q "error: max search depth too small\|out of memory\|Search not completed" out.txt; then
          cat out.txt; echo "model/check.sh: $name: the search did not complete" >&2; exit 1
      fi
      if [ "$expect" = pass ] && [ "${errors:-1}" != 0 ]; then
          cat out.txt; spin -t -p fastmq.pml | tail -40
          echo "model/check.sh: $name: the model has a violation (trail above)" >&2; exit 1
      fi
      if [ "$expect" = fail ] && [ "${errors:-0}" = 0 ]; then
          echo "model/check.sh: $name: the checker no longer finds this counterexample" >&2; exit 1
      fi )
}

if [ "${1:-}" = --large ]; then
    STORE=-DBITSTATE PANFLAGS="-w32 -k3" run large-2msg-1kill pass -DNMSG=2 -DMAXKILL=1
    exit 0
fi
run ci-1msg-1kill pass -DNMSG=1 -DMAXKILL=1
run ci-2msg-nokill pass -DNMSG=2 -DMAXKILL=0
run ci-batch-1kill pass -DNMSG=2 -DBATCH -DMAXKILL=1
# Each counterexample found while building the model, re-introduced: the
# checker must still find it (a model that stopped seeing them checks nothing).
run mutant-slots-only-publish fail -DNMSG=1 -DBUG_SLOTS_ONLY_PUBLISH
run mutant-drop-before-acking fail -DNMSG=1 -DBUG_DROP_BEFORE_ACKING
run mutant-requeue-midtake fail -DNMSG=1 -DBUG_REQUEUE_MIDTAKE
# Two wrong orders of the atomic-batch design, which the checker must see.
run mutant-batch-unclaim-first fail -DNMSG=2 -DBATCH -DBUG_BATCH_UNCLAIM_FIRST
run mutant-batch-filling-share fail -DNMSG=2 -DBATCH -DBUG_BATCH_FILLING_SHARE
