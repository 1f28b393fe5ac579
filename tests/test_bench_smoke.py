"""``fastmq bench`` completes and verifies, and its verification really fails
loudly when a transport loses, duplicates or corrupts a message.

The quick run asserts no speed: only that every message arrived intact.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

import fastmq  # noqa: E402  (the package under test: never skip it)

from fastmq import bench  # noqa: E402
from fastmq._bench import payloads, peers, report  # noqa: E402
from fastmq._bench.runner import CellFailed, run_pingpong, run_throughput  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Children import the fastmq this process imported (installed, with its
# compiled core), not the bare source tree.
SRC = os.path.dirname(os.path.dirname(os.path.abspath(fastmq.__file__)))


def test_quick_bench_completes_and_verifies(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    try:
        import matplotlib  # noqa: F401
        chart = ["--plot", str(tmp_path / "bench.png")]
    except ImportError:
        chart = []
    res = subprocess.run([sys.executable, "-m", "fastmq", "bench", "--quick",
                          "--peers", "fastmq,mp-queue", "--json", str(out), *chart],
                         capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    if chart:
        assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "all " in res.stdout and "cells verified" in res.stdout
    doc = json.loads(out.read_text())
    assert {c["peer"] for c in doc["cells"]} == {"fastmq", "mp-queue"}
    assert {c["scenario"] for c in doc["cells"]} == set(bench.QUICK_IDS)
    for cell in doc["cells"]:
        assert cell["status"] == "ok", cell
        assert cell["verified_messages"] > 0
    assert doc["reference"]["memcpy_bytes_per_s"] > 0


# ------------------------------------------------------- faulty transports --

class LossyPeer(peers.MpQueuePeer):
    """Drops every 97th message on the sending side."""
    name, label = "lossy", "lossy test peer"

    def sender(self, index):
        ep = super().sender(index)
        send, n = ep.send, [0]

        def lossy(m):
            n[0] += 1
            if n[0] % 97:
                send(m)
        ep.send = lossy
        return ep


def _duplicating(at):
    """An mp.Queue peer whose every sender sends its ``at``-th message twice."""
    class Duplicating(peers.MpQueuePeer):
        name, label = f"dup-{at}", f"sends its message {at} twice"

        def sender(self, index):
            ep = super().sender(index)
            send, n = ep.send, [0]

            def dup(m):
                send(m)
                n[0] += 1
                if n[0] == at:
                    send(m)
            ep.send = dup
            return ep
    return Duplicating


DuplicatingPeer = _duplicating(50)


def _corrupting(where, which):
    """An mp.Queue that flips one byte at ``where`` ("middle", "tail", "body-start") of the
    ``which`` messages (``body-start``: the first byte after the header, which
    the sampled windows of large messages cover) ("one": the 10th only; "from-10th": every one from it on)."""
    class CorruptingPeer(peers.MpQueuePeer):
        name, label = "corrupt", "corrupting test peer"

        def sender(self, index):
            ep = super().sender(index)
            send, n = ep.send, [0]

            def corrupt(m):
                n[0] += 1
                if n[0] == 10 or (which == "from-10th" and n[0] > 10):
                    b = bytearray(m)
                    b[{"middle": len(b) // 2, "tail": len(b) - 3, "body-start": 20}[where]] ^= 0xFF
                    m = bytes(b)
                send(m)
            ep.send = corrupt
            return ep
    return CorruptingPeer



def _no_children_left():
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


# One consumer of small raw messages compares each one inline with the one
# expected next (runner.consume_compare: one producer, several, or batches);
# other cells keep what they receive and check it after the window.
@pytest.mark.parametrize("mode,size,producers", [
    ("bytes", 64, 1), ("bytes", 64, 2), ("batch", 64, 1), ("pickle", 0, 1),
    ("bytes", 1 << 20, 1)])
def test_lost_messages_fail_loudly(mode, size, producers):
    with pytest.raises(CellFailed) as info:
        # >= 97 messages (one is dropped in 97); few large ones, so a busy
        # machine does not turn the loss into a timeout. The harness waits out
        # the whole timeout for the lost ones, so it is short: the producers
        # are done in well under a second.
        run_throughput(LossyPeer, producers, 1, mode, size,
                       300 if size < 1 << 20 else 120, 16, timeout=5)
    assert info.value.kind == "verification"
    assert "LOST" in str(info.value)
    assert _no_children_left()


@pytest.mark.parametrize("mode,producers", [("bytes", 1), ("bytes", 2), ("batch", 1)])
def test_duplicates_fail_loudly(mode, producers):
    with pytest.raises(CellFailed) as info:
        run_throughput(DuplicatingPeer, producers, 1, mode, 64, 300, 64, timeout=5)
    assert "duplicate" in str(info.value)


@pytest.mark.parametrize("producers", [1, 2])
def test_messages_after_the_last_fail_loudly(producers):
    """One consumer compares inline and knows how many messages to expect:
    one more than was sent (a duplicate of the very last) is caught too."""
    with pytest.raises(CellFailed) as info:
        run_throughput(_duplicating(300), producers, 1, "bytes", 64, 300, 64, timeout=5)
    assert "duplicate" in str(info.value)


def test_duplicates_across_consumers_fail_loudly():
    with pytest.raises(CellFailed) as info:
        run_throughput(DuplicatingPeer, 2, 2, "bytes", 64, 300, 64, timeout=5)
    assert "duplicate" in str(info.value).lower()


# Every message is checked at its ends; bodies are checked whole for small
# messages (<= KEEP_MAX), by sampling (one message in SAMPLE_EVERY kept whole)
# for mid-sized ones and by sampled windows for large ones -- so one flipped
# byte in the middle of one larger message is the case left out on purpose.
@pytest.mark.parametrize("size,where,which", [
    (64, "middle", "one"), (64, "tail", "one"), (64, "body-start", "from-10th"),
    (4096, "tail", "one"), (4096, "middle", "from-10th"),
    (1 << 20, "tail", "one"), (1 << 20, "body-start", "one")])
def test_corruption_fails_loudly(size, where, which):
    assert payloads.KEEP_MAX < 4096 <= payloads.FULL_CHECK_MAX < 1 << 20
    with pytest.raises(CellFailed) as info:
        run_throughput(_corrupting(where, which), 1, 1, "bytes", size,
                       300 if size < 65536 else 40, 16, timeout=10)
    assert "corrupt" in str(info.value)


def _hung(base):
    class Hung(base):
        """A consumer that never reads again."""

        def receiver(self, index):
            ep = super().receiver(index)
            ep.recv = lambda: time.sleep(3600)
            return ep
    return Hung


@pytest.mark.parametrize("base", [peers.MpQueuePeer, peers.SimpleQueuePeer, peers.PipePeer])
def test_hung_peer_is_killed_and_reported(base):
    t0 = time.monotonic()
    with pytest.raises(CellFailed) as info:
        # 20k x 4 KiB: far more than a pipe holds, so the producer blocks too
        run_throughput(_hung(base), 1, 1, "bytes", 4096, 20_000, 8, timeout=2)
    assert info.value.kind == "timeout"
    assert time.monotonic() - t0 < 20
    assert _no_children_left()


def test_bench_exit_status_is_nonzero_on_loss(monkeypatch, capsys):
    monkeypatch.setitem(peers.PEERS, "lossy", LossyPeer)
    status = bench.main(["--peers", "lossy,mp-queue", "--scenarios", "1x1-bytes-64",
                         "--repeat", "1", "--seconds", "0.05", "--timeout", "3", "-q"])
    out, err = capsys.readouterr()
    assert status == 1
    assert "FAILED" in out and "LOST" in out
    assert "FAILED" in err


def _has_numpy():
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


OPTIONAL_PEERS = [n for n in peers.PEERS if n not in ("fastmq", "fastmq-ack", "fastmq-ack-many",
                                                    "mp-queue", "simplequeue", "pipe")]


def _peer_or_skip(name):
    cls = peers.PEERS[name]
    ok, why = cls.available()
    if not ok:                   # only a missing package (CI installs them: fastmq[bench])
        pytest.skip(why)
    return cls


@pytest.mark.parametrize("name", [n for n in peers.PEERS if not n.startswith("fastmq-")])
def test_every_peer_moves_every_mode(name):
    """Each peer passes verification in each mode it supports (tiny runs); what it
    cannot carry on this machine says why instead of failing."""
    cls = _peer_or_skip(name)
    ran = 0
    for mode, size, count, depth in (("bytes", 64, 200, 64), ("pickle", 0, 200, 64),
                                     ("batch", 64, 200, 64), ("bytes", 4096, 300, 64),
                                     ("bytes", 1 << 20, 20, 8), ("numpy", 1 << 20, 20, 8)):
        if mode == "numpy" and not _has_numpy():
            continue
        for p, c in ((1, 1), (2, 1), (2, 2)):
            if not cls.supports(p, c, mode):
                continue
            why = cls.cannot_carry(p, c, mode, size, depth)
            if why:
                assert isinstance(why, str) and str(size) in why
                continue
            r = run_throughput(cls, p, c, mode, size, count, depth, timeout=20)
            assert r["messages"] == p * count, (name, mode, p, c)
            ran += 1
    assert ran >= 3
    r = run_pingpong(cls, 64, seconds=0.02, warmup=10, timeout=20)
    assert r["round_trips"] >= 200 and r["p50_us"] > 0, name


def test_posix_mq_reports_what_the_kernel_will_not_carry():
    cls = _peer_or_skip("posix-mq")
    limit = peers._mq_limit("msgsize_max", 8192)
    why = cls.cannot_carry(1, 1, "bytes", 64 << 20, 2)
    # a privileged process may be allowed more than msgsize_max, never 64 MiB
    assert why and "msgsize_max" in why
    assert cls.cannot_carry(1, 1, "bytes", min(limit, 4096), 64) is None


@pytest.mark.parametrize("name", ["fastmq", "mp-queue", "posix-mq", "iceoryx2"])
def test_memory_of_one_queue_is_measured(name):
    from fastmq._bench.runner import run_memory
    cls = _peer_or_skip(name)
    r = run_memory(cls, 64, 1024, n=2048, timeout=30)
    assert set(r) == {"rss_created", "shm_created", "rss_used", "shm_used"}
    assert all(isinstance(v, int) for v in r.values())
    if name == "fastmq":
        assert r["shm_created"] > 0      # its ring lives in /dev/shm
    assert _no_children_left()


def test_harness_ceiling_is_measured_per_scenario():
    from fastmq._bench.runner import harness_ceiling, pingpong_ceiling
    for args in ((1, 1, "bytes", 64), (1, 1, "bytes", 4096), (2, 2, "pickle", 0),
                 (1, 1, "batch", 64), (1, 1, "bytes", 1 << 20)):
        c = harness_ceiling(*args, seconds=0.005)
        assert c["producer_ns"] > 0 and c["consumer_ns"] > 0
        assert c["msgs_per_s"] <= 1e9 * min(args[0] / c["producer_ns"],
                                            args[1] / c["consumer_ns"]) + 1
    assert 0 < pingpong_ceiling(64, n=2000) < 1000


def test_the_no_queue_mailbox_carries_every_length_and_the_wake_up():
    """The ping-pong's no-queue reference (``SpinMailbox``) hands over exactly
    what was sent, between two processes, for lengths from 0 to its size."""
    from fastmq._bench.runner import SpinMailbox
    box = SpinMailbox(1, 1, "bytes", 64, 16)
    back = SpinMailbox(1, 1, "bytes", 64, 16)
    sent = [bytes([n]) * n for n in (1, 64, 7, 0, 33)]
    # receivers first, as the bench's barrier does: one takes what came after it
    echo_in, mine_in = box.receiver(0), back.receiver(0)
    pid = os.fork()
    if pid == 0:                          # echo every message back, the empty one too
        code = 1
        try:
            r, s = echo_in, back.sender(0)
            deadline = time.monotonic() + 10
            for _ in sent:
                m = r.recv()
                while m is None and time.monotonic() < deadline:
                    m = r.recv()
                s.send(m)
            code = 0
        finally:
            os._exit(code)
    try:
        r, s = mine_in, box.sender(0)
        got = []
        deadline = time.monotonic() + 10
        for m in sent:
            s.send(m)
            b = r.recv()
            while b is None and time.monotonic() < deadline:
                b = r.recv()
            got.append(b)
        assert got == sent
    finally:
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_pingpong_over_no_queue_runs_the_same_loops():
    from fastmq._bench.runner import SpinMailbox
    r = run_pingpong(SpinMailbox, 64, seconds=0.02, warmup=10, timeout=20)
    assert r["round_trips"] >= 200 and 0 < r["p50_us"] <= r["p999_us"]
    assert _no_children_left()


def test_a_stop_of_the_cpu_is_seen_by_the_stop_meter():
    """A process held with SIGSTOP for 50 ms is, to the loop that meters the
    CPU's stops, one stop of at least 50 ms."""
    from fastmq._bench.reference import _stops_here
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, b"go")
            rate, gaps = _stops_here(0.6)
            os.write(w, f"{rate} {max(gaps, default=0)}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        assert os.read(r, 2) == b"go"
        time.sleep(0.1)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)
        os.kill(pid, signal.SIGCONT)
        rate, longest = os.read(r, 100).split()
        assert int(longest) >= 50e6 and float(rate) > 0
    finally:
        os.kill(pid, signal.SIGCONT)
        os.waitpid(pid, 0)
        os.close(r)


