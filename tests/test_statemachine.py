"""Single-process semantics against ``queue.Queue`` as the model (issue 2).

A small ``maxsize`` makes Full reachable; every rule compares the result (or the
exception type) of fastmq with the stdlib queue fed the same operations.
"""
from __future__ import annotations

import queue

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule, run_state_machine_as_test)

import fastmq

values = st.one_of(
    st.integers(), st.text(max_size=20), st.binary(max_size=64),
    st.lists(st.integers(), max_size=5), st.none(),
    st.tuples(st.integers(), st.text(max_size=5)),
)
raw = st.binary(max_size=300)


def make_machine(backend):
    class QueueMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.q = None
            self.model = None

        @initialize(maxsize=st.integers(min_value=1, max_value=5))
        def make(self, maxsize):
            self.q = fastmq.Queue(maxsize=maxsize, _backend=backend)
            self.model = queue.Queue(maxsize=maxsize)
            self.maxsize = maxsize

        def teardown(self):
            if self.q is not None:
                self.q.close()

        # --- put side ---------------------------------------------------
        def _put(self, fn, model_fn):
            full_model = self.model.full()
            if full_model:
                with pytest.raises(fastmq.Full):
                    fn()
                with pytest.raises(queue.Full):  # the model agrees
                    model_fn()
            else:
                fn()
                model_fn()

        @rule(v=values)
        def put_nowait(self, v):
            self._put(lambda: self.q.put_nowait(v), lambda: self.model.put_nowait(v))

        @rule(v=values)
        def put_noblock(self, v):
            self._put(lambda: self.q.put(v, block=False), lambda: self.model.put_nowait(v))

        @rule(v=values)
        def put_short_timeout(self, v):
            self._put(lambda: self.q.put(v, timeout=0.005), lambda: self.model.put_nowait(v))

        @rule(v=values)
        @precondition(lambda self: not self.model.full())
        def put_blocking(self, v):  # there is room, so it must not block
            self.q.put(v)
            self.model.put_nowait(v)

        @rule(b=raw)
        def put_bytes(self, b):
            self._put(lambda: self.q.put_bytes(b, block=False),
                      lambda: self.model.put_nowait(("raw", b)))

        @rule(vs=st.lists(values, max_size=7))
        def put_many_noblock(self, vs):
            n = self.q.put_many(vs, block=False)
            room = self.maxsize - self.model.qsize()
            assert n == min(room, len(vs))
            for v in vs[:n]:
                self.model.put_nowait(v)

        @rule(vs=st.lists(values, max_size=4))
        def put_many_timeout(self, vs):
            n = self.q.put_many(vs, timeout=0.005)
            room = self.maxsize - self.model.qsize()
            assert n == min(room, len(vs))
            for v in vs[:n]:
                self.model.put_nowait(v)

        # --- get side ---------------------------------------------------
        def _get(self, fn):
            if self.model.empty():
                with pytest.raises(fastmq.Empty):
                    fn()
                return
            expected = self.model.get_nowait()
            if isinstance(expected, tuple) and len(expected) == 2 and expected[0] == "raw":
                # a raw message: read it as bytes whatever getter the rule used
                got = self.q.get_bytes(block=False)
                assert got == expected[1]
                return
            got = fn()
            assert got == expected and type(got) is type(expected)

        def _front_is_raw(self):
            if self.model.empty():
                return False
            front = self.model.queue[0]
            return isinstance(front, tuple) and len(front) == 2 and front[0] == "raw"

        @rule()
        def get_nowait(self):
            self._get(self.q.get_nowait)

        @rule()
        def get_noblock(self):
            self._get(lambda: self.q.get(block=False))

        @rule()
        def get_short_timeout(self):
            self._get(lambda: self.q.get(timeout=0.005))

        @rule()
        @precondition(lambda self: not self.model.empty())
        def get_blocking(self):  # something is queued, so it must not block
            self._get(self.q.get)

        @rule(k=st.integers(min_value=1, max_value=7))
        @precondition(lambda self: not self._front_is_raw())
        def get_many_noblock(self, k):
            # raw and pickled messages are not mixed in one get_many
            if any(isinstance(v, tuple) and len(v) == 2 and v[0] == "raw"
                   for v in list(self.model.queue)[:k]):
                return
            if self.model.empty():
                with pytest.raises(fastmq.Empty):
                    self.q.get_many(k, block=False)
                return
            got = self.q.get_many(k, block=False)
            expected = [self.model.get_nowait() for _ in range(min(k, self.model.qsize()))]
            assert isinstance(got, list)
            assert got == expected

        # --- observers --------------------------------------------------
        @invariant()
        def sizes_agree(self):
            if self.q is None:
                return
            assert self.q.qsize() == self.model.qsize()
            assert self.q.empty() == self.model.empty()
            assert self.q.full() == self.model.full()
            assert self.q.stats()["depth"] == self.model.qsize()

    return QueueMachine


@pytest.mark.timeout(240)
def test_queue_matches_stdlib_model(backend):
    machine = make_machine(backend)
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None,
                          suppress_health_check=list(HealthCheck)))
