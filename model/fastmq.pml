/*
 * fastmq.pml -- a Promela model of fastmq's shared-memory protocol, for spin.
 *
 * What is modelled (csrc/ names in brackets; each C function that implements
 * a step names the step, "model: <step>", and each step here names its C
 * function):
 *   - the slot ring: reserve, commit, claim, retire (the hand-over), unclaim
 *     [fmq_ring.c]; with -DBATCH, an atomic batch instead of the two
 *     messages: one record holding both, published by one commit, taken one
 *     message at a time through the slot's cursor (the cursor store is the
 *     hand-over, then the unclaim), leased with a copy block of its own, and
 *     recovery finishing a dead taker's cursor move;
 *   - blocks and their holder word (writer tag, reader tag, IN_RING bit) and
 *     the free list [fmq_pool.c];
 *   - the in-flight table: lease take, ack, nack, touch, expiry, redelivery,
 *     parking when the ring is full, dead-lettering, zero-copy pins and their
 *     hand-over [fmq_lease.c];
 *   - crash recovery of a dead participant by another process: the entry
 *     pass, the slot pass and the block pass [fmq_recover.c];
 *   - process death as a nondeterministic step between any two atomic steps
 *     of a producer or a consumer (the Killer process and `unless`), a clean
 *     close, and a frozen process (any process may be delayed for ever: spin
 *     explores every interleaving, and nothing reaps a process that is alive).
 *
 * Granularity: each `d_step` is one atomic instruction of the C code (a CAS,
 * an atomic store or load) or a plain store that no other process reads
 * before a later release; a death can fall between any two of them. Two
 * instants are modelled as atomic although the C code splits them, because
 * fmq_pool.c documents that a death there leaks one block until the lone
 * opener's audit (fmq_audit_if_alone): the pop of a free block and the store
 * of its writer tag, and the CAS that makes a block word zero and the push.
 *
 * Time is abstract: a LEASED entry's deadline may pass at any moment (the
 * Clock step in Service); a touch moves it back.
 *
 * What is checked (the asserts below, and spin's own deadlock check):
 *   P1 no committed message is lost: at the end each one was handed over,
 *      acked or dead-lettered;
 *   P2 none is delivered torn or foreign: a consumer's copy, and a zero-copy
 *      view for as long as it lives, show exactly the message's payload;
 *   P3 no auto-ack message is delivered twice; duplicates only for messages
 *      that were leased (at-least-once, a redeliverer killed between its
 *      commit and freeing the entry);
 *   P4 a late operation fails instead of corrupting: an ack or touch of a
 *      lease that was redelivered or re-leased changes nothing (the CASes
 *      from the value read), checked by P1-P3 and by the deadline owner
 *      assert in touch;
 *   P5 no wedge: while a live participant keeps trying, every message is
 *      eventually settled and every process ends (an invalid end state is a
 *      wedge);
 *   P6 nothing live is reaped: recovery acts only on a tag whose process is
 *      dead (killed, or closed for leases), asserted at each reaping step;
 *   P7 block accounting balances: a block is never freed while a slot, an
 *      entry or a view still refers to it, and at the end every block is
 *      free again (nothing leaked).
 *
 * Bounds (see model/README.md for the commands and the larger bound):
 * NSLOT slots, NBLK blocks, NMSG messages, one in-flight entry, at most
 * MAXKILL deaths. Constants shared with the C headers are checked against
 * csrc/fmq_layout.h by tests/test_model.py.
 */

#ifndef NSLOT
#define NSLOT 2
#endif
#ifndef NBLK
#define NBLK 3
#endif
#ifndef NMSG
#define NMSG 2
#endif
#ifndef MAXKILL
#define MAXKILL 1
#endif
#ifndef MAXDELIV
#define MAXDELIV 2          /* max_deliveries: a 2nd failure dead-letters */
#endif

/* slot phases: must equal FMQ_PH_* in csrc/fmq_layout.h */
#define PH_EMPTY   0
#define PH_WRITING 1
#define PH_READY   2
#define PH_READING 3

/* in-flight entry states: must equal FMQ_LS_* in csrc/fmq_layout.h */
#define LS_FREE      0
#define LS_FILLING   1
#define LS_LEASED    2
#define LS_REQUEUING 3
#define LS_DEAD      4
#define LS_TAKING    5
#define LS_ACKING    6

/* pin states: must equal FMQ_PIN_* in csrc/fmq_layout.h */
#define PIN_NONE   0
#define PIN_PINNED 1
#define PIN_HANDED 2

#define NOBLK 255
#define NONE  0             /* owner tag 0: nobody */

/* participants; tag = index + 1 */
#define PROD 0
#define GETTER 1
#define LEASER 2
#define SVC 3
#define NPROC 4
#define TAG(p) ((p) + 1)

/* ---- shared memory ------------------------------------------------------ */
byte head = 0, tail = 0;            /* ticket hints (ctl->head, ctl->tail)  */
byte st[NSLOT];                     /* slot word: stamp = 4*lap + phase     */
byte sown[NSLOT];                   /* slot word: owner tag                 */
byte sblk[NSLOT];                   /* slot block reference                 */
byte smsg[NSLOT];                   /* slot len: here the message id        */
byte sdel[NSLOT];                   /* slot deliveries                      */
bool sbatch[NSLOT];                 /* slot flags: FMQ_SLOT_BATCH           */
byte scur[NSLOT];                   /* slot cursor: a batch's next message  */