def test_cpu_stops_summarise_every_cpu():
    from fastmq._bench.reference import cpu_stops
    s = cpu_stops(seconds=0.05, max_cpus=2)
    assert s["cpus"] == min(2, len(os.sched_getaffinity(0)))
    assert s["per_cpu_per_s"] >= 0 and 0 <= s["median_us"] <= s["p99_us"]


def test_a_tail_is_marked_machine_bound_when_stops_hit_more_than_one_in_a_thousand():
    doc = {"reference": {"cpu_stops": {"per_cpu_per_s": 1000.0}}}
    # two CPUs x 1000 stops/s: a 1 µs round trip is hit 0.2% of the time, 0.4 µs 0.08%
    assert report.machine_bound_tail(doc, 1.0)
    assert not report.machine_bound_tail(doc, 0.4)
    assert not report.machine_bound_tail({"reference": {}}, 100.0)


def test_cells_near_the_ceiling_are_flagged():
    cells = [{"kind": "throughput", "status": "ok", "median": {"msgs_per_s": v}}
             for v in (100.0, 499.0, 501.0)]
    report.flag_harness_bound(cells, {"msgs_per_s": 1000.0})
    assert [c["harness_bound"] for c in cells] == [False, False, True]
    lat = [{"kind": "pingpong", "status": "ok", "median": {"p50_us": v}} for v in (1.5, 2.5)]
    report.flag_harness_bound(lat, {"round_trip_us": 1.0})
    assert [c["harness_bound"] for c in lat] == [True, False]


