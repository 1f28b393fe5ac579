"""redis:// under failure: killed consumers, lease races, killed servers,
outages and credentials. Real processes, real signals, private servers
(``redis_support``); every child is reaped in a ``finally``.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import fastmq
from redis_support import *  # noqa: F401,F403 - fixtures


def _spawn(code):
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _reap(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()


def test_sigkilled_consumer_leases_come_back_in_seconds(rq):
    q = rq.create()
    q.put_many(range(5))
    child = _spawn(f"import fastmq, time, sys\n"
                   f"q = fastmq.Queue.open({q.name!r}, url={rq.url!r})\n"
                   f"ms = q.get_messages(5, lease=120, timeout=20)\n"
                   f"print(len(ms), flush=True)\n"
                   f"time.sleep(600)\n")
    try:
        assert child.stdout.readline().strip() == "5"
        assert q.qsize() == 0 and len(q.pending()) == 5
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        start = time.monotonic()
        got = []
        while len(got) < 5:
            got += q.get_messages(5, timeout=30)
        elapsed = time.monotonic() - start
    finally:
        _reap([child])
    assert sorted(m.value for m in got) == list(range(5))
    assert all(m.delivery_count == 2 for m in got)
    assert elapsed < 15                     # the heartbeat lapse, not the 120 s lease
    assert q.stats()["abandoned"] == 5
    assert q.ack_many(got) == 5


def test_late_ack_racing_expiry_is_exactly_one_outcome(rq):
    q = rq.create()
    reaper = _spawn(f"import fastmq, time\n"
                    f"q = fastmq.Queue.open({q.name!r}, url={rq.url!r})\n"
                    f"end = time.time() + 60\n"
                    f"while time.time() < end:\n"
                    f"    q.redeliver_expired()\n")
    outcomes = {"acked": 0, "lost": 0}
    try:
        for i in range(40):
            q.put(i)
            m = q.get_message(lease=0.05, timeout=5)
            time.sleep(random.uniform(0.03, 0.07))     # around the deadline
            try:
                m.ack()
            except fastmq.LeaseLost:
                outcomes["lost"] += 1
                again = q.get_message(timeout=5)       # it came back, once
                assert (again.value, again.delivery_count) == (i, 2)
                again.ack()
            else:
                outcomes["acked"] += 1
            with pytest.raises(fastmq.Empty):          # and nothing else is left
                q.get_message(block=False)
            assert q.pending() == []
    finally:
        _reap([reaper])
    assert outcomes["acked"] + outcomes["lost"] == 40


_RACER = """
import fastmq, random, time, sys
q = fastmq.Queue.open({name!r}, url={url!r})
done = fastmq.Queue.open({done!r}, url={url!r})
rng = random.Random({seed})
end = time.time() + 90
while time.time() < end:
    try:
        ms = q.get_messages(rng.randint(1, 4), lease=0.5, timeout=1)
    except fastmq.Empty:
        continue
    for m in ms:
        r = rng.random()
        try:
            if r < 0.15:
                m.nack()                  # back at the end of the queue
                continue
            if r < 0.25:
                continue                  # dropped: it expires and comes back
            if r > 0.95:
                time.sleep(0.6)           # too late: the ack must be refused
            m.ack()
        except fastmq.LeaseLost:
            continue
        done.put((m.value, m.delivery_count))
"""


def test_many_consumers_racing_over_redeliveries_ack_each_once(rq):
    n = 300
    q = rq.create(max_deliveries=1000)
    done = rq.create()
    q.put_many(range(n))
    procs = [_spawn(_RACER.format(name=q.name, url=rq.url, done=done.name, seed=s))
             for s in range(4)]
    acked = []
    try:
        deadline = time.monotonic() + 120
        while len(acked) < n and time.monotonic() < deadline:
            try:
                acked += done.get_many(100, timeout=1)
            except fastmq.Empty:
                pass
        time.sleep(1.0)                    # would-be duplicates have time to show
        try:
            acked += done.get_many(1000, block=False)
        except fastmq.Empty:
            pass
    finally:
        _reap(procs)
    values = [v for v, _ in acked]
    assert sorted(values) == list(range(n))          # every message, exactly once
    assert any(c > 1 for _, c in acked)              # and redeliveries did happen


_PRODUCER = """
import fastmq, sys
q = fastmq.Queue.open({name!r}, url={url!r} + "?retry_window=30")
for i in range({n}):
    q.put(i)