byte bw[NBLK];                      /* block word: writer tag               */
byte br[NBLK];                      /* block word: reader tag               */
bool bring[NBLK];                   /* block word: IN_RING                  */
bool onfree[NBLK];                  /* on the free stack                    */
byte pay1[NBLK], pay2[NBLK];        /* payload, written in two halves       */

byte est = LS_FREE;                 /* the entry word: state                */
byte eown = NONE;                   /*                 owner tag            */
byte etok = 0;                      /*                 token                */
bool edue = 0;                      /* deadline passed                      */
byte edl = 0;                       /* token of the lease the deadline is for */
byte eblk = NOBLK, emsg = 0, edel = 0, esrc = 0;
byte eidx = 0;                      /* src_index: 1 + index in a batch; 0    */
byte takenidx = 0;                  /* the reaper's record of it (fmq_taken) */
byte eholder = NONE;                /* whose reader share the block holds   */
byte epin = PIN_NONE, epintok = 0;

/* ---- the world outside shared memory ------------------------------------ */
bool alive[NPROC];                  /* its kernel lock is held              */
bool killed[NPROC];
bool closed[NPROC];                 /* closed its handle (a clean exit)     */
bool reaped[NPROC];
byte kills = 0;
bool prod_done = 0;

/* ---- what the application saw (ghost state) -------------------------------- */
bool committed[NMSG + 1];
bool wasleased[NMSG + 1];
byte handed[NMSG + 1];              /* auto-ack hand-overs                  */
byte acked[NMSG + 1];
byte deadlettered[NMSG + 1];
byte unsettled = 0;                 /* committed, not yet handed/acked/dead */
#define SETTLE(id) if :: handed[id] + acked[id] + deadlettered[id] == 0 -> unsettled-- \
                      :: else -> skip fi
byte view_blk = NOBLK;              /* the leaser's zero-copy view          */
byte view_msg = 0;
byte pinned_blk = NOBLK;            /* the block the leaser's pin names     */
bool edropping = 0;                 /* the entry is letting its share go    */
bool edropped = 0;                  /* ... and its queue share is gone       */
byte leak_ok = 0;                   /* blocks of the documented leak windows */
byte stale_keep = 0;                /* ... kept for a stale entry name       */

/* ======================================================================== */
/* blocks [fmq_pool.c]                                                       */
/* ======================================================================== */

/* P7: nothing may still refer to a block that goes back on the free stack. */
#define REFERS(b) ((sblk[0] == b && (st[0] & 3) == PH_READY) || \
                   (sblk[1] == b && (st[1] & 3) == PH_READY) || \
                   (eblk == b && est != LS_FREE && est != LS_FILLING && !edropping) || \
                   view_blk == b)

inline free_if_zero(b) {
    if
    :: (bw[b] == NONE && br[b] == NONE && !bring[b]) ->
        assert(!REFERS(b));                          /* P7 */
        onfree[b] = 1
    :: else -> skip
    fi
}

/* model: pool.alloc -- pop + writer tag (see the header: one instant) */
inline pool_alloc(me, b) {
    d_step {
        b = NOBLK;
        if
        :: onfree[0] -> b = 0
        :: onfree[1] -> b = 1
        :: onfree[2] -> b = 2
        :: else -> skip
        fi;
        if
        :: b != NOBLK ->
            assert(bw[b] == NONE && br[b] == NONE && !bring[b]);
            onfree[b] = 0; bw[b] = TAG(me)
        :: else -> skip
        fi
    }
}

/* model: pool.release_writer */
/* model: pool.release_reader */
inline release_writer(me, b) {
    d_step { if :: bw[b] == TAG(me) -> bw[b] = NONE; free_if_zero(b) :: else -> skip fi }
}
inline release_reader(me, b) {
    d_step { if :: br[b] == TAG(me) -> br[b] = NONE; free_if_zero(b) :: else -> skip fi }
}

/* ======================================================================== */
/* the ring [fmq_ring.c]                                                      */
/* ======================================================================== */

#define LAP4(t) (((t) / NSLOT) * 4)
#define SL(t) ((t) % NSLOT)

/* model: ring.reserve -- claim the first EMPTY slot of its lap; ok = 0: full */
inline ring_reserve(me, t, ok) {
    t = tail;
    ok = 2;
    do
    :: ok == 2 ->
        d_step {
            if
            :: st[SL(t)] == LAP4(t) + PH_EMPTY ->
                st[SL(t)] = LAP4(t) + PH_WRITING; sown[SL(t)] = TAG(me);
                if :: tail < t + 1 -> tail = t + 1 :: else -> skip fi;
                ok = 1
            :: st[SL(t)] < LAP4(t) -> ok = 0          /* previous lap: full */
            :: else -> t++                            /* claimed: next one  */
            fi
        }
    :: ok != 2 -> break
    od
}

/* model: ring.commit -- the ring's share of the block, then publish [R-commit];
 * keep: the writer keeps its share (a reserve() view alive past commit). */