def test_sweeps_memory_and_new_peers_in_a_tiny_run(tmp_path, capsys):
    """The size sweep (with a size posix mq cannot carry), the scaling sweep
    (shapes Pipe and iceoryx2 do not do), the memory table and the chart, end
    to end, in a tiny run of every installed peer."""
    names = ["fastmq", "mp-queue", "pipe"] + [n for n in OPTIONAL_PEERS
                                             if peers.PEERS[n].available()[0]]
    ids = "1x1-bytes-64,1x1-bytes-16k,1x1-bytes-4m,2x1-bytes-64,2x2-bytes-64,memory,pingpong-64"
    out = tmp_path / "b.json"
    args = ["--peers", ",".join(names), "--scenarios", ids, "--repeat", "1",
            "--seconds", "0.02", "--timeout", "30", "-q", "--json", str(out)]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(tmp_path / "b.png")]
    except ImportError:
        pass
    status = bench.main(args)
    text = capsys.readouterr().out
    assert status == 0, text
    doc = json.loads(out.read_text())
    assert set(doc["ceilings"]) == set(ids.split(",")) - {"memory"}
    assert "harness ceiling" in text and "message-size sweep" in text and "scaling" in text
    cells = {(c["scenario"], c["peer"]): c for c in doc["cells"]}
    for (sid, peer), c in cells.items():
        assert c["status"] in ("ok", "n/a"), c
    if "posix-mq" in names and peers._mq_limit("msgsize_max", 8192) < 4 << 20:
        assert cells[("1x1-bytes-4m", "posix-mq")]["status"] == "n/a"
        assert "n/a" in text
    assert ("2x2-bytes-64", "pipe") not in cells
    if "iceoryx2" in names:
        assert cells[("2x1-bytes-64", "iceoryx2")]["status"] == "ok"
        assert ("2x2-bytes-64", "iceoryx2") not in cells
    mem = [c for c in doc["cells"] if c["scenario"] == "memory"]
    assert {c["peer"] for c in mem} == set(names)
    if (tmp_path / "b.png").exists():
        assert (tmp_path / "b.png").stat().st_size > 10_000
    assert doc["ceilings"]["pingpong-64"]["mailbox"]["status"] == "ok"
    assert "no queue, polled in Python" in text and "each CPU stops" in text
    assert doc["reference"]["cpu_stops"]["cpus"] >= 1
    md = report.markdown_table(doc)
    assert md.startswith("| scenario | harness ceiling |") and "µs" in md
    assert "pingpong-64 (p99.9 round trip) | no queue: " in md


