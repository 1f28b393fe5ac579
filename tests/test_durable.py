"""Durable ``file://`` queues: reopening, kill -9, crash points, simulated
power loss and corruption of a closed file.

Every check that matters runs the recovery in a *fresh* process on a file
nobody has open -- the state after a reboot -- through
``_durable_workers.py`` (its roles are separate processes, so crash points
and kills hit exactly them). Messages describe themselves
(``_durable_workers.payload``), so a reader can tell an intact message from a
torn one without other state.
"""
from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time

import pytest

import fastmq
from conftest import HERE, durable_dir

import _durable_workers as W

pytestmark = [pytest.mark.timeout(300)]

WORKER = os.path.join(HERE, "_durable_workers.py")
GEOMETRY = dict(maxsize=64, max_message_size=32 << 10, capacity_bytes=1 << 20)


@pytest.fixture
def ddir(request):
    """A fresh directory on a real filesystem, and its url."""
    pytest.importorskip("fastmq._core")
    base = durable_dir()
    d = os.path.join(base, f"{request.node.name[:40]}-{os.getpid()}-{time.monotonic_ns()}")
    d = "".join(c if c.isalnum() or c in "/-_." else "_" for c in d)
    os.makedirs(d)
    yield d
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def _url(d):
    return "file://" + d


