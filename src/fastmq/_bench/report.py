"""Presenting results: the text table, the JSON document and the optional chart."""
from __future__ import annotations

import json
import math

from .peers import BASELINE


def human(x, unit=""):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def ratio(x):
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x" if x >= 100 else f"{x:.1f}x"


def nbytes(x):
    """Bytes as B / KiB / MiB / GiB."""
    if x is None:
        return "-"
    for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suffix}"
    return f"{x:.0f} B"


def size_text(size):
    return nbytes(size).replace(".0 ", " ")


def rate_text(bytes_per_s):
    """MB/s below 1 GB/s, GB/s above."""
    if bytes_per_s is None:
        return "-"
    return f"{bytes_per_s / 1e9:.2f} GB/s" if bytes_per_s >= 1e9 else f"{bytes_per_s / 1e6:.3g} MB/s"


def flag_harness_bound(cells: list, ceiling) -> None:
    """Mark the cells that run within 2x of the harness's own ceiling."""
    if not ceiling:
        return
    for c in cells:
        if c["status"] != "ok":
            continue
        if "msgs_per_s" in ceiling and c["kind"] == "throughput":
            c["harness_bound"] = 2 * c["median"]["msgs_per_s"] > ceiling["msgs_per_s"]
        elif "round_trip_us" in ceiling and c["kind"] == "pingpong":
            c["harness_bound"] = c["median"]["p50_us"] < 2 * ceiling["round_trip_us"]


def add_ratios(cells: list) -> None:
    """Fill ``vs_baseline`` and ``vs_best_other`` of the successful cells of one
    scenario (higher = better; for latency the speed-up, i.e. baseline / value)."""
    ok = [c for c in cells if c["status"] == "ok"]
    for c in ok:
        c["vs_baseline"] = c["vs_best_other"] = None
    if not ok or ok[0]["kind"] == "memory":
        return
    latency = ok[0]["kind"] == "pingpong"
    key = "p50_us" if latency else "msgs_per_s"

    def score(c):                     # bigger is better
        v = c["median"][key]
        return (1.0 / v if v else 0.0) if latency else v
    base = next((c for c in ok if c["peer"] == BASELINE), None)
    for c in ok:
        if base is not None and score(base):
            c["vs_baseline"] = score(c) / score(base)
        others = [score(o) for o in ok if o is not c]
        if others and max(others):
            c["vs_best_other"] = score(c) / max(others)


def _ceiling_text(scen, ceiling):
    if not ceiling:
        return ""
    if "round_trip_us" in ceiling:
        return f"harness ceiling: the loop alone takes {ceiling['round_trip_us']:.2f} µs a round trip"
    extra = ""
    if scen["mode"] != "pickle" and scen["size"]:
        extra = f" = {rate_text(ceiling['msgs_per_s'] * scen['size'])}"
    return (f"harness ceiling {human(ceiling['msgs_per_s'])} msgs/s{extra} (producer loop "
            f"{ceiling['producer_ns']:.0f} ns, consumer loop {ceiling['consumer_ns']:.0f} ns a "
            f"message, {ceiling['cores']} cores)")


def _stops_text(stops):
    return (f"each CPU stops running a busy process {stops['per_cpu_per_s']:,.0f} times a "
            f"second for >= 5 µs (median stop {stops['median_us']:.1f} µs, p99 "
            f"{stops['p99_us']:.0f} µs; interrupts, and on a virtual machine the hypervisor)")


def machine_bound_tail(doc, p50_us) -> bool:
    """Whether a ping-pong whose round trip takes ``p50_us`` has more than 0.1% of
    its round trips hit by a stop of one of the two CPUs it runs on (the
    reference's ``cpu_stops``): then its p99.9 is at least such a stop long,
    whatever the channel."""
    stops = doc.get("reference", {}).get("cpu_stops")
    return bool(stops) and 2 * stops["per_cpu_per_s"] * p50_us * 1e-6 > 0.001


def _pingpong_row(label, md, lo, hi, runs, bound, tail_mark, ratios):
    spread = f"{lo['p50_us']:.1f}..{hi['p50_us']:.1f}" if runs > 1 else "-"
    return (f"  {label:<34} {md['p50_us']:>8.1f}{bound} {md['p99_us']:>9.1f} "
            f"{md['p999_us']:>8.1f}{tail_mark} {spread:>13}" + ratios)


def _cells(doc, sid):
    return [c for c in doc["cells"] if c["scenario"] == sid]