def test_quick_mode_says_its_ratios_are_indicative(capsys):
    status = bench.main(["--quick", "--peers", "fastmq", "--scenarios", "1x1-bytes-64",
                         "--seconds", "0.02", "-q"])
    assert status == 0
    assert "indicative" in capsys.readouterr().out


def test_report_ratios_and_table():
    cells = [
        {"scenario": "s", "kind": "throughput", "peer": "fastmq", "label": "fastmq", "status": "ok",
         "median": {"msgs_per_s": 100.0, "bytes_per_s": None}, "min": {"msgs_per_s": 90.0},
         "max": {"msgs_per_s": 110.0}},
        {"scenario": "s", "kind": "throughput", "peer": "mp-queue", "label": "mp", "status": "ok",
         "median": {"msgs_per_s": 10.0, "bytes_per_s": None}, "min": {"msgs_per_s": 9.0},
         "max": {"msgs_per_s": 11.0}},
        {"scenario": "s", "kind": "throughput", "peer": "zmq", "label": "zmq", "status": "ok",
         "median": {"msgs_per_s": 50.0, "bytes_per_s": None}, "min": {"msgs_per_s": 40.0},
         "max": {"msgs_per_s": 60.0}},
    ]
    report.add_ratios(cells)
    assert cells[0]["vs_baseline"] == pytest.approx(10.0)
    assert cells[0]["vs_best_other"] == pytest.approx(2.0)
    assert cells[2]["vs_best_other"] == pytest.approx(0.5)