def _spawn(role, *args, env=None):
    e = dict(os.environ)
    e.pop("FASTMQ_CRASH_AT", None)
    e.pop("FASTMQ_FLUSH_IMAGES", None)
    e["FASTMQ_BACKEND"] = "native"
    e.update(env or {})
    return subprocess.Popen([sys.executable, WORKER, role, *map(str, args)], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _reap(procs, sig=signal.SIGKILL):
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


def _check(url, name, env=None):
    """Recover and drain in a fresh process: (ids, bad, figures)."""
    p = _spawn("check_one", url, name, env=env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    return res["ids"], res["bad"], res


def _ids(log):
    if not os.path.exists(log):
        return set(), []
    lines = open(log).read().split("\n")
    ids = {int(x) for x in lines if x.strip().isdigit()}
    bad = [x for x in lines if x.startswith("BAD")]
    return ids, bad


def _wait_started(logs, timeout=20.0):
    """Until every log has a line (its process is up and working), bounded."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if all(os.path.exists(lg) and os.path.getsize(lg) > 0 for lg in logs):
            return
        time.sleep(0.02)


def _create(d, name, sync, **kw):
    geo = dict(GEOMETRY, **kw)
    return fastmq.Queue.create(name, url=_url(d), sync=sync, sync_interval=0.005, **geo)


# ------------------------------------------------------------- basics

@pytest.mark.parametrize("sync", ["commit", "interval", "none"])
def test_messages_survive_close_and_reopen_in_order(ddir, sync):
    q = _create(ddir, "ledger", sync)
    ids = list(range(50))
    for i in ids:
        q.put_bytes(W.payload(i))
    assert q.stats()["sync"] == sync
    q.close()
    got, bad, fig = _check(_url(ddir), "ledger")
    assert bad == [] and got == ids          # one producer: FIFO, nothing torn
    assert fig["kept"] == 50 and fig["dropped"] == 0


def test_file_is_mode_0600_and_named_after_the_queue(ddir):
    q = _create(ddir, "jobs", "commit")
    path = os.path.join(ddir, "jobs.fmq")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    q.close()
    fastmq.Queue.unlink("jobs", url=_url(ddir))
    assert not os.path.exists(path)
    with pytest.raises(fastmq.QueueNotFound):
        fastmq.Queue.open("jobs", url=_url(ddir))
    with pytest.raises(fastmq.QueueNotFound):
        fastmq.Queue.unlink("jobs", url=_url(ddir))


def test_exist_ok_and_queue_exists(ddir):
    q = _create(ddir, "x", "commit")
    with pytest.raises(fastmq.QueueExists):
        _create(ddir, "x", "commit")
    q.put_bytes(W.payload(1))
    q2 = _create(ddir, "x", "none", exist_ok=True)      # opens it: its own mode wins
    assert q2.stats()["sync"] == "commit" and q2.get_bytes(timeout=5) == W.payload(1)
    q.close()
    q2.close()


def test_tmpfs_directory_is_refused(tmp_path):
    pytest.importorskip("fastmq._core")
    d = f"/dev/shm/fastmq-durable-refusal-{os.getpid()}"
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this host")
    try:
        with pytest.raises(ValueError, match="tmpfs"):
            fastmq.Queue.create("q", url="file://" + d, **GEOMETRY)
        assert [n for n in os.listdir(d) if n.startswith("q")] == []   # no leftover
    finally:
        if os.path.isdir(d):
            for n in os.listdir(d):
                os.unlink(os.path.join(d, n))
            os.rmdir(d)


def test_pure_backend_refuses_durable_queues_with_a_typed_error(ddir):
    with pytest.raises(NotImplementedError, match="native backend"):
        fastmq.Queue.create("q", url=_url(ddir), _backend="pure", **GEOMETRY)
    with pytest.raises(NotImplementedError, match="native backend"):
        fastmq.Queue.open("q", url=_url(ddir), _backend="pure")


def test_bad_urls_and_sync_arguments(ddir):
    with pytest.raises(ValueError, match="must be absolute"):
        fastmq.Queue.create("q", url="file:relative/dir", **GEOMETRY)
    with pytest.raises(ValueError, match="no host"):
        fastmq.Queue.create("q", url="file://somehost/dir", **GEOMETRY)
    with pytest.raises(ValueError, match="sync"):
        fastmq.Queue.create("q", url=_url(ddir), sync="sometimes", **GEOMETRY)
    with pytest.raises(ValueError, match="sync_interval"):
        fastmq.Queue.create("q", url=_url(ddir), sync="interval", sync_interval=0, **GEOMETRY)
    with pytest.raises(ValueError, match="durable queues only"):
        fastmq.Queue.create(f"q{os.getpid()}", sync="commit", _backend="native", **GEOMETRY)
    with pytest.raises(ValueError):
        fastmq.Queue.create("../escape", url=_url(ddir), **GEOMETRY)
    with pytest.raises(NotImplementedError, match="exchanges"):
        fastmq.Exchange.create("ex", "direct", url=_url(ddir))
    assert os.listdir(ddir) == []


def test_handle_pickles_to_the_same_file(ddir):
    import pickle
    q = _create(ddir, "p", "commit")
    q2 = pickle.loads(pickle.dumps(q))
    q.put_bytes(W.payload(3))
    assert q2.get_bytes(timeout=5) == W.payload(3)
    q.close()
    q2.close()


def test_group_commit_shares_flushes_between_producers(ddir):
    """Four producer processes in sync="commit": every put returned after a
    flush covering it, and concurrent puts shared flushes (fewer flushes than
    puts), which is the point of group commit."""
    q = _create(ddir, "gc", "commit", maxsize=4096, capacity_bytes=8 << 20)
    n = 150
    logs = [os.path.join(ddir, f"p{k}.log") for k in range(4)]
    procs = [_spawn("producer", _url(ddir), "gc", logs[k], k * n, n) for k in range(4)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 0, err
    finally:
        _reap(procs)
    flushes = q.stats()["flushes"]
    q.close()
    assert 0 < flushes < 4 * n, flushes
    got, bad, _ = _check(_url(ddir), "gc")
    assert bad == [] and sorted(got) == list(range(4 * n))


def test_interval_put_flushes_when_the_last_flush_is_old(ddir):
    """sync="interval": the put that finds the last flush older than the
    interval flushes; puts within the interval do not."""
    q = fastmq.Queue.create("iv", url=_url(ddir), sync="interval", sync_interval=0.5,
                            **GEOMETRY)
    time.sleep(0.6)
    before = q.stats()["flushes"]
    q.put_bytes(b"b")                      # the last flush is older than 0.5 s
    mid = q.stats()["flushes"]
    for _ in range(20):
        q.put_bytes(b"c")                  # within the interval: no flush each
    after = q.stats()["flushes"]
    q.close()
    assert mid == before + 1
    assert after - mid <= 1                # at most one more, if 0.5 s passed meanwhile


_PUT_PATHS = {
    "put": lambda q: q.put({"k": 1}),
    "put_bytes": lambda q: q.put_bytes(b"x" * 10),
    "put_bytes_big": lambda q: q.put_bytes(b"x" * (20 << 10)),     # a block, not inline
    "put_bytearray": lambda q: q.put_bytes(bytearray(b"xy")),
    "put_many": lambda q: q.put_many([1, 2, 3]),
    "put_many_bytes": lambda q: q.put_many_bytes([b"a", b"b"]),
    "put_many_atomic": lambda q: q.put_many([1, 2], atomic=True),
    "put_many_bytes_atomic": lambda q: q.put_many_bytes([b"a", b"b"], atomic=True),
    "transaction": lambda q: _in_transaction(q),
    "reserve_commit": lambda q: _reserve_commit(q),
}


def _in_transaction(q):
    with q.transaction() as tx:
        tx.put(1)
        tx.put_bytes(b"2")


def _reserve_commit(q):
    with q.reserve(8) as buf:
        buf[:] = b"12345678"


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "authkey"])
@pytest.mark.parametrize("path", sorted(_PUT_PATHS))
def test_every_put_path_of_a_commit_queue_flushes_before_it_returns(ddir, path, keyed):
    """sync="commit": whichever call puts (single, batch, atomic batch,
    transaction, reservation; with or without an authkey, whose handles take
    other code paths), the file has been flushed by the time it returns."""
    if keyed and path == "reserve_commit":
        pytest.skip("a keyed handle refuses reservations (raw bytes bypass the MAC)")
    key = b"k" * 32 if keyed else None
    q = fastmq.Queue.create("every", url=_url(ddir), sync="commit", authkey=key, **GEOMETRY)
    try:
        before = q.stats()["flushes"]
        _PUT_PATHS[path](q)
        assert q.stats()["flushes"] > before, f"{path} returned before any flush"
    finally:
        q.close()
        fastmq.Queue.unlink("every", url=_url(ddir))


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "authkey"])
@pytest.mark.parametrize("path", sorted(_PUT_PATHS))
def test_every_put_path_meets_none_and_interval_the_same_way(ddir, path, keyed):
    """The put paths share one sync step: under sync="none" no path flushes;
    under sync="interval" none flushes while the last flush is recent, and
    each flushes once the interval is over."""
    if keyed and path == "reserve_commit":
        pytest.skip("a keyed handle refuses reservations (raw bytes bypass the MAC)")
    key = b"k" * 32 if keyed else None
    url = _url(ddir)
    for sync, interval in (("none", 1.0), ("interval", 60.0), ("interval", 0.2)):
        q = fastmq.Queue.create("paths", url=url, sync=sync, sync_interval=interval,
                                authkey=key, **GEOMETRY)
        try:
            if interval < 1:
                time.sleep(interval + 0.1)     # the create's flush is now too old
            before = q.stats()["flushes"]
            _PUT_PATHS[path](q)
            flushed = q.stats()["flushes"] - before
            if interval < 1:
                assert flushed == 1, (sync, interval, path, flushed)
            else:
                assert flushed == 0, (sync, interval, path, flushed)
            assert q.qsize() > 0
        finally:
            q.close()
            fastmq.Queue.unlink("paths", url=url)


def test_flush_words_left_in_a_closed_file_are_not_trusted(ddir):
    """The flush words (which commits are on disk) live in the file with the
    segment, but they are hints: an opener recomputes them. Words saying
    "everything is flushed" (all ones), written into a closed file, must not
    let a sync="commit" put return without its own flush."""
    q = _create(ddir, "fw", "commit")
    q.put_bytes(W.payload(1))
    q.close()
    (name,) = [f for f in os.listdir(ddir) if not f.startswith(".")]
    with open(os.path.join(ddir, name), "r+b") as f:
        f.seek(4096 - 768)                     # the flush words: the header page's tail
        f.write(b"\xff" * 768)
    q = fastmq.Queue.open("fw", url=_url(ddir))
    try:
        before = q.stats()["flushes"]
        q.put_bytes(W.payload(2))
        assert q.stats()["flushes"] == before + 1
        assert q.get_bytes(timeout=5) == W.payload(1)
        assert q.get_bytes(timeout=5) == W.payload(2)
    finally:
        q.close()


# ------------------------------------------------------------- kill -9

def _required(prod_logs, cons_log):
    returned = set()
    for log in prod_logs:
        returned |= _ids(log)[0]
    consumed, bad = _ids(cons_log)
    assert bad == [], bad
    return returned - consumed, returned, consumed


@pytest.mark.parametrize("sync", ["commit", "interval", "none"])
def test_kill9_at_random_moments_then_reopen_loses_nothing_committed(ddir, sync):
    """Producers and a consumer are SIGKILLed at random moments, over and
    over; after the last round nobody has the file open, and a fresh opener
    (a rebuild) must deliver every put that returned and was not acked,
    intact. (kill -9 keeps the page cache: every sync mode promises this.)"""
    q = _create(ddir, "k9", sync, maxsize=256, capacity_bytes=4 << 20)
    q.close()
    rng = random.Random(hash(sync) & 0xFFFF)
    url, logs, cons = _url(ddir), [], os.path.join(ddir, "consumed.log")
    next_id = 0
    for rnd in range(4):
        plog = [os.path.join(ddir, f"r{rnd}p{k}.log") for k in range(2)]
        logs += plog
        procs = [_spawn("producer", url, "k9", plog[k], next_id + k * 100000, 100000)
                 for k in range(2)]
        procs.append(_spawn("consumer", url, "k9", cons, rnd))
        next_id += 200000
        try:
            _wait_started(plog)
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            _reap(procs)
    required, returned, _ = _required(logs, cons)
    assert returned, "the producers never got a put in"
    got, bad, fig = _check(url, "k9")
    assert bad == []
    missing = required - set(got)
    assert not missing, f"lost {len(missing)} committed messages, e.g. {sorted(missing)[:10]}"
    assert set(got) <= returned | {i for i in set(got)}   # ids are real ones (parse checked)


CRASH_POINTS = [
    ("producer", "ring.commit.before_publish", 5),
    ("producer", "ring.commit.published", 7),
    ("producer", "durable.flush.before_sync", 4),
    ("producer", "durable.flush.synced", 6),
    ("consumer", "lease.take.filled", 3),
    ("consumer", "lease.take.leased", 5),
    ("consumer", "durable.flush.synced", 5),
]


@pytest.mark.parametrize("role,point,nth", CRASH_POINTS)
def test_kill9_at_crash_points_then_reopen_loses_nothing(ddir, role, point, nth):
    q = _create(ddir, "cp", "commit", maxsize=256, capacity_bytes=4 << 20)
    for i in range(20):                    # something for the consumer
        q.put_bytes(W.payload(i))
    q.close()
    url = _url(ddir)
    plog, cons = os.path.join(ddir, "p.log"), os.path.join(ddir, "c.log")
    env = {"FASTMQ_CRASH_AT": f"{point}:{nth}"}
    if role == "producer":
        victim = _spawn("producer", url, "cp", plog, 1000, 200, env=env)
    else:
        victim = _spawn("consumer", url, "cp", cons, 1, env=env)
    try:
        victim.communicate(timeout=60)
        assert victim.returncode == -signal.SIGKILL, "the crash point was never reached"
    finally:
        _reap([victim])
    returned = _ids(plog)[0] | set(range(20))
    consumed, bad = _ids(cons)
    assert bad == []
    got, bad, _ = _check(url, "cp")
    assert bad == []
    missing = (returned - consumed) - set(got)
    assert not missing, f"lost {sorted(missing)[:10]}"
    # kill -9 before the hand-over costs no message and duplicates none
    assert len(got) == len(set(got))


@pytest.mark.parametrize("point", ["durable.rebuild.leases", "durable.rebuild.scanned",
                                   "durable.rebuild.ring", "durable.rebuild.pool",
                                   "durable.rebuild.before_flush"])
def test_rebuild_killed_midway_is_simply_redone(ddir, point):
    """A first opener killed in the middle of its rebuild leaves a file the
    next opener rebuilds again: same messages, nothing torn."""
    q = _create(ddir, "rb", "commit", maxsize=128, capacity_bytes=4 << 20)
    for i in range(40):
        q.put_bytes(W.payload(i))
    for _ in range(10):                    # some consumed
        q.get_bytes(timeout=5)
    q.close()
    # and some leased by a consumer that is killed: dangling leases
    cons = _spawn("consumer", _url(ddir), "rb", os.path.join(ddir, "c.log"), 7)
    time.sleep(0.5)
    _reap([cons])
    consumed, _ = _ids(os.path.join(ddir, "c.log"))
    p = _spawn("check_one", _url(ddir), "rb", env={"FASTMQ_CRASH_AT": point})
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the rebuild never reached " + point
    got, bad, _ = _check(_url(ddir), "rb")
    assert bad == []
    missing = (set(range(10, 40)) - consumed) - set(got)
    assert not missing, sorted(missing)


# ------------------------------------------------------------- power loss

def _pages_written_since(flushed, current):
    """The pages of image `current` that differ from image `flushed`."""
    cur_pages, _ = W.data_pages(current)
    old_pages, _ = W.data_pages(flushed)
    return sorted(p for p in set(cur_pages) | set(old_pages)
                  if cur_pages.get(p) != old_pages.get(p))


def _recover_images(ddir, current, flushed, name, subsets):
    """Recover and drain, in a child, the image `current` with each subset of
    pages reverted to `flushed`: one result (ids, bad, figures) per subset."""
    spec = os.path.join(ddir, "spec.json")
    work = os.path.join(ddir, "work")
    os.makedirs(work)
    with open(spec, "w") as f:
        json.dump({"current": current, "flushed": flushed, "name": name, "workdir": work,
                   "subsets": subsets}, f)
    p = _spawn("check_images", spec)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, f"recovery crashed (rc {p.returncode}): {err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])

def _power_loss_round(ddir, sync, rng, crash_env=None):
    """One crash: producers and a consumer run with flush images on, are
    killed (or die at a crash point), then every power-loss image built from
    the crash state and the last completed flush is recovered. Returns the
    figures and the violations."""
    name = "pl"
    url = _url(ddir)
    imgs = os.path.join(ddir, "images")
    os.makedirs(imgs)
    q = _create(ddir, name, sync, maxsize=32, capacity_bytes=1 << 20)
    q.close()
    base_image = os.path.join(ddir, "created.img")
    with open(os.path.join(ddir, name + ".fmq"), "rb") as f:   # fdatasync'ed by create
        pages, size = W.data_pages(f.name)
    W.write_image(base_image, size, pages)
    env = {"FASTMQ_FLUSH_IMAGES": imgs}
    plogs = [os.path.join(ddir, f"p{k}.log") for k in range(2)]
    cons = os.path.join(ddir, "c.log")
    penv = dict(env, **(crash_env or {}))
    procs = [_spawn("producer", url, name, plogs[0], 0, 100000, env=penv),
             _spawn("producer", url, name, plogs[1], 1000000, 100000, env=env),
             _spawn("consumer", url, name, cons, rng.randrange(1000), env=env)]
    try:
        _wait_started(plogs[1:])
        time.sleep(rng.uniform(0.05, 0.5))
    finally:
        _reap(procs)
    current = os.path.join(ddir, "current.img")
    pages, size = W.data_pages(os.path.join(ddir, name + ".fmq"))
    W.write_image(current, size, pages)
    flushed = sorted((f for f in os.listdir(imgs) if f.startswith("flush-")),
                     key=lambda f: int(f.rsplit("-", 1)[1].split(".")[0]))
    last = os.path.join(imgs, flushed[-1]) if flushed else base_image
    if sync == "none":
        last = base_image                  # no flush promised anything since creation
    diff = _pages_written_since(last, current)
    subsets = [[], list(diff)]
    subsets += [[p] for p in rng.sample(diff, min(8, len(diff)))]
    subsets += [[p for p in diff if rng.random() < 0.5] for _ in range(24)]
    work = os.path.join(ddir, "work")
    results = _recover_images(ddir, current, last, name, subsets)

    returned = set().union(*(_ids(lg)[0] for lg in plogs))
    consumed, bad_consumed = _ids(cons)
    if sync == "commit":
        required = returned - consumed
    elif sync == "interval":
        # every message the last completed flush holds (all of "diff" back to
        # it: that image is the flush itself), unless consumed since
        required = set(results[1].get("ids", ())) - consumed if "ids" in results[1] else set()
    else:
        required = set()
    violations = []
    if bad_consumed:
        violations.append(f"a consumer saw torn messages: {bad_consumed[:3]}")
    kept = dropped = 0
    for n, res in enumerate(results):
        if "error" in res:
            violations.append(f"image {n}: recovery raised {res['error']}")
            continue
        kept += res["kept"]
        dropped += res["dropped"]
        if res["bad"]:
            violations.append(f"image {n}: delivered torn/corrupt records {res['bad'][:3]}")
        missing = required - set(res["ids"])
        if missing:
            violations.append(f"image {n} ({len(subsets[n])} of {len(diff)} pages reverted): "
                              f"lost {len(missing)} messages the {sync!r} mode keeps, e.g. "
                              f"{sorted(missing)[:5]}")
        if res["pending_left"]:
            violations.append(f"image {n}: {res['pending_left']} leases left after a drain")
    import shutil
    for d in (imgs, work):
        shutil.rmtree(d, ignore_errors=True)
    for f in os.listdir(ddir):
        os.unlink(os.path.join(ddir, f))
    return {"images": len(results), "pages_diff": len(diff), "kept": kept,
            "dropped": dropped, "required": len(required), "returned": len(returned)}, violations


@pytest.mark.parametrize("sync", ["commit", "interval", "none"])
def test_simulated_power_loss_keeps_what_the_sync_mode_promises(ddir, sync):
    """Power loss, simulated: the file's pages at the crash, with any subset
    of those written since the last completed flush reverted to their content
    at that flush (images taken by the flusher itself, FASTMQ_FLUSH_IMAGES).
    Recovery never crashes, never delivers a torn record, and keeps: for
    "commit" every put that returned, for "interval" everything the last
    completed flush held, for "none" nothing in particular (consumed or acked
    messages may come back in every mode)."""
    rng = random.Random({"commit": 1, "interval": 2, "none": 3}[sync])
    totals = {"images": 0, "kept": 0, "dropped": 0, "rounds": 0, "pages_diff": 0}
    violations = []
    crash_points = [None, {"FASTMQ_CRASH_AT": "durable.flush.synced:9"},
                    {"FASTMQ_CRASH_AT": "ring.commit.published:13"}, None]
    for crash in crash_points:
        if sync == "none" and crash and "flush" in crash["FASTMQ_CRASH_AT"]:
            crash = None                   # no flushes to crash in
        fig, v = _power_loss_round(ddir, sync, rng, crash)
        violations += v
        totals["rounds"] += 1
        for k in ("images", "kept", "dropped", "pages_diff"):
            totals[k] += fig[k]
    print(f"\npower-loss simulation sync={sync!r}: {totals['rounds']} crashes, "
          f"{totals['images']} images tried ({totals['pages_diff']} pages written since the "
          f"last flush, summed), records kept {totals['kept']}, dropped {totals['dropped']}, "
          f"violations {len(violations)}")
    assert violations == [], violations[:10]


@pytest.mark.parametrize("point", ["lease.take.filled", "lease.take.leased"])
@pytest.mark.parametrize("shape", ["block", "inline-entry-across-pages"])
def test_power_loss_after_a_lease_keeps_the_message_in_every_page_mix(ddir, point, shape):
    """The pages a lease changes (its slot, its entry, its block's word) can
    each be lost to a power loss on their own. A consumer is killed filling
    the entry or having filled it, before the flush that lets it free the
    slot; every mix of the pages written since the last flush must recover
    the message. A recovery that trusted the words of the dead consumer
    over the records loses it: for a message in a block, by freeing the
    block the slot still names; for an inline one whose entry spans two
    pages (one of them lost, so the entry fails its check), by taking the
    entry's word for a finished move and freeing the slot."""
    name = "lm"
    path = os.path.join(ddir, name + ".fmq")
    flushed = os.path.join(ddir, "flushed.img")
    current = os.path.join(ddir, "current.img")
    q = _create(ddir, name, "commit", maxsize=32, capacity_bytes=1 << 20)
    try:
        if shape == "block":
            mid = 10
            q.put_bytes(W.payload(2))      # 5000 bytes each: blocks of one size
            q.put_bytes(W.payload(mid))    # returned: on disk, the last flush
            pages, size = W.data_pages(path)
            W.write_image(flushed, size, pages)
            assert W.parse(q.get_bytes(timeout=5)) == 2   # its block: free, still warm
        else:
            mid = 6                        # 224 bytes: inline
            for i in range(100, 112):
                q.put_bytes(W.payload(i))
            q.put_bytes(W.payload(mid))
            for _ in range(12):            # entries 0-11 used: the next lease takes
                q.get_message(timeout=5).ack()   # entry 12, 3840..4160 of the table
            q.flush()
            pages, size = W.data_pages(path)
            W.write_image(flushed, size, pages)
        # Killed with the entry LEASED, before the flush the move waits for
        # (our handle stays open: the consumer's open is no rebuild).
        victim = _spawn("consumer", _url(ddir), name, os.path.join(ddir, "c.log"), 0,
                        env={"FASTMQ_CRASH_AT": point + ":1"})
        try:
            victim.communicate(timeout=60)
            assert victim.returncode == -signal.SIGKILL, "the crash point was never reached"
        finally:
            _reap([victim])
        pages, size = W.data_pages(path)   # the power goes now
        W.write_image(current, size, pages)
    finally:
        q.close()
    diff = _pages_written_since(flushed, current)
    assert 2 <= len(diff) <= 10, diff      # the slot, the entry, the block word, hints
    subsets = [[p for k, p in enumerate(diff) if bits >> k & 1] for bits in range(1 << len(diff))]
    # Recovered over a second after the lease: a freed block then has no
    # recent demand keeping it warm, so a block freed by mistake is punched.
    time.sleep(2.2)
    results = _recover_images(ddir, current, flushed, name, subsets)
    lost = [(subsets[n], res) for n, res in enumerate(results)
            if "error" in res or res["bad"] or mid not in res["ids"]]
    assert lost == [], (f"{len(lost)} of {len(subsets)} images lost the leased message: "
                        f"{lost[:3]} (pages written since the flush: {diff})")


# ------------------------------------------------------------- corruption

def _closed_queue(ddir, n=40):
    q = _create(ddir, "cq", "commit", maxsize=64, capacity_bytes=1 << 20)
    for i in range(n):
        q.put_bytes(W.payload(i))
    q.close()
    return os.path.join(ddir, "cq.fmq")


def _open_and_drain_in_child(ddir):
    p = _spawn("check_one", _url(ddir), "cq")
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("recovery of a corrupted file hung")
    assert p.returncode in (0, 1), f"recovery crashed (rc {p.returncode}): {err[-1500:]}"
    if p.returncode == 1:
        assert "CorruptQueue" in err, err[-1500:]
        return None
    return json.loads(out.strip().splitlines()[-1])


def test_random_corruption_of_a_closed_file_never_crashes_or_hangs(ddir):
    """Bytes flipped, pages scribbled, the file truncated: each trial either
    raises CorruptQueue or delivers intact records only, losing at most one
    record per damaged spot (a record's own bytes), never more."""
    rng = random.Random(5)
    path = _closed_queue(ddir)
    pristine, size = W.data_pages(path)
    outcomes = {"corrupt": 0, "opened": 0}
    for trial in range(36):
        W.write_image(path, size, pristine)
        kind = trial % 3
        with open(path, "r+b") as f:
            if kind == 0:                  # bytes somewhere in the written pages
                spots = rng.randint(1, 4)
                for _ in range(spots):
                    page = rng.choice(sorted(pristine))
                    f.seek(page * 4096 + rng.randrange(4096))
                    f.write(bytes([rng.randrange(256)]))
            elif kind == 1:                # a whole page of garbage
                spots = 1
                page = rng.choice(sorted(pristine))
                f.seek(page * 4096)
                f.write(os.urandom(4096) if rng.random() < 0.5 else bytes(4096))
            else:                          # truncated (or grown)
                spots = 0
                f.truncate(rng.choice([0, 100, 4096, size // 2, size - 4096, size + 4096]))
        res = _open_and_drain_in_child(ddir)
        if res is None:
            outcomes["corrupt"] += 1
            continue
        outcomes["opened"] += 1
        assert res["bad"] == [], (trial, res["bad"])
        assert kind != 2, "a file of the wrong size must be refused"
        missing = set(range(40)) - set(res["ids"])
        assert len(missing) <= spots, (trial, kind, sorted(missing))
        assert len(res["ids"]) == len(set(res["ids"]))
    print(f"\ncorruption trials: {outcomes}")
    assert outcomes["corrupt"] >= 12       # every truncation at least


def test_corrupted_payload_drops_exactly_that_record(ddir):
    path = _closed_queue(ddir)
    pristine, size = W.data_pages(path)
    victim = 17                            # 5000 bytes: a block of its own
    needle = W.payload(victim)[:60]        # its id and size, then its body
    blob = open(path, "rb").read()
    at = blob.find(needle)
    assert at > 0 and blob.find(needle, at + 1) < 0
    with open(path, "r+b") as f:
        f.seek(at + 5)
        f.write(bytes([blob[at + 5] ^ 0xFF]))
    res = _open_and_drain_in_child(ddir)
    assert res is not None and res["bad"] == []
    assert sorted(res["ids"]) == [i for i in range(40) if i != victim]
    assert res["dropped"] == 1


def test_header_page_damage_is_repaired_from_the_superblock(ddir):
    path = _closed_queue(ddir)
    with open(path, "r+b") as f:
        f.write(os.urandom(4096))          # the segment header page
    res = _open_and_drain_in_child(ddir)
    assert res is not None and sorted(res["ids"]) == list(range(40))


def test_one_damaged_superblock_is_survived_both_are_refused(ddir):
    path = _closed_queue(ddir)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 3 * 4096 + 100)      # superblock A
        f.write(b"\xff" * 8)
    res = _open_and_drain_in_child(ddir)
    assert res is not None and sorted(res["ids"]) == list(range(40))
    with open(path, "r+b") as f:
        f.seek(size - 2 * 4096 + 100)      # and now B too
        f.write(b"\xff" * 8)
        f.seek(size - 3 * 4096 + 100)
        f.write(b"\xff" * 8)
    assert _open_and_drain_in_child(ddir) is None


def test_files_that_are_not_queues_of_this_version_are_corrupt_queue(ddir):
    path = os.path.join(ddir, "cq.fmq")
    for content in (b"", b"hello", os.urandom(5 * 4096), bytes(64 * 4096)):
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(fastmq.CorruptQueue):
            fastmq.Queue.open("cq", url=_url(ddir))
    os.unlink(path)
    path = _closed_queue(ddir)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:           # another format version, both copies
        for k in (3, 2):
            f.seek(size - k * 4096 + 8)
            f.write((99).to_bytes(4, "little"))
    with pytest.raises(fastmq.CorruptQueue):
        fastmq.Queue.open("cq", url=_url(ddir))


@pytest.mark.parametrize("planted", ["symlink", "fifo", "directory"])
def test_a_name_whose_file_is_no_regular_file_is_refused_and_no_link_followed(ddir, planted):
    """What is planted at a durable queue's path -- a symbolic link to another
    queue's file, a FIFO, a directory -- is refused with a typed error naming
    that path (without hanging on the FIFO); no link is followed, so the queue
    it points at keeps its message and its file's bytes."""
    real = _create(ddir, "real", "commit")
    real.put_bytes(b"kept")
    real.close()
    victim = os.path.join(ddir, "real.fmq")
    before = open(victim, "rb").read()
    path = os.path.join(ddir, "planted.fmq")
    if planted == "symlink":
        os.symlink(victim, path)
        expect, words = fastmq.CorruptQueue, "is a symbolic link, not a queue"
    elif planted == "fifo":
        os.mkfifo(path)
        expect, words = fastmq.CorruptQueue, "is not a regular file"
    else:
        os.mkdir(path)
        expect, words = IsADirectoryError, "cannot open the file of durable queue"
    for attempt in (lambda: fastmq.Queue.open("planted", url=_url(ddir)),
                    lambda: fastmq.Queue.create("planted", url=_url(ddir), exist_ok=True)):
        with pytest.raises(expect) as info:
            attempt()
        assert words in str(info.value)
        assert (path if planted != "directory" else "planted") in str(info.value)
    assert open(victim, "rb").read() == before
    q = fastmq.Queue.open("real", url=_url(ddir))
    try:
        assert q.get_bytes(timeout=5) == b"kept"
    finally:
        q.close()


# ------------------------------------------------------------- mixed laps

def _ring_offset(path):
    with open(path, "rb") as f:
        head = f.read(96)
    return int.from_bytes(head[88:96], "little")


def _mixed_lap_image(ddir):
    """A disk state only a power loss makes: the first ring page from a flush
    taken a lap (and more) before the rest of the ring. Returns the queue's
    url and the ids whose slots are in the newer pages."""
    url = _url(ddir)
    q = fastmq.Queue.create("mx", url=url, sync="none", maxsize=64, max_message_size=32 << 10,
                            capacity_bytes=1 << 20)
    path = os.path.join(ddir, "mx.fmq")
    for i in range(64):
        q.put_bytes(W.payload(i))
    q.flush()
    old, size = W.data_pages(path)         # the flush: lap 0 in every slot
    for i in range(64):
        q.get_bytes(timeout=5)
    for i in range(64, 128):
        q.put_bytes(W.payload(i))          # lap 1
    for i in range(32):
        q.get_bytes(timeout=5)
    for i in range(128, 160):
        q.put_bytes(W.payload(i))          # lap 2 in slots 0..31
    q.close()
    cur, _ = W.data_pages(path)
    first = _ring_offset(path) // 4096
    cur[first] = old[first]                # slots 0..15 back to lap 0 (ids 0..15)
    W.write_image(path, size, cur)
    return url, set(range(96, 128)) | set(range(144, 160))


def test_records_of_different_laps_are_compacted_in_ticket_order(ddir):
    url, newer = _mixed_lap_image(ddir)
    got, bad, fig = _check(url, "mx")
    assert bad == []
    assert got == sorted(got), "not in ticket order"
    assert newer <= set(got)
    assert set(got) - newer <= set(range(16))    # the older page's own records, if intact
    got2, bad2, _ = _check(url, "mx")            # and it stays a valid queue, now empty
    assert got2 == [] and bad2 == []


@pytest.mark.parametrize("point", ["durable.journal.written", "durable.journal.applied"])
def test_compaction_killed_midway_is_finished_by_the_next_opener(ddir, point):
    url, newer = _mixed_lap_image(ddir)
    p = _spawn("check_one", url, "mx", env={"FASTMQ_CRASH_AT": point})
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the compaction never reached " + point
    got, bad, _ = _check(url, "mx")
    assert bad == [] and got == sorted(got) and newer <= set(got)
    assert not os.path.exists(os.path.join(ddir, "mx.fmq.rebuild"))


# ------------------------------------------------------------- the CLI

def test_cli_ls_stat_rm_on_a_file_location(ddir):
    q = _create(ddir, "alpha", "interval")
    q.put_bytes(W.payload(1))
    q.close()
    with open(os.path.join(ddir, "junk.fmq"), "wb") as f:
        f.write(b"not a queue")
    env = dict(os.environ, FASTMQ_BACKEND="native")
    env.pop("FASTMQ_URL", None)

    def cli(*a):
        return subprocess.run([sys.executable, "-m", "fastmq", *a, "--url", _url(ddir)],
                              env=env, capture_output=True, text=True, timeout=60)
    res = cli("ls", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["queues"]}
    assert rows["alpha"]["depth"] == 1 and rows["alpha"]["sync"] == "interval"
    assert rows["junk"]["status"].startswith("error: CorruptQueue")
    res = cli("stat", "alpha")
    assert res.returncode == 0 and "depth" in res.stdout, res.stderr
    res = cli("rm", "alpha")
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(os.path.join(ddir, "alpha.fmq"))
    res = cli("rm", "alpha")
    assert res.returncode == 1 and "alpha" in res.stderr


def test_creator_killed_before_the_link_leaves_nothing_that_opens(ddir):
    """A creator killed after writing its file but before linking it into
    place: the name does not exist (never a half-made queue), and the next
    create removes the dead creator's temporary file and succeeds."""
    code = ("import fastmq, sys; fastmq.Queue.create('cr', url=sys.argv[1], maxsize=8, "
            "max_message_size=4096, capacity_bytes=1 << 20)")
    env = dict(os.environ, FASTMQ_BACKEND="native", FASTMQ_CRASH_AT="durable.create.before_link")
    res = subprocess.run([sys.executable, "-c", code, _url(ddir)], env=env, timeout=60,
                         capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert [n for n in os.listdir(ddir) if ".tmp-" in n], "the crash left no temporary file?"
    with pytest.raises(fastmq.QueueNotFound):
        fastmq.Queue.open("cr", url=_url(ddir))
    q = fastmq.Queue.create("cr", url=_url(ddir), maxsize=8, max_message_size=4096,
                            capacity_bytes=1 << 20)
    q.close()
    assert sorted(os.listdir(ddir)) == ["cr.fmq"]


def test_openers_racing_after_a_crash_rebuild_once_and_share_the_backlog(ddir):
    """Three processes open a file nobody has open at the same moment: one
    rebuilds (the others wait for it on the init lock, then find it
    registered), and between them they deliver every message exactly once."""
    q = _create(ddir, "race", "commit", maxsize=256, capacity_bytes=4 << 20)
    for i in range(120):
        q.put_bytes(W.payload(i))
    q.close()
    procs = [_spawn("check_one", _url(ddir), "race") for _ in range(3)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        _reap(procs)
    ids = [i for r in results for i in r["ids"]]
    assert all(r["bad"] == [] for r in results)
    assert sorted(ids) == list(range(120)), "lost or duplicated"
    assert sum(1 for r in results if r["kept"]) == 1, [r["kept"] for r in results]