def _scenario_table(doc, scen, lines):
    cells = _cells(doc, scen["id"])
    ceiling = doc.get("ceilings", {}).get(scen["id"])
    lines.append("")
    lines.append(f"== {scen['id']}: {scen['title']}")
    if ceiling:
        lines.append(f"   {_ceiling_text(scen, ceiling)}")
    kind = scen["kind"]
    if kind == "pingpong":
        lines.append(f"  {'peer':<34} {'p50 µs':>9} {'p99 µs':>9} {'p99.9 µs':>9} "
                     f"{'p50 spread':>13} {'vs mp.Queue':>11} {'vs best other':>13}")
    elif kind == "memory":
        lines.append(f"  {'peer':<34} {'RSS, new':>10} {'shm, new':>10} "
                     f"{'RSS, used':>10} {'shm, used':>10}")
    else:
        lines.append(f"  {'peer':<34} {'msgs/s':>9} {'spread':>15} {'MB/s':>9} "
                     f"{'vs mp.Queue':>11} {'vs best other':>13}")
    mailbox = (ceiling or {}).get("mailbox")
    if kind == "pingpong" and mailbox:
        label = f"({mailbox['label']})"
        if mailbox["status"] == "ok":
            md = mailbox["median"]
            lines.append(_pingpong_row(label, md, mailbox["min"], mailbox["max"], doc["repeat"],
                                       " ", "†" if machine_bound_tail(doc, md["p50_us"]) else " ",
                                       ""))
        else:
            lines.append(f"  {label:<34} {mailbox['status'].upper()}: {mailbox.get('error')}")
    for c in cells:
        label = c["label"] + (" *" if c.get("one_by_one") else "")
        if c["status"] == "n/a":
            lines.append(f"  {label:<34} n/a: {c['error']}")
            continue
        if c["status"] != "ok":
            lines.append(f"  {label:<34} {c['status'].upper()}: {c['error']}")
            continue
        md, lo, hi = c["median"], c["min"], c["max"]
        bound = "~" if c.get("harness_bound") else " "
        if kind == "pingpong":
            tail = "†" if machine_bound_tail(doc, md["p50_us"]) else " "
            lines.append(_pingpong_row(label, md, lo, hi, len(c["runs"]), bound, tail,
                                       f" {ratio(c['vs_baseline']):>11} "
                                       f"{ratio(c['vs_best_other']):>13}"))
        elif kind == "memory":
            lines.append(f"  {label:<34} {nbytes(md['rss_created']):>10} "
                         f"{nbytes(md['shm_created']):>10} {nbytes(md['rss_used']):>10} "
                         f"{nbytes(md['shm_used']):>10}")
        else:
            spread = (f"{human(lo['msgs_per_s'])}..{human(hi['msgs_per_s'])}"
                      if len(c["runs"]) > 1 else "-")
            mbs = md.get("bytes_per_s")
            mbs = f"{mbs / 1e6:.0f}" if mbs else "-"
            lines.append(f"  {label:<34} {human(md['msgs_per_s']):>8}{bound} {spread:>15} "
                         f"{mbs:>9} {ratio(c['vs_baseline']):>11} "
                         f"{ratio(c['vs_best_other']):>13}")
    if any(c.get("one_by_one") for c in cells):
        lines.append("  * no batch API: sends and receives one message at a time")
    if any(c.get("harness_bound") for c in cells):
        lines.append("  ~ within 2x of the harness ceiling: may be bound by the harness")
    if kind == "pingpong" and doc.get("reference", {}).get("cpu_stops"):
        lines.append("  † more than 0.1% of these round trips meet a stop of one of their two "
                     "CPUs (see reference): whatever the channel, p99.9 cannot be below the "
                     "machine's stops")
    if kind == "memory":
        lines.append("  RSS = resident memory of the creating process; shm = /dev/shm mapped, "
                     "i.e. address space whose pages are touched lazily (fastmq maps its whole "
                     "byte pool, capacity_bytes, which the bench sizes at 2 x bound x (message "
                     "+ 64 KiB)); kernel buffers (pipes, sockets, message queues) are not "
                     "counted")


