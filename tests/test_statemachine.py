"""Single-process semantics against ``queue.Queue`` as the model.

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


def make_pin_machine(backend):
    """Zero-copy pinning as a state machine: held recv views and zero-copy
    arrays must keep their bytes while the queue recycles slots and blocks."""
    import collections
    import gc

    np = pytest.importorskip("numpy")
    sizes = st.sampled_from([0, 1, 100, 2000, 30_000, 100_000, 128 * 1024])

    class PinMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.q = fastmq.Queue(maxsize=6, max_message_size=128 * 1024,
                                  capacity_bytes=1024 * 1024, _backend=backend)
            self.model = collections.deque()
            self.held = []  # (view-like, expected bytes)
            self.counter = 0

        def teardown(self):
            self.held.clear()
            gc.collect()
            self.q.close()

        def _payload(self, n):
            self.counter += 1
            return (self.counter.to_bytes(4, "little") * (n // 4 + 1))[:n]

        @rule(n=sizes)
        def put(self, n):
            data = self._payload(n)
            try:
                self.q.put_bytes(data, block=False)
            except fastmq.Full:
                # full is only acceptable when something occupies the queue
                assert self.model or self.held, "Full on an empty queue with nothing pinned"
                return
            self.model.append(data)

        @rule(n=sizes)
        def put_array(self, n):
            n = min(n, 120_000)  # room for the pickle framing
            arr = np.frombuffer(self._payload(n), dtype=np.uint8).copy()
            try:
                self.q.put(arr, block=False)
            except fastmq.Full:
                assert self.model or self.held, "Full on an empty queue with nothing pinned"
                return
            self.model.append(("array", arr.tobytes()))

        @rule()
        def get(self):
            if not self.model:
                with pytest.raises(fastmq.Empty):
                    self.q.get_bytes(block=False)
                return
            exp = self.model.popleft()
            if isinstance(exp, tuple):
                got = self.q.get(block=False)
                assert got.tobytes() == exp[1]
            else:
                assert self.q.get_bytes(block=False) == exp

        @rule(cut=st.integers(min_value=0, max_value=50))
        def recv_and_hold(self, cut):
            if not self.model:
                with pytest.raises(fastmq.Empty):
                    self.q.recv(timeout=0)
                return
            exp = self.model.popleft()
            if isinstance(exp, tuple):
                arr = self.q.get(block=False, zero_copy=True)
                assert arr.tobytes() == exp[1]
                self.held.append((arr[cut:], exp[1][cut:]))
                return
            with self.q.recv(timeout=0) as msg:
                assert bytes(msg.data) == exp
                self.held.append((msg.data[cut:], exp[cut:]))

        @rule(data=st.data())
        def drop_hold(self, data):
            if self.held:
                i = data.draw(st.integers(min_value=0, max_value=len(self.held) - 1))
                del self.held[i]
                gc.collect()

        @invariant()
        def held_views_never_change(self):
            for view, exp in self.held:
                got = view.tobytes() if hasattr(view, "tobytes") else bytes(view)
                assert got == exp, "a held zero-copy view changed"

        @invariant()
        def depth_matches(self):
            assert self.q.qsize() == len(self.model)

    return PinMachine


@pytest.mark.timeout(240)
def test_zero_copy_pins_state_machine(backend):
    run_state_machine_as_test(
        make_pin_machine(backend),
        settings=settings(max_examples=60, stateful_step_count=50, deadline=None,
                          suppress_health_check=list(HealthCheck)))
