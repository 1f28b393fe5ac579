"""CPython's own multiprocessing queue tests, run against ``fastmq.Queue``.

The queue cases of ``Lib/test/_test_multiprocessing.py`` (class
``_TestQueue``) are subclassed with ``Queue`` bound to ``fastmq.Queue`` on
each backend; where a case names ``multiprocessing.Queue`` itself, that name
is patched to ``fastmq.Queue`` for the test. The cases where fastmq
deliberately differs are overridden here, each saying how and asserting
fastmq's behaviour instead:

* ``test_queue_feeder_donot_stop_onexc``: an unpicklable object raises at
  ``put()`` (fastmq serializes in the caller; there is no feeder thread whose
  stderr would swallow the error). The queue stays usable.
* ``test_queue_feeder_on_queue_feeder_error``: tests the feeder thread's
  ``_on_queue_feeder_error`` hook of ``multiprocessing.queues.Queue``; fastmq
  has no feeder thread (same behaviour as above).
* ``test_task_done``: ``JoinableQueue`` is not part of fastmq.
* ``test_closed_queue_put_get_exceptions``: run for ``Queue`` only (no
  ``JoinableQueue``).

Needs the ``test`` package of the running interpreter (shipped with CPython;
some distributions split it out, e.g. Debian's ``libpython3-testsuite``).
"""
from __future__ import annotations

import multiprocessing
import queue as pyqueue
import unittest
from unittest import mock

import pytest

import fastmq

_tm = pytest.importorskip(
    "test._test_multiprocessing",
    reason="CPython's test package (test._test_multiprocessing) is not installed")


def _factory(backend):
    def Queue(maxsize=0):
        return fastmq.Queue(maxsize, _backend=backend)
    return Queue


class _FastmqQueueCases(_tm._TestQueue):
    TYPE = "processes"
    ALLOWED_TYPES = ("processes",)
    Process = multiprocessing.Process
    Event = staticmethod(multiprocessing.Event)
    BACKEND = None

    def setUp(self):
        patcher = mock.patch.object(multiprocessing, "Queue", _factory(self.BACKEND))
        patcher.start()
        self.addCleanup(patcher.stop)

    @property
    def Queue(self):
        return _factory(self.BACKEND)

    # ---- deliberate differences (see module docstring) ----------------------

    def test_queue_feeder_donot_stop_onexc(self):
        class NotSerializable:
            def __reduce__(self):
                raise AttributeError

        for maxsize in (0, 1):
            q = self.Queue(maxsize=maxsize)
            with self.assertRaises(AttributeError):
                q.put(NotSerializable())           # raises here, in the caller
            q.put(True)
            self.assertEqual(q.qsize(), 1)
            self.assertTrue(q.get(timeout=10))
            self.assertTrue(q.empty())
            q.close()

    def test_queue_feeder_on_queue_feeder_error(self):
        self.skipTest("multiprocessing.queues.Queue's feeder-thread hook; fastmq has no "
                      "feeder thread: an unpicklable object raises at put()")

    def test_task_done(self):
        self.skipTest("fastmq offers no JoinableQueue")

    def test_closed_queue_put_get_exceptions(self):
        q = self.Queue()
        q.close()
        with self.assertRaisesRegex(ValueError, "is closed"):
            q.put("foo")
        with self.assertRaisesRegex(ValueError, "is closed"):
            q.get()


class TestCPythonQueueCasesNative(_FastmqQueueCases, unittest.TestCase):
    BACKEND = "native"


class TestCPythonQueueCasesPure(_FastmqQueueCases, unittest.TestCase):
    BACKEND = "pure"


def test_the_adapted_cases_are_the_queue_cases():
    """Every queue case of this interpreter's test module is run (or listed
    above as a difference): none is silently missing."""
    cases = {n for n in dir(_tm._TestQueue) if n.startswith("test_")}
    assert {"test_put", "test_get", "test_fork", "test_qsize", "test_timeout"} <= cases
    assert issubclass(fastmq.Full, pyqueue.Full) and issubclass(fastmq.Empty, pyqueue.Empty)


@pytest.mark.parametrize("backend", ["native", "pure"])
def test_empty_on_a_closed_unused_handle_raises(backend):
    """Differs from CPython 3.12+'s test_closed_queue_empty_exceptions, which
    expects ``empty()`` of a closed, never-used multiprocessing.Queue to be
    True (its close() is a no-op until a feeder thread exists): a closed
    fastmq handle raises QueueClosed (a ValueError) for every operation."""
    q = fastmq.Queue(_backend=backend)
    q.close()
    with pytest.raises(fastmq.QueueClosed, match="closed"):
        q.empty()