def sweep_matrix(doc, sweep):
    """(column titles, [(label, [cell or None])]) of one sweep, peers in run order."""
    def member(s):
        if s["kind"] != "throughput" or s["mode"] != "bytes":
            return False
        if sweep == "size":
            return s["producers"] == s["consumers"] == 1
        return s["size"] == 64           # the scaling sweep includes 1x1
    scens = [s for s in doc["scenarios"] if member(s)]
    if sweep == "size":
        scens.sort(key=lambda s: s["size"])
        cols = [size_text(s["size"]) for s in scens]
    else:
        scens.sort(key=lambda s: (s["producers"] * s["consumers"], s["producers"]))
        cols = [f"{s['producers']}x{s['consumers']}" for s in scens]
    peers = []
    for c in doc["cells"]:
        if any(c["scenario"] == s["id"] for s in scens) and c["peer"] not in [p for p, _ in peers]:
            peers.append((c["peer"], c["label"]))
    rows = []
    for peer, label in peers:
        row = []
        for s in scens:
            hit = [c for c in _cells(doc, s["id"]) if c["peer"] == peer]
            row.append(hit[0] if hit else None)
        rows.append((label, row))
    return scens, cols, rows


def sweep_cell(c, value, failed=str.upper) -> str:
    """One cell of a sweep table (a cell of ``sweep_matrix`` or None): '-' not
    run, 'n/a' cannot carry, ``failed(status)`` for a failure, else
    ``value(median)`` with '~' when within 2x of the harness ceiling."""
    if c is None:
        return "-"
    if c["status"] == "n/a":
        return "n/a"
    if c["status"] != "ok":
        return failed(c["status"])
    return value(c["median"]) + ("~" if c.get("harness_bound") else "")


def _sweep_tables(doc, lines):
    scens, cols, rows = sweep_matrix(doc, "size")
    if len(scens) > 1:
        lines.append("")
        lines.append("== message-size sweep: 1 producer x 1 consumer, raw bytes; MB/s "
                     "(median; n/a = cannot carry, - = not run; ~ = within 2x of the "
                     "harness ceiling)")
        lines.append(f"  {'peer':<30}" + "".join(f"{c:>9}" for c in cols))
        lines.append(f"  {'harness ceiling':<30}" + "".join(
            f"{doc['ceilings'][s['id']]['msgs_per_s'] * s['size'] / 1e6:>9.0f}"
            if s["id"] in doc.get("ceilings", {}) else f"{'-':>9}" for s in scens))
        for label, row in rows:
            out = [sweep_cell(c, lambda m: f"{m['bytes_per_s'] / 1e6:.0f}") for c in row]
            lines.append(f"  {label:<30}" + "".join(f"{x:>9}" for x in out))
        for label, row in rows:
            why = sorted({c["error"] for c in row if c and c["status"] == "n/a"})
            if why:
                lines.append(f"  n/a for {label}: {why[0]}" + (" (and others)" if len(why) > 1 else ""))
    scens, cols, rows = sweep_matrix(doc, "scaling")
    if len(scens) > 1:
        lines.append("")
        lines.append(f"== producer x consumer scaling: 64 B raw bytes, msgs/s (median), "
                     f"{doc['machine']['cpus']} CPUs")
        lines.append(f"  {'peer':<30}" + "".join(f"{c:>9}" for c in cols))
        lines.append(f"  {'harness ceiling':<30}" + "".join(
            f"{human(doc['ceilings'][s['id']]['msgs_per_s']):>9}"
            if s["id"] in doc.get("ceilings", {}) else f"{'-':>9}" for s in scens))
        for label, row in rows:
            out = [sweep_cell(c, lambda m: human(m["msgs_per_s"])) for c in row]
            lines.append(f"  {label:<30}" + "".join(f"{x:>9}" for x in out))
        lines.append("  - = the peer does not do this shape (Pipe: one pair; iceoryx2 "
                     "publish-subscribe: one consumer)")