def test_plot_without_matplotlib_is_a_clear_error(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import sys; sys.modules['matplotlib'] = None; from fastmq.cli import main; "
            f"sys.exit(main(['bench', '--plot', {str(tmp_path / 'x.png')!r}, "
            "'--scenarios', 'pingpong-64', '--peers', 'mp-queue', '-q']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "matplotlib" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("mode", ["numpy", "reserve"])
def test_fastmq_numpy_paths_verify(mode):
    pytest.importorskip("numpy")
    r = run_throughput(peers.FastmqPeer, 1, 1, mode, 1 << 20, 40, 8, timeout=30)
    assert r["messages"] == 40 and r["bytes_per_s"] > 0


def test_reserve_mode_is_fastmq_only():
    assert peers.FastmqPeer.supports(1, 1, "reserve")
    assert not any(cls.supports(1, 1, "reserve") for name, cls in peers.PEERS.items()
                   if name != "fastmq")
    assert not peers.PipePeer.supports(2, 2, "bytes")


# ------------------------------------------------ the end of a timed window
#
# A consumer that cannot know which message is the last (several consumers
# share the queue) reads the clock at the first wake-up after its last
# message; the parent keeps waking consumers until all have reported, so any
# later wake-up must not move that time on (it once did, and every
# multi-consumer cell then ended at the parent's last wake-up).

@pytest.mark.parametrize("plan", [payloads.KEEP, payloads.FINGERPRINT])
def test_a_consumers_window_ends_at_its_first_wake_up_after_the_last_message(plan):
    from fastmq._bench import runner
    n = runner.STAMP_EVERY + 5               # the last message is not a stamped one
    shared = [0, 0]                          # [count, stop flag]
    script = [b"m" * 64] * n + [None] * 4
    marks = []

    def recv():
        m = script.pop(0)
        if m is None:
            marks.append(time.monotonic_ns())   # a wake-up, 20 ms after the one before
            time.sleep(0.02)
            if not script:
                shared[-1] = 1
        return m

    got, last, _ = runner.consume(recv, None, plan, False, shared, 0)
    assert got == n and shared[0] == n
    assert marks[0] <= last < marks[1], (last - marks[0]) / 1e6