inline ring_commit(me, t, b, id, del, keep) {
    d_step { sblk[SL(t)] = b; smsg[SL(t)] = id; sdel[SL(t)] = del; sbatch[SL(t)] = 0 };
    if
    :: b != NOBLK -> d_step { bring[b] = 1 }          /* commit.before_publish */
    :: else -> skip
    fi;
    d_step {
        assert(st[SL(t)] == LAP4(t) + PH_WRITING && sown[SL(t)] == TAG(me));
        st[SL(t)] = LAP4(t) + PH_READY; sown[SL(t)] = NONE;
        if :: !committed[id] -> committed[id] = 1; unsettled++ :: else -> skip fi
    };
    if
    :: b != NOBLK && !keep -> release_writer(me, b)
    :: else -> skip
    fi
}

#ifdef BATCH
/* An atomic batch of messages 1 and 2: ONE record (its block holds both, one
 * per payload half), published by the same commit CAS as any message: both
 * become committed in that one step. */
inline ring_commit_batch(me, t, b) {
    d_step { sblk[SL(t)] = b; smsg[SL(t)] = 1; sdel[SL(t)] = 0; sbatch[SL(t)] = 1;
             scur[SL(t)] = 0 };
    d_step { bring[b] = 1 };                          /* ring.batch.before_publish */
    d_step {
        assert(st[SL(t)] == LAP4(t) + PH_WRITING && sown[SL(t)] == TAG(me));
        st[SL(t)] = LAP4(t) + PH_READY; sown[SL(t)] = NONE;
        committed[1] = 1; committed[2] = 1; unsettled = unsettled + 2
    };
    release_writer(me, b)
}
#endif

/* model: ring.batch_advance -- the holder of a batch stores the cursor past
 * the message it took (with `handover`: the auto-ack hand-over of message id),
 * then gives the slot back READY [R-rel], as an unclaim does. */
inline ring_batch_advance(me, t, id, handover) {
#ifdef BUG_BATCH_UNCLAIM_FIRST
    d_step { st[SL(t)] = LAP4(t) + PH_READY; sown[SL(t)] = NONE };
#endif
    d_step {
#ifndef BUG_BATCH_UNCLAIM_FIRST
        assert(st[SL(t)] == LAP4(t) + PH_READING && sown[SL(t)] == TAG(me));
#endif
        scur[SL(t)] = scur[SL(t)] + 1;
        if
        :: handover ->
            assert(wasleased[id] || handed[id] + acked[id] == 0);   /* P3 */
            SETTLE(id);
            handed[id]++
        :: else -> skip
        fi
    };
#ifndef BUG_BATCH_UNCLAIM_FIRST
    d_step {                                          /* ring.batch.advanced */
        assert(st[SL(t)] == LAP4(t) + PH_READING && sown[SL(t)] == TAG(me));
        st[SL(t)] = LAP4(t) + PH_READY; sown[SL(t)] = NONE
    }
#endif
}

/* model: ring.claim -- the first READY slot of its lap; ok = 0: empty */
inline ring_claim(me, t, ok) {
    t = head;
    ok = 2;
    do
    :: ok == 2 ->
        d_step {
            if
            :: st[SL(t)] == LAP4(t) + PH_READY ->
                st[SL(t)] = LAP4(t) + PH_READING; sown[SL(t)] = TAG(me); ok = 1
            :: st[SL(t)] < LAP4(t) + PH_READY -> ok = 0   /* empty or writing */
            :: else ->
                if
                :: st[SL(t)] >= LAP4(t) + 4 && head == t -> head = t + 1
                :: else -> skip
                fi;
                t++
            fi
        }
    :: ok != 2 -> break
    od
}

/* model: ring.retire -- READING(me) -> EMPTY(next lap) [R-rel]; the head hint
 * moves over consumed slots only (never past a READING one). */
inline ring_retire(me, t) {
    d_step {
        assert(st[SL(t)] == LAP4(t) + PH_READING && sown[SL(t)] == TAG(me));
        st[SL(t)] = LAP4(t) + 4; sown[SL(t)] = NONE;
        do
        :: head < t + 1 && st[SL(head)] >= LAP4(head) + 4 -> head++
        :: else -> break
        od
    }
}

/* ======================================================================== */
/* get(): claim, copy, block share ring -> reader, retire (hand-over), drop    */
/* ======================================================================== */