def format_table(doc: dict) -> str:
    lines = []
    m, ref = doc["machine"], doc["reference"]
    lines.append(f"fastmq bench  {doc['date']}  ({doc['command']})")
    lines.append(f"machine: {m['platform']}, {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, "
                 f"fastmq {m['fastmq']} backend {m['backend']}; load average (1 min) at start "
                 f"{m.get('loadavg_1min_at_start')}, at end {m.get('loadavg_1min_at_end', '?')} "
                 "(other work on the machine skews results)")
    lines.append(f"reference: single-core memcpy {ref['memcpy_bytes_per_s'] / 1e9:.2f} GB/s; "
                 f"bare Python call {ref['python_call_ns']:.0f} ns "
                 f"(= {human(ref['python_call_msgs_per_s'])} calls/s)"
                 + (f"; {_stops_text(ref['cpu_stops'])}" if ref.get("cpu_stops") else ""))
    lines.append(f"method: median of {doc['repeat']} run(s)"
                 + (", spread = min..max" if doc["repeat"] > 1 else "")
                 + f"; ~{doc['target_seconds']:.2g} s per run; barrier start; every message "
                 "verified")
    for note in doc.get("notes", []):
        lines.append(f"note: {note}")
    for scen in doc["scenarios"]:
        if scen.get("detail", True) and _cells(doc, scen["id"]):
            _scenario_table(doc, scen, lines)
    _sweep_tables(doc, lines)
    for s in doc.get("skipped", []):
        lines.append(f"skipped: {s}")
    failures = [c for c in doc["cells"] if c["status"] not in ("ok", "n/a")]
    lines.append("")
    if failures:
        lines.append(f"FAILED: {len(failures)} cell(s) did not verify or did not finish:")
        for c in failures:
            lines.append(f"  {c['scenario']} / {c['label']}: {c['status']}: {c['error']}")
    else:
        ok = [c for c in doc["cells"] if c["status"] == "ok"]
        n = sum(c.get("verified_messages", 0) for c in ok)
        lines.append(f"all {len(ok)} cells verified: {n:,} messages, none lost, "
                     "duplicated, reordered or corrupted")
    return "\n".join(lines)


def markdown_table(doc: dict) -> str:
    """The README's table: one row per scenario of the detailed set, one column per peer."""
    scens = [s for s in doc["scenarios"] if s.get("detail", True) and s["kind"] != "memory"
             and _cells(doc, s["id"])]
    peers = []
    for c in doc["cells"]:
        if c["peer"] not in [p for p, _ in peers] and not c["peer"].startswith("fastmq-"):
            peers.append((c["peer"], c["label"]))
    out = ["| scenario | harness ceiling | " + " | ".join(l for _, l in peers) + " |",
           "|---|---:|" + "---:|" * len(peers)]
    for s in scens:
        ceiling = doc.get("ceilings", {}).get(s["id"])
        big = s["size"] >= (1 << 20)
        if s["kind"] == "pingpong":
            cell_text = (lambda c: f"{c['median']['p50_us']:.1f} µs")
            ctext = f"{ceiling['round_trip_us']:.2f} µs" if ceiling else "-"
            name = f"{s['id']} (p50 round trip)"
            out.append(_markdown_row(doc, s, name, ctext, cell_text, peers))
            mailbox = (ceiling or {}).get("mailbox")
            cell_text = (lambda c: f"{c['median']['p999_us']:.1f} µs"
                         + ("†" if machine_bound_tail(doc, c["median"]["p50_us"]) else ""))
            ctext = (f"no queue: {mailbox['median']['p999_us']:.1f} µs"
                     if mailbox and mailbox["status"] == "ok" else "-")
            name = f"{s['id']} (p99.9 round trip)"
            out.append(_markdown_row(doc, s, name, ctext, cell_text, peers, with_ratio=False))
            continue
        elif big:
            cell_text = (lambda c: rate_text(c["median"]["bytes_per_s"]))
            ctext = rate_text(ceiling["msgs_per_s"] * s["size"]) if ceiling else "-"
            name = s["id"]
        else:
            cell_text = (lambda c: f"{human(c['median']['msgs_per_s'])} msg/s")
            ctext = f"{human(ceiling['msgs_per_s'])} msg/s" if ceiling else "-"
            name = s["id"]
        out.append(_markdown_row(doc, s, name, ctext, cell_text, peers))
    return "\n".join(out)


def _markdown_row(doc, s, name, ctext, cell_text, peers, with_ratio=True):
    row = []
    for peer, _ in peers:
        hit = [c for c in _cells(doc, s["id"]) if c["peer"] == peer]
        if not hit:
            row.append("-")
        elif hit[0]["status"] == "n/a":
            row.append("n/a")
        elif hit[0]["status"] != "ok":
            row.append(hit[0]["status"])
        else:
            c = hit[0]
            t = cell_text(c) + ("~" if c.get("harness_bound") else "")
            if c["peer"] == "fastmq":
                t = f"**{t}**" + (f" ({ratio(c['vs_best_other'])})"
                                  if with_ratio and c.get("vs_best_other") else "")
            row.append(t)
    return f"| {name} | {ctext} | " + " | ".join(row) + " |"


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")


def _colors(peers):
    palette = ["tab:gray", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown",
               "tab:pink", "tab:olive", "tab:cyan"]
    out, i = {}, 0
    for p in peers:
        if p.startswith("fastmq"):
            out[p] = "tab:red"
        else:
            out[p] = palette[i % len(palette)]
            i += 1
    return out


