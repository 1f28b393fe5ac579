"""Plumbing shared by the worker scripts (``_crash_workers.py``,
``_batch_workers.py``) and the tests that drive them.

Worker side: ``Log``, a line file of what the worker did, each line written
after the call it records returned and flushed at once (a SIGKILL cannot lose
what ``write()`` already handed to the kernel), and ``read_log``.

Test side: ``WorkerChild``, one worker role in a fresh interpreter. A fresh
one, because ``FASTMQ_CRASH_AT`` is read once, when ``fastmq._core`` is
imported: the crash point must be armed in the child's environment only,
never in the test process.
"""
from __future__ import annotations

import os
import queue as stdqueue
import signal
import subprocess
import sys
import threading
import time


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1) if path else None

    def write(self, line):
        if self.f:
            self.f.write(line + "\n")
            self.f.flush()


def read_log(path):
    """Lines of a worker log as lists of fields ([] if the file is absent)."""
    try:
        with open(path) as f:
            return [ln.split() for ln in f.read().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []


class WorkerChild:
    """``python SCRIPT ROLE --opt value ...`` (an option given True becomes a
    bare flag), its stdout lines readable with a deadline, its stdin open for
    ``send``. ``log`` is passed as ``--log`` and kept as ``.log``;
    ``new_session`` puts the child in its own process group, so ``kill``
    also reaches the processes it forked."""

    def __init__(self, script, role, backend="native", crash=None, log=None,
                 new_session=False, **opts):
        env = dict(os.environ)
        env.pop("FASTMQ_CRASH_AT", None)
        if crash:
            env["FASTMQ_CRASH_AT"] = crash          # the child's environment only
        env["FASTMQ_BACKEND"] = backend
        args = [sys.executable, script, role]
        for k, v in opts.items():
            args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
        if log:
            args += ["--log", str(log)]
        self.log = log
        self.new_session = new_session
        self.proc = subprocess.Popen(args, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=new_session)
        self.pid = self.proc.pid
        self.lines = stdqueue.Queue()
        self.err = []
        self._out = threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put),
                                     daemon=True)
        self._out.start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err.append),
                         daemon=True).start()

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink(line.rstrip("\n"))

    def expect(self, prefix, timeout=30.0):
        """The first line starting with ``prefix``; fails at the deadline,
        or as soon as the child's stdout has ended without one."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, min(left, 0.2)))
            except stdqueue.Empty:
                ended = not self._out.is_alive() and self.lines.empty()
                if left <= 0 or ended:
                    raise AssertionError(
                        f"child {self.pid} did not print {prefix!r} within {timeout}s"
                        f"{' (its output ended)' if ended else ''}; rc={self.proc.poll()} "
                        f"stderr={self.stderr()}") from None
                continue
            if line.startswith(prefix):
                return line

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout=60.0):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"child {self.pid} still running after {timeout}s "
                                 f"(hang?) stderr={self.stderr()}") from None

    def stderr(self):
        time.sleep(0.05)
        return "\n".join(self.err)[-3000:]

    def kill(self):
        if self.new_session:                        # the whole group (forked users)
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)   # a stopped child dies cleanly too
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