inline auto_ack_get(me, t, ok, b, id, x1, x2) {
    ring_claim(me, t, ok);
    if
    :: ok == 1 && sbatch[SL(t)] ->
        /* a batch: the message at the cursor (x2 = its index) */
        d_step { b = sblk[SL(t)]; x2 = scur[SL(t)]; id = smsg[SL(t)] + x2 };
        d_step { if :: x2 == 0 -> x1 = pay1[b] :: else -> x1 = pay2[b] fi;
                 assert(x1 == id) };                  /* P2 */
        if
        :: x2 == 0 -> ring_batch_advance(me, t, id, 1)
        :: else ->                                    /* the last: as a plain one */
            d_step {
                assert(bring[b] && br[b] == NONE);
                bring[b] = 0; br[b] = TAG(me)
            };
            d_step {
                assert(st[SL(t)] == LAP4(t) + PH_READING && sown[SL(t)] == TAG(me));
                st[SL(t)] = LAP4(t) + 4; sown[SL(t)] = NONE;
                do
                :: head < t + 1 && st[SL(head)] >= LAP4(head) + 4 -> head++
                :: else -> break
                od;
                assert(wasleased[id] || handed[id] + acked[id] == 0);   /* P3 */
                SETTLE(id);
                handed[id]++
            };
            release_reader(me, b)
        fi
    :: ok == 1 && !sbatch[SL(t)] ->
        d_step { b = sblk[SL(t)]; id = smsg[SL(t)] };
        d_step { x1 = pay1[b] };                      /* the copy: two loads */
        d_step { x2 = pay2[b]; assert(x1 == id && x2 == id) };   /* P2 */
        d_step {                                      /* model: ring.free_slot */
            assert(bring[b] && br[b] == NONE);
            bring[b] = 0; br[b] = TAG(me)
        };
        d_step {                                      /* the hand-over [R-rel] */
            assert(st[SL(t)] == LAP4(t) + PH_READING && sown[SL(t)] == TAG(me));
            st[SL(t)] = LAP4(t) + 4; sown[SL(t)] = NONE;
            do
            :: head < t + 1 && st[SL(head)] >= LAP4(head) + 4 -> head++
            :: else -> break
            od;
            assert(wasleased[id] || handed[id] + acked[id] == 0);   /* P3 */
            SETTLE(id);
            handed[id]++
        };
        release_reader(me, b)
    :: else -> skip
    fi
}

/* ======================================================================== */
/* the in-flight table [fmq_lease.c]                                          */
/* ======================================================================== */

/* model: lease.hand_pin -- PINNED -> HANDED; ok = 1 if the share is the holder's */
inline hand_pin(tok, ok, dropping) {
    d_step {
        if
        :: epin == PIN_PINNED && epintok == tok -> epin = PIN_HANDED; ok = 1;
           if :: dropping -> edropped = 1 :: else -> skip fi   /* the share is the views' now */
        :: else -> ok = (epin == PIN_HANDED && epintok == tok)
        fi
    }
}

/* model: lease.share_to_ring -- the queue's IN_RING share first, then the
 * holder's reader share goes (or is handed over to its views). */
inline share_to_ring(tok, h, ok) {
    h = eholder;
    if
    :: h != NONE && eblk != NOBLK ->
        d_step { if :: br[eblk] == h && !bring[eblk] -> bring[eblk] = 1 :: else -> skip fi };
        hand_pin(tok, ok, 0);                         /* lease.share.co_owned */
        if
        :: !ok -> d_step {
                if :: br[eblk] == h && bring[eblk] -> br[eblk] = NONE :: else -> skip fi }
        :: else -> skip
        fi
    :: else -> skip
    fi;
    d_step { eholder = NONE }
}

/* model: lease.drop_share -- the entry's block share goes (the message is done) */
inline drop_share(tok, h, ok) {
    d_step { edropping = 1 };
    if
    :: eblk != NOBLK ->
        h = eholder;
        if
        :: h != NONE ->
            hand_pin(tok, ok, 1);
            if
            :: !ok -> d_step { if :: br[eblk] == h -> br[eblk] = NONE; edropped = 1;
                                                       free_if_zero(eblk)
                               :: else -> skip fi }
            :: else -> skip
            fi;
            d_step { eholder = NONE }
        :: else ->
            d_step { if :: bring[eblk] -> bring[eblk] = 0; edropped = 1; free_if_zero(eblk)
                     :: else -> skip fi }
        fi
    :: else -> skip
    fi
}

/* model: lease.take_batch -- the message at a batch's cursor, leased with a
 * copy of its own (a new block), then the cursor moved past it (or, for the
 * last, the batch's slot and block freed). */
inline lease_take_batch(me, t, ok, tok, id, nb, c) {
    pool_alloc(me, nb);
    d_step {
        if
        :: nb != NOBLK && est == LS_FREE ->
            etok++; tok = etok; est = LS_FILLING; eown = TAG(me); ok = 1
        :: else -> ok = 0
        fi
    };
    if
    :: ok == 1 ->
        d_step { eholder = NONE; epin = PIN_NONE; epintok = tok; edropping = 0; edropped = 0 };
        d_step { esrc = t; c = scur[SL(t)]; eidx = c + 1; emsg = smsg[SL(t)] + c;
                 edel = sdel[SL(t)] + 1; id = emsg; eblk = nb };
        d_step { if :: c == 0 -> pay1[nb] = pay1[sblk[SL(t)]]
                    :: else -> pay1[nb] = pay2[sblk[SL(t)]] fi };
        d_step { pay2[nb] = pay1[nb] };
        d_step { assert(bw[nb] == TAG(me)); bw[nb] = NONE; br[nb] = TAG(me) };
        d_step { eholder = TAG(me); edue = 0; edl = tok };   /* lease.batch.filled */
        d_step { est = LS_LEASED; wasleased[id] = 1 };       /* lease.batch.leased */
        if
        :: c == 0 -> ring_batch_advance(me, t, id, 0)
        :: else ->
            d_step { c = sblk[SL(t)] };                  /* the batch's block */
            d_step { assert(bring[c] && br[c] == NONE); bring[c] = 0; br[c] = TAG(me) };
            ring_retire(me, t);
            release_reader(me, c)
        fi
    :: else ->
        if :: nb != NOBLK -> release_writer(me, nb) :: else -> skip fi;
        d_step {                                      /* give the batch back */
            assert(st[SL(t)] == LAP4(t) + PH_READING && sown[SL(t)] == TAG(me));
            st[SL(t)] = LAP4(t) + PH_READY; sown[SL(t)] = NONE
        }
    fi
}