print("done", flush=True)
"""


def test_server_killed_mid_stream_with_aof_loses_nothing_acknowledged(fresh_server):
    server = fresh_server(aof=True)
    n = 400
    q = fastmq.Queue.create("aof-q", url=server.url + "?retry_window=30")
    prod = _spawn(_PRODUCER.format(name="aof-q", url=server.url, n=n))
    acked, lost, killed = set(), set(), False
    try:
        deadline = time.monotonic() + 120
        while len(acked | lost) < n and time.monotonic() < deadline:
            if not killed and len(acked) > n // 3:
                server.restart()                   # SIGKILL, then start on the same AOF
                killed = True
            try:
                ms = q.get_messages(16, lease=2.0, timeout=1)
            except fastmq.Empty:
                continue
            for m in ms:
                try:
                    m.ack()
                    acked.add(m.value)
                except fastmq.LeaseLost:
                    lost.add(m.value)              # an ack whose reply died with the server
        assert prod.wait(timeout=60) == 0, prod.stderr.read()
    finally:
        _reap([prod])
        q.close()
    assert killed
    assert acked | lost == set(range(n))
    q = fastmq.Queue.open("aof-q", url=server.url)
    time.sleep(2.2)
    q.redeliver_expired()
    leftover = []
    try:
        while True:
            leftover += [m.value for m in q.get_messages(100, block=False)]
    except fastmq.Empty:
        pass
    assert set(leftover) <= lost                   # at most the unconfirmed acks come back
    q.close()


def test_server_restart_without_persistence_is_queue_not_found(fresh_server):
    server = fresh_server(aof=False)
    q = fastmq.Queue.create("gone", url=server.url)
    q.put(1)
    server.restart()
    with pytest.raises(fastmq.QueueNotFound):
        q.put(2)
    with pytest.raises(fastmq.QueueNotFound):
        q.get(timeout=1)
    with pytest.raises(fastmq.QueueNotFound):
        fastmq.Queue.open("gone", url=server.url)
    q.close()


def test_unreachable_server_is_unavailable_with_url(fresh_server):
    server = fresh_server()
    q = fastmq.Queue.create("u", url=server.url)
    server.stop()
    start = time.monotonic()
    with pytest.raises(fastmq.Unavailable) as info:
        q.get(timeout=1)
    assert time.monotonic() - start < 6
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, fastmq.Error)
    assert f"127.0.0.1:{server.port}" in str(info.value)
    with pytest.raises(fastmq.Unavailable):
        q.put_nowait(1)
    q.close()
    with pytest.raises(fastmq.Unavailable):
        fastmq.Queue.open("u", url=server.url + "?retry_window=0.5")


def test_brief_outage_is_survived_by_a_blocking_put(fresh_server):
    server = fresh_server(aof=True)
    q = fastmq.Queue.create("b", url=server.url)
    server.stop()
    errors = []

    def producer():
        try:
            q.put("through the outage")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    t = threading.Thread(target=producer)
    t.start()
    time.sleep(1.0)
    server.start()
    t.join(20)
    assert not t.is_alive() and errors == []
    assert q.get(timeout=5) == "through the outage"
    assert q.qsize() == 0                           # applied once
    q.close()


def test_retried_put_is_applied_once(rq):
    q = rq.create()
    args = (q._prefix, "producer-x", 7, 0, 0, 0, b"0:payload")
    assert q._link.call("put", q._mkey, args)[0] == 1
    assert q._link.call("put", q._mkey, args)[0] == 1    # the same request again
    assert q.qsize() == 1
    assert q._link.call("put", q._mkey, (q._prefix, "producer-x", 8, 0, 0, 0, b"0:p2"))[0] == 1
    assert q.get_many_bytes(10) == [b"payload", b"p2"]


def test_credentials_never_shown(fresh_server):
    secret = "s3cr3t-Pw-42"
    server = fresh_server(password="other-" + secret, acl_user=("fmq", secret))
    url = server.url
    assert secret in url
    q = fastmq.Queue.create("cred", url=url)
    q.put(1)
    m = q.get_message()
    texts = [repr(q), str(q.stats()), str(q.pending()), repr(m), q.url]
    ex = fastmq.Exchange.create("credx", "fanout", url=url)
    texts.append(repr(ex))
    for bad in (lambda: fastmq.Queue.open("missing", url=url),
                lambda: fastmq.Exchange.open("missing", url=url),
                lambda: fastmq.Queue.open("cred", url=url.replace(secret, "wrong") +
                                          "?retry_window=0.5")):
        with pytest.raises(Exception) as info:
            bad()
        texts.append(str(info.value))
        texts.append(repr(info.value))
    assert isinstance(info.value, fastmq.Unavailable)          # a wrong password
    for args in (["ls"], ["stat", "cred"], ["pending", "cred"], ["stat", "missing"]):
        out = subprocess.run([sys.executable, "-m", "fastmq", *args, "--url", url],
                             capture_output=True, text=True, timeout=60)
        texts += [out.stdout, out.stderr]
    assert "cred" in texts[-8]                                  # ls did list it
    m.ack()
    server.stop()
    with pytest.raises(fastmq.Unavailable) as info:
        q.get(timeout=0.5)
    texts.append(str(info.value))
    for t in texts:
        assert secret not in t, t
    q.close()
    ex.close()


def test_wait_replicas(fresh_server):
    primary = fresh_server()
    replica = fresh_server(extra=["--replicaof", "127.0.0.1", str(primary.port)])
    import redis
    r = redis.Redis.from_url(replica.url)
    deadline = time.monotonic() + 60
    while r.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica did not sync"
        time.sleep(0.1)
    url = primary.url + "?wait_replicas=1&wait_timeout=5"
    q = fastmq.Queue.create("w", url=url)
    try:
        q.put("replicated")                          # confirmed by the replica
        assert r.llen("fmq:{w}:q") == 1
        asyncio.run(q.put_async("replicated too"))   # the asyncio path waits as well
        assert r.llen("fmq:{w}:q") == 2
        r.close()
        replica.stop()
        q._link.wait_timeout_ms = 300
        with pytest.raises(fastmq.Unavailable, match="applied on the primary"):
            q.put("primary only")
        with pytest.raises(fastmq.Unavailable, match="applied on the primary"):
            asyncio.run(q.put_async("primary only too"))
        assert q.qsize() == 4                         # applied, as the errors say
        assert q.get_many(10) == ["replicated", "replicated too", "primary only",
                                  "primary only too"]
    finally:
        q.close()


def test_tls_with_password(fresh_server):
    secret = "tls-s3cret-99"
    server = fresh_server(tls=True, password=secret)
    assert server.url.startswith("rediss://")
    q = fastmq.Queue.create("tls", url=server.url)
    try:
        q.put({"over": "tls"})
        assert q.get(timeout=5) == {"over": "tls"}
        assert secret not in repr(q) and secret not in str(q.stats())
        plain = server.url.replace("rediss://", "redis://").split("?")[0] + "?retry_window=0.5"
        with pytest.raises(fastmq.Unavailable) as info:     # TLS only: plain text fails
            fastmq.Queue.open("tls", url=plain)
        assert secret not in str(info.value)
    finally:
        q.close()