def _bar_panel(ax, doc, scen, colors, whiskers):
    cells = [c for c in _cells(doc, scen["id"]) if c["status"] == "ok"]
    ceiling = doc.get("ceilings", {}).get(scen["id"])
    kind = scen["kind"]
    y = list(range(len(cells)))
    names = [c["label"] for c in cells]
    if kind == "memory":
        vals = [max(c["median"]["rss_used"] + c["median"]["shm_used"], 1) for c in cells]
        ax.barh(y, vals, color=[colors[c["peer"]] for c in cells], height=0.7)
        ax.set_xscale("log")
        for yi, c, v in zip(y, cells, vals):
            ax.text(v * 1.1, yi, f"RSS {nbytes(c['median']['rss_used'])}, "
                    f"shm {nbytes(c['median']['shm_used'])}", va="center", fontsize=6)
        ax.set_xlabel("bytes of one queue after 4096 messages (RSS + /dev/shm mapped), "
                      "log scale", fontsize=7)
        ax.set_xlim(min(vals) / 2, max(vals) * 60)
    else:
        latency = kind == "pingpong"
        big = not latency and scen["size"] >= (1 << 20)
        if latency:
            key, scale, unit = "p50_us", 1.0, "µs"
        elif big:
            key, scale, unit = "bytes_per_s", 1e-9, "GB/s"
        else:
            key, scale, unit = "msgs_per_s", 1.0, "msg/s"
        vals = [c["median"][key] * scale for c in cells]
        xerr = None
        if whiskers:
            xerr = [[v - c["min"][key] * scale for v, c in zip(vals, cells)],
                    [c["max"][key] * scale - v for v, c in zip(vals, cells)]]
        ax.barh(y, vals, xerr=xerr, color=[colors[c["peer"]] for c in cells], capsize=2,
                height=0.7)
        ax.set_xscale("log")
        cval = None
        if ceiling:
            cval = (ceiling["round_trip_us"] if latency else
                    ceiling["msgs_per_s"] * (scen["size"] * scale if big else 1.0))
            ax.axvline(cval, color="black", linestyle="--", linewidth=0.8)
            ax.text(cval, -0.75, " harness ceiling", fontsize=6, va="bottom",
                    ha="right" if latency else "left")
        mailbox = (ceiling or {}).get("mailbox") if latency else None
        extra = []
        if mailbox and mailbox["status"] == "ok":
            mval = mailbox["median"]["p50_us"]
            extra.append(mval)
            ax.axvline(mval, color="black", linestyle=":", linewidth=0.8)
            ax.text(mval, -0.75, " no queue", fontsize=6, va="bottom", ha="left")
        if latency:                    # the tails, as ticks on the same axis
            tails = [c["median"]["p999_us"] for c in cells]
            extra += tails
            ax.plot(tails, y, linestyle="none", marker="|", color="black", markersize=7,
                    label="p99.9")
            ax.legend(fontsize=6, loc="upper right")
        for yi, v, c in zip(y, vals, cells):
            at = max(v, c["max"][key] * scale) if whiskers else v    # right of the whisker
            if latency:
                at = max(at, c["median"]["p999_us"])                    # and of the tail tick
            r = c.get("vs_baseline")
            if latency:
                text = f"{v:.1f} µs, p99.9 {c['median']['p999_us']:.0f} µs"
            elif big:
                text = f"{v:.2f} GB/s"
            else:
                text = human(v)
            text += (f"  ({ratio(r)} vs mp.Queue)" if r and c["peer"] != BASELINE else "")
            text += "  ~harness-bound" if c.get("harness_bound") else ""
            ax.text(at * 1.1, yi, text, va="center", fontsize=6)
        lo = min(vals + extra + ([cval] if cval else []))
        hi = max(vals + extra + ([cval] if cval else []))
        ax.set_xlim(lo / 2, hi * 40)
        ax.set_xlabel(("round trip in µs (bars p50, ticks p99.9), lower is better" if latency else
                       f"{unit}, higher is better") + ", log scale", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=6.5)
    ax.set_ylim(max(len(cells), 5) - 0.5, -1.2)
    short = scen["title"].split(", ", 1)[-1] if scen["kind"] != "memory" else "memory per queue"
    ax.set_title(f"{scen['id']}: {short}", fontsize=7.5)
    ax.tick_params(axis="x", labelsize=6.5)