/* model: lease.take -- claim a slot, move its message into the entry, free the slot */
inline lease_take(me, t, ok, tok, id, nb, c) {
    ring_claim(me, t, ok);
    if
    :: ok == 1 && sbatch[SL(t)] -> lease_take_batch(me, t, ok, tok, id, nb, c)
    :: ok == 1 && !sbatch[SL(t)] ->
        d_step {
            if
            :: est == LS_FREE -> etok++; tok = etok; est = LS_FILLING; eown = TAG(me); ok = 1
            :: else -> ok = 0
            fi
        };
        if
        :: ok == 1 ->
            d_step { eholder = NONE; epin = PIN_NONE; epintok = tok; edropping = 0; edropped = 0 };
            d_step { esrc = t; eidx = 0; eblk = sblk[SL(t)]; emsg = smsg[SL(t)];
                     edel = sdel[SL(t)] + 1; id = emsg };
            d_step {
                assert(bring[eblk] && br[eblk] == NONE);
                bring[eblk] = 0; br[eblk] = TAG(me)
            };
            d_step { eholder = TAG(me); edue = 0; edl = tok };   /* lease.take.filled */
            d_step {
                est = LS_LEASED;                      /* lease.take.leased */
                wasleased[id] = 1
            };
            ring_retire(me, t)
        :: else ->
            d_step {                                  /* table full: give it back */
                assert(st[SL(t)] == LAP4(t) + PH_READING && sown[SL(t)] == TAG(me));
                st[SL(t)] = LAP4(t) + PH_READY; sown[SL(t)] = NONE
            }
        fi
    :: else -> skip
    fi
}

/* model: lease.ack -- deadline check, LEASED(me) -> ACKING(me), drop, FREE */
inline lease_ack(me, tok, id, ok, h) {
    d_step {
        if
        :: est == LS_LEASED && eown == TAG(me) && etok == tok && !edue ->
            est = LS_ACKING; ok = 1;
            SETTLE(id); acked[id]++                  /* this CAS is the settlement */
        :: else -> ok = 0                             /* LeaseLost */
        fi
    };
    if
    :: ok ->
        drop_share(tok, h, ok);
        d_step { est = LS_FREE; eown = NONE }
    :: else -> skip
    fi
}

/* model: lease.touch -- a CAS on the deadline from the value read, so a stale
 * touch never moves the deadline of a later lease of the same entry. */
inline lease_touch(me, tok, ok) {
    d_step { ok = (est == LS_LEASED && eown == TAG(me) && etok == tok && !edue && edl == tok) };
    if
    :: ok -> d_step {
            if
            :: edl == tok && !edue ->                 /* the deadline CAS */
                assert(est == LS_LEASED && etok == tok);   /* P4 */
                edue = 0
            :: else -> ok = 0
            fi }
    :: else -> skip
    fi
}

/* model: lease.requeue -- the entry is REQUEUING(me): copy its message to a
 * new slot with its own block (or park it, or dead-letter it), then free it. */
inline lease_requeue(me, tok, force_dead, h, ok, nb, t) {
    share_to_ring(tok, h, ok);
    if
    :: force_dead || edel >= MAXDELIV ->
        d_step { est = LS_DEAD; eown = NONE }         /* parked for the DLQ */
    :: else ->
        pool_alloc(me, nb);
        if
        :: nb != NOBLK ->
            d_step { pay1[nb] = pay1[eblk] };
            d_step { pay2[nb] = pay2[eblk] };
            ring_reserve(me, t, ok);
            if
            :: ok == 1 ->
                ring_commit(me, t, nb, emsg, edel, 0);   /* lease.requeue.before_commit */
                /* lease.requeue.committed: the copy is out; the entry says so
                 * before its share goes, so recovery never acts on a share
                 * that may already be gone (and its block reused). */
#ifndef BUG_DROP_BEFORE_ACKING
                d_step { est = LS_ACKING };
#endif
                drop_share(tok, h, ok);
                d_step { est = LS_FREE; eown = NONE }
            :: else ->
                release_writer(me, nb);
                d_step { edue = 1; est = LS_LEASED; eown = NONE }   /* parked */
            fi
        :: else ->
            d_step { edue = 1; est = LS_LEASED; eown = NONE }       /* parked */
        fi
    fi
}

/* model: lease.pin -- PINNED only while the holder holds the reader share */
inline lease_pin(me, tok, ok, undone) {
    d_step {
        ok = (est == LS_LEASED && eown == TAG(me) && etok == tok && eholder == TAG(me));
        if
        :: ok && epin == PIN_NONE && epintok == tok -> epin = PIN_PINNED
        :: else -> ok = 0
        fi
    };
    if
    :: ok ->
        d_step {
            if
            :: est == LS_LEASED && etok == tok -> view_blk = eblk; view_msg = emsg
            :: else -> ok = 0
            fi
        };
        if :: !ok -> lease_unpin(me, tok, undone) :: else -> skip fi
    :: else -> skip
    fi
}

/* model: lease.unpin -- the last view went: PINNED -> NONE, or drop a handed share */
inline lease_unpin(me, tok, undone) {
    d_step {
        view_blk = NOBLK;
        if
        :: epin == PIN_PINNED && epintok == tok -> epin = PIN_NONE; undone = 1
        :: else -> undone = 0
        fi
    };
    if
    :: !undone -> release_reader(me, pinned_blk)
    :: else -> skip
    fi
}

/* ======================================================================== */
/* crash recovery [fmq_recover.c]                                              */
/* ======================================================================== */

/* model: recover.lease_reap -- the dead tag's entry (before the slot pass) */
inline reap_entry(T, taken, h, ok) {
    taken = 255;
    if
    :: eown == T && est != LS_FREE ->
        assert(!alive[T - 1]);                        /* P6 */
        if
#ifndef BUG_BATCH_FILLING_SHARE
        :: est == LS_FILLING && eidx == 0 ->
#else
        :: est == LS_FILLING ->
#endif
            share_to_ring(etok, h, ok);
            d_step { est = LS_FREE; eown = NONE }
#ifndef BUG_BATCH_FILLING_SHARE
        :: est == LS_FILLING && eidx != 0 ->
            /* a batch message's copy block: no slot names it, so its reader
             * share is not turned into a ring share; the block pass drops it */
            d_step { eholder = NONE; est = LS_FREE; eown = NONE }
#endif
        :: est == LS_ACKING ->
            /* An unfinished ack: a reader share is cleared by the block pass;
             * a queue (IN_RING) share not yet dropped cannot be told from a
             * reused block's and is left: one block leaks (the window between
             * the ACKING store and the drop; see fmq_lease.c). */
            d_step {
                if :: eholder == NONE && eblk != NOBLK && !edropped -> leak_ok = leak_ok | (1 << eblk)
                   :: else -> skip fi;
                est = LS_FREE; eown = NONE
            }
        :: est == LS_LEASED || est == LS_REQUEUING ->
            if :: est == LS_LEASED -> taken = esrc; takenidx = eidx :: else -> skip fi;
            share_to_ring(etok, h, ok);
            d_step { edue = 1; est = LS_LEASED; eown = NONE }   /* orphaned, due */
        :: est == LS_TAKING ->
            d_step { est = LS_DEAD; eown = NONE }
        :: else -> skip
        fi
    :: else -> skip
    fi
}

/* the READING slot i holds the message the dead tag moved into its entry */
#define MOVED(taken, i) (taken != 255 && SL(taken) == i && LAP4(taken) == st[i] - PH_READING && \
                        ((!sbatch[i] && takenidx == 0) || (sbatch[i] && takenidx == scur[i] + 1)))

/* model: recover.slot_pass */
/* model: recover.block_pass */
inline reap_tag(T, i, taken, h, ok, pub) {
    reap_entry(T, taken, h, ok);
    pub = 0;                                           /* bitmap of published blocks */
    for (i : 0 .. NSLOT - 1) {
        d_step {
            if
            :: (st[i] & 3) >= PH_READY && sblk[i] != NOBLK -> pub = pub | (1 << sblk[i])
            :: else -> skip
            fi
        };
        if
        :: sown[i] == T && (st[i] & 3) == PH_WRITING ->
            assert(!alive[T - 1]);                    /* P6 */
            d_step { st[i] = st[i] - PH_WRITING + 4; sown[i] = NONE }   /* abandoned */
        :: sown[i] == T && (st[i] & 3) == PH_READING && MOVED(taken, i) && !sbatch[i] ->
            d_step { st[i] = st[i] - PH_READING + 4; sown[i] = NONE }   /* moved */
        /* model: recover.batch_taken -- the dead taker's cursor move, finished */
        :: sown[i] == T && (st[i] & 3) == PH_READING && MOVED(taken, i) && sbatch[i] ->
            if
            :: scur[i] == 0 ->
                d_step { scur[i] = 1 };               /* recover.batch.advanced */
                d_step { st[i] = st[i] - PH_READING + PH_READY; sown[i] = NONE }
            :: else ->
                d_step { if :: bring[sblk[i]] && br[sblk[i]] == NONE ->
                                 bring[sblk[i]] = 0; free_if_zero(sblk[i])
                              :: else -> skip fi };
                d_step { st[i] = st[i] - PH_READING + 4; sown[i] = NONE }
            fi
        :: sown[i] == T && (st[i] & 3) == PH_READING && !MOVED(taken, i) ->
            assert(!alive[T - 1]);                    /* P6 */
            d_step { if :: sblk[i] != NOBLK && br[sblk[i]] == T && !bring[sblk[i]] ->
                             br[sblk[i]] = NONE; bring[sblk[i]] = 1
                          :: else -> skip fi };
            d_step { st[i] = st[i] - PH_READING + PH_READY; sown[i] = NONE }   /* put back */
        :: else -> skip
        fi
    };
    skip;
    /* An in-flight entry's block counts as published too, whoever holds its
     * share: parked, orphaned, dead, co-owned while it is requeued, or acked
     * with the share not yet dropped (a writer that kept its share past
     * commit may have died meanwhile: its IN_RING bit is the entry's, not an
     * unfinished commit's). An entry lets its share go only from ACKING, so
     * the one stale name is an ACKING entry whose block was dropped, freed
     * and reused by a producer that then died inside commit: that block's
     * IN_RING bit is kept and the block leaks (stale_keep; the end assert). */
    d_step {
        if
#ifndef BUG_SLOTS_ONLY_PUBLISH
        :: est != LS_FREE && est != LS_FILLING && eblk != NOBLK ->
#else
        :: false ->
#endif
            assert(!edropping || est == LS_ACKING);
            pub = pub | (1 << eblk);
            if :: edropped -> stale_keep = stale_keep | (1 << eblk) :: else -> skip fi
        :: else -> skip
        fi
    };
    for (i : 0 .. NBLK - 1) {
        d_step {
            if
            :: bw[i] == T || br[i] == T ->
                if
                :: bw[i] == T ->
                    bw[i] = NONE;
                    if :: bring[i] && !(pub & (1 << i)) -> bring[i] = 0 :: else -> skip fi
                :: else -> skip
                fi;
                if :: br[i] == T -> br[i] = NONE :: else -> skip fi;
                if :: !onfree[i] -> free_if_zero(i) :: else -> skip fi
            :: else -> skip
            fi
        }
    }
}