def _sweep_panel(ax, doc, sweep, colors):
    scens, cols, rows = sweep_matrix(doc, sweep)
    x = list(range(len(scens)))
    size = sweep == "size"
    ceil = []
    for s in scens:
        c = doc.get("ceilings", {}).get(s["id"])
        ceil.append(None if not c else c["msgs_per_s"] * (s["size"] / 1e6 if size else 1))
    if any(v is not None for v in ceil):
        ax.plot([xi for xi, v in zip(x, ceil) if v], [v for v in ceil if v], "k--",
                linewidth=0.9, label="harness ceiling")
    peer_of = {}
    for c in doc["cells"]:
        peer_of.setdefault(c["label"], c["peer"])
    for label, row in rows:
        pts = [(xi, (c["median"]["bytes_per_s"] / 1e6 if size else c["median"]["msgs_per_s"]))
               for xi, c in zip(x, row) if c and c["status"] == "ok"]
        if not pts:
            continue
        peer = peer_of.get(label, label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                linewidth=2.2 if peer.startswith("fastmq") else 1.2,
                color=colors.get(peer, "tab:gray"), label=label)
    ax.set_yscale("log")
    tops = [c["median"]["bytes_per_s"] / 1e6 if size else c["median"]["msgs_per_s"]
            for _, row in rows for c in row if c and c["status"] == "ok"]
    if tops:                     # the ceiling may run far above: show the peers
        ax.set_ylim(min(tops) / 3, max(tops) * 8)
    ax.set_xticks(x)
    ax.set_xticklabels(cols, fontsize=6.5)
    ax.tick_params(axis="y", labelsize=6.5)
    if size:
        ax.set_title("message-size sweep, 1 producer x 1 consumer, raw bytes", fontsize=7.5)
        ax.set_ylabel("MB/s (log scale), higher is better", fontsize=7)
        ax.set_xlabel("message size (missing point = cannot carry it, e.g. posix mq "
                      "above the kernel's msgsize_max)", fontsize=7)
    else:
        ax.set_title(f"producer x consumer scaling, 64 B, {doc['machine']['cpus']} CPUs",
                     fontsize=7.5)
        ax.set_ylabel("msg/s (log scale)", fontsize=7)
        ax.set_xlabel("producers x consumers", fontsize=7)
        ax.yaxis.set_major_formatter(_human_formatter())
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=6, loc="best", ncol=2)


def _human_formatter():
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda v, _pos: human(v))


def plot(doc: dict, path: str) -> None:
    """The chart: a panel per detailed scenario (log scale), the size sweep and
    the scaling sweep as lines; needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib, or "
                           "pip install 'fastmq[bench]')") from exc
    ok = {c["scenario"] for c in doc["cells"] if c["status"] == "ok"}
    panels = [s for s in doc["scenarios"] if s.get("detail", True) and s["id"] in ok]
    sweeps = [w for w in ("size", "scaling")
              if sum(1 for s in sweep_matrix(doc, w)[0] if s["id"] in ok) > 1]
    if not panels and not sweeps:
        raise RuntimeError("nothing to plot: no scenario has a successful cell")
    colors = _colors(list(dict.fromkeys(c["peer"] for c in doc["cells"])))
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    srows = 1 if sweeps else 0
    fig = plt.figure(figsize=(6.0 * cols, 3.0 * rows + 4.2 * srows))
    grid = fig.add_gridspec(rows + srows, cols, height_ratios=[3.0] * rows + [4.2] * srows)
    whiskers = doc["repeat"] >= 3
    for i, scen in enumerate(panels):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        _bar_panel(ax, doc, scen, colors, whiskers)
        if scen["kind"] != "memory":
            ax.xaxis.set_major_formatter(_human_formatter())
    if sweeps:
        if len(sweeps) == 2:
            _sweep_panel(fig.add_subplot(grid[rows, 0:2]), doc, "size", colors)
            _sweep_panel(fig.add_subplot(grid[rows, 2]), doc, "scaling", colors)
        else:
            _sweep_panel(fig.add_subplot(grid[rows, :]), doc, sweeps[0], colors)
    m = doc["machine"]
    if whiskers:
        spread = f"median of {doc['repeat']}, whiskers min..max"
    else:
        spread = ("one run a cell" if doc["repeat"] == 1 else
                  f"median of {doc['repeat']}") + ", no whiskers"
    fig.suptitle(f"fastmq bench, {doc['date']}: {m['cpus']} CPUs, Python {m['python']}, "
                 f"load {m.get('loadavg_1min_at_start')} ({spread}; dashed = harness ceiling; "
                 "~ = within 2x of it)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