/* ======================================================================== */
/* processes                                                                   */
/* ======================================================================== */

#define ANY_READY (st[0] & 3) == PH_READY || (st[1] & 3) == PH_READY
#define ANY_EMPTY (st[0] & 3) == PH_EMPTY || (st[1] & 3) == PH_EMPTY
#define ANY_FREE_BLOCK (onfree[0] || onfree[1] || onfree[2])
#define SETTLED (prod_done && unsettled == 0)

proctype Producer() {
    byte id = 1, b, t, ok;
    bool keep;
    {
#ifdef BATCH
        do
        :: id == 1 ->
            pool_alloc(PROD, b);
            if
            :: b == NOBLK -> (ANY_FREE_BLOCK)
            :: else ->
                d_step { pay1[b] = 1 };               /* the framing: message 1 */
                d_step { pay2[b] = 2 };               /* ... and message 2 */
                ring_reserve(PROD, t, ok);
                do
                :: ok == 0 -> (ANY_EMPTY); ring_reserve(PROD, t, ok)
                :: ok == 1 -> break
                od;
                ring_commit_batch(PROD, t, b);
                id = NMSG + 1
            fi
        :: id > NMSG -> break
        od;
#else
        do
        :: id <= NMSG ->
            pool_alloc(PROD, b);
            if
            :: b == NOBLK -> (ANY_FREE_BLOCK)        /* the pool wait */
            :: else ->
                d_step { pay1[b] = id };
                d_step { pay2[b] = id };
                ring_reserve(PROD, t, ok);
                do
                :: ok == 0 -> (ANY_EMPTY); ring_reserve(PROD, t, ok)
                :: ok == 1 -> break
                od;
                if :: keep = 0 :: keep = 1 fi;       /* a reserve() view outlives commit */
                ring_commit(PROD, t, b, id, 0, keep);
                if :: keep -> release_writer(PROD, b) :: else -> skip fi;
                id++
            fi
        :: id > NMSG -> break
        od;
#endif
        skip;
        d_step { prod_done = 1; closed[PROD] = 1; alive[PROD] = 0 }
    } unless { killed[PROD] };
    d_step { prod_done = 1 }
}

proctype Getter() {
    byte t, ok, b, id, x1, x2;
    {
        do
        :: ANY_READY -> auto_ack_get(GETTER, t, ok, b, id, x1, x2)
        :: SETTLED -> break
        od;
        skip;
        d_step { closed[GETTER] = 1; alive[GETTER] = 0 }
    } unless { killed[GETTER] }
}

proctype Leaser() {
    byte t, ok, tok, id, h;
    byte x1, nb, c;
    {
        do
        :: ANY_READY && est == LS_FREE ->
            lease_take(LEASER, t, ok, tok, id, nb, c);
            if :: ok == 1 -> break :: else -> skip fi
        :: SETTLED -> goto closing
        od;
        /* what a consumer does with its lease */
        if
        :: lease_ack(LEASER, tok, id, ok, h)
        :: lease_touch(LEASER, tok, ok); lease_ack(LEASER, tok, id, ok, h)
        /* model: lease.nack */
        :: d_step { ok = (est == LS_LEASED && eown == TAG(LEASER) && etok == tok && !edue);
                    if :: ok -> est = LS_REQUEUING :: else -> skip fi };
           if :: ok -> lease_requeue(LEASER, tok, 0, h, ok, x1, t) :: else -> skip fi   /* nack */
        :: d_step { pinned_blk = eblk };
           lease_pin(LEASER, tok, ok, x1);
           if
           :: ok ->
               lease_ack(LEASER, tok, id, ok, h);
               d_step { assert(pay1[pinned_blk] == view_msg && pay2[pinned_blk] == view_msg) };
               lease_unpin(LEASER, tok, x1);
               d_step { pinned_blk = NOBLK }
           :: else -> d_step { pinned_blk = NOBLK }
           fi
        :: skip                                       /* close with the lease held */
        fi;
closing: skip;
        d_step { closed[LEASER] = 1; alive[LEASER] = 0 }
    } unless { killed[LEASER] }
}

/* Every other live participant: the clock, redelivery of due leases, crash
 * recovery of dead tags, dead-letter forwarding, and draining what a dead
 * consumer left. It is never killed (some participant survives each run). */
proctype Service() {
    byte t, ok, b, id, x1, x2, h, i, taken, pub, tok, nb, T;
    do
    :: d_step { est == LS_LEASED && eown != NONE && !edue -> edue = 1 }   /* clock */
    /* model: recover.reap -- a dead participant, its lock taken by the reaper */
    :: atomic { (killed[PROD] && !reaped[PROD]) -> T = TAG(PROD); reaped[PROD] = 1 };
       reap_tag(T, i, taken, h, ok, pub)
    :: atomic { (killed[GETTER] && !reaped[GETTER]) -> T = TAG(GETTER); reaped[GETTER] = 1 };
       reap_tag(T, i, taken, h, ok, pub)
    :: atomic { (killed[LEASER] && !reaped[LEASER]) -> T = TAG(LEASER); reaped[LEASER] = 1 };
       reap_tag(T, i, taken, h, ok, pub)
    /* model: lease.redeliver_due -- a due lease, or a closed holder's; a
     * crashed holder's waits for recovery (it may not have freed its slot).
     * After taking the entry, the redeliverer looks at the slot the message
     * came from: while it is still READING by the holder for that lap, the
     * take has not finished (the holder may be frozen between the LEASED
     * store and freeing the slot), and requeueing now would let recovery put
     * the slot's copy back after the holder's death: a duplicate naming a
     * freed block. It gives the entry back and tries again later. */
    :: d_step {
           est == LS_LEASED && (edue || (eown != NONE && closed[eown - 1])) &&
           !(eown != NONE && killed[eown - 1] && !reaped[eown - 1]) ->
           assert(eown == NONE || !alive[eown - 1] || edue);   /* P6: never a live holder early */
           x1 = eown; est = LS_REQUEUING; eown = TAG(SVC); tok = etok
       };
#ifndef BUG_REQUEUE_MIDTAKE
       if
       :: d_step { x1 != NONE && st[SL(esrc)] == LAP4(esrc) + PH_READING &&
                   sown[SL(esrc)] == x1 -> est = LS_LEASED; eown = x1 }   /* give back */
       :: else ->
#endif
          lease_requeue(SVC, tok, 0, h, ok, nb, t)
#ifndef BUG_REQUEUE_MIDTAKE
       fi
#endif
    /* model: lease.take_dead */
    :: d_step { est == LS_DEAD -> est = LS_TAKING; eown = TAG(SVC); tok = etok; id = emsg };
       if
       /* model: lease.ack_dead */
       :: d_step { SETTLE(id); deadlettered[id]++; est = LS_ACKING };  /* forwarded */
          drop_share(tok, h, ok);
          d_step { est = LS_FREE; eown = NONE }
       :: d_step { est = LS_DEAD; eown = NONE }       /* closed before forwarding: back */
       fi
    :: (killed[GETTER] || closed[GETTER]) && (killed[LEASER] || closed[LEASER]) && ANY_READY ->
       auto_ack_get(SVC, t, ok, b, id, x1, x2)
    :: SETTLED && est == LS_FREE && !(ANY_READY) && (killed[GETTER] || closed[GETTER]) &&
       (killed[LEASER] || closed[LEASER]) &&
       (!killed[PROD] || reaped[PROD]) && (!killed[GETTER] || reaped[GETTER]) &&
       (!killed[LEASER] || reaped[LEASER]) -> break
    od;
    /* P1, P7 at the end */
    for (i : 1 .. NMSG) {
        assert(!committed[i] || handed[i] + acked[i] + deadlettered[i] >= 1)
    }
    for (i : 0 .. NBLK - 1) {
        assert((onfree[i] && bw[i] == NONE && br[i] == NONE && !bring[i]) ||
               (((leak_ok | stale_keep) & (1 << i)) && bring[i] && bw[i] == NONE &&
                br[i] == NONE))
    }
}

proctype Killer() {
    byte p;
    if
    :: kills < MAXKILL ->
        if
        :: p = PROD
        :: p = GETTER
        :: p = LEASER
        fi;
end_kill:
        atomic { !closed[p] && !killed[p] && !(p == PROD && prod_done) ->
                 killed[p] = 1; alive[p] = 0; kills++;
                 if :: p == LEASER -> view_blk = NOBLK :: else -> skip fi }   /* its views die */
    :: skip
    fi
}

init {
    byte i;
    d_step {
        for (i : 0 .. NBLK - 1) { onfree[i] = 1; sblk[i % NSLOT] = NOBLK }
        for (i : 0 .. NPROC - 1) { alive[i] = 1 }
    };
    atomic {
        run Producer(); run Getter(); run Leaser(); run Service(); run Killer()
    }
}
