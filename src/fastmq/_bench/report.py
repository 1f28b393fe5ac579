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


def add_ratios(cells: list) -> None:
    """Fill ``vs_baseline`` and ``vs_best_other`` of the successful cells of one
    scenario (higher = better; for latency the speed-up, i.e. baseline / value)."""
    ok = [c for c in cells if c["status"] == "ok"]
    for c in ok:
        c["vs_baseline"] = c["vs_best_other"] = None
    if not ok:
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


def format_table(doc: dict) -> str:
    lines = []
    m, ref = doc["machine"], doc["reference"]
    lines.append(f"fastmq bench  {doc['date']}  ({doc['command']})")
    lines.append(f"machine: {m['platform']}, {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, "
                 f"fastmq {m['fastmq']} backend {m['backend']}; load average at start "
                 f"{m.get('loadavg_1min_at_start')} (other work on the machine skews results)")
    lines.append(f"reference: single-core memcpy {ref['memcpy_bytes_per_s'] / 1e9:.2f} GB/s; "
                 f"bare Python call {ref['python_call_ns']:.0f} ns "
                 f"(= {human(ref['python_call_msgs_per_s'])} calls/s); the harness's own "
                 f"per-message verification {ref.get('verify_ns', float('nan')):.0f} ns (64 B)")
    lines.append(f"method: median of {doc['repeat']} run(s), spread = min..max; "
                 f"~{doc['target_seconds']:.2g} s per run; barrier start; every message verified")
    for note in doc.get("notes", []):
        lines.append(f"note: {note}")
    for scen in doc["scenarios"]:
        cells = [c for c in doc["cells"] if c["scenario"] == scen["id"]]
        if not cells:
            continue
        lines.append("")
        lines.append(f"== {scen['id']}: {scen['title']}")
        if scen["kind"] == "pingpong":
            lines.append(f"  {'peer':<30} {'p50 us':>9} {'p99 us':>9} {'p99.9 us':>9} "
                         f"{'p50 spread':>15} {'vs mp.Queue':>11} {'vs best other':>13}")
        else:
            lines.append(f"  {'peer':<30} {'msgs/s':>9} {'spread':>15} {'MB/s':>9} "
                         f"{'vs mp.Queue':>11} {'vs best other':>13}")
        for c in cells:
            label = c["label"] + (" *" if c.get("one_by_one") else "")
            if c["status"] != "ok":
                lines.append(f"  {label:<30} {c['status'].upper()}: {c['error']}")
                continue
            md, lo, hi = c["median"], c["min"], c["max"]
            if scen["kind"] == "pingpong":
                spread = f"{lo['p50_us']:.1f}..{hi['p50_us']:.1f}"
                lines.append(f"  {label:<30} {md['p50_us']:>9.1f} {md['p99_us']:>9.1f} "
                             f"{md['p999_us']:>9.1f} {spread:>15} {ratio(c['vs_baseline']):>11} "
                             f"{ratio(c['vs_best_other']):>13}")
            else:
                spread = f"{human(lo['msgs_per_s'])}..{human(hi['msgs_per_s'])}"
                mbs = md.get("bytes_per_s")
                mbs = f"{mbs / 1e6:.0f}" if mbs else "-"
                lines.append(f"  {label:<30} {human(md['msgs_per_s']):>9} {spread:>15} {mbs:>9} "
                             f"{ratio(c['vs_baseline']):>11} {ratio(c['vs_best_other']):>13}")
        if any(c.get("one_by_one") for c in cells):
            lines.append("  * no batch API: sends and receives one message at a time")
    for s in doc.get("skipped", []):
        lines.append(f"skipped: {s}")
    failures = [c for c in doc["cells"] if c["status"] != "ok"]
    lines.append("")
    if failures:
        lines.append(f"FAILED: {len(failures)} cell(s) did not verify or did not finish:")
        for c in failures:
            lines.append(f"  {c['scenario']} / {c['label']}: {c['status']}: {c['error']}")
    else:
        n = sum(c.get("verified_messages", 0) for c in doc["cells"])
        lines.append(f"all {len(doc['cells'])} cells verified: {n:,} messages, none lost, "
                     "duplicated, reordered or corrupted")
    return "\n".join(lines)


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")


def plot(doc: dict, path: str) -> None:
    """A chart of every scenario (one panel each); needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib, or "
                           "pip install 'fastmq[bench]')") from exc
    scens = [s for s in doc["scenarios"]
             if any(c["scenario"] == s["id"] and c["status"] == "ok" for c in doc["cells"])]
    if not scens:
        raise RuntimeError("nothing to plot: no scenario has a successful cell")
    cols = 3
    rows = (len(scens) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat[len(scens):]:
        ax.axis("off")
    for ax, scen in zip(axes.flat, scens):
        cells = [c for c in doc["cells"] if c["scenario"] == scen["id"] and c["status"] == "ok"]
        latency = scen["kind"] == "pingpong"
        key = "p50_us" if latency else "msgs_per_s"
        names = [c["label"] for c in cells]
        vals = [c["median"][key] for c in cells]
        lo = [c["median"][key] - c["min"][key] for c in cells]
        hi = [c["max"][key] - c["median"][key] for c in cells]
        colors = ["tab:red" if c["peer"] == "fastmq" else "tab:gray" for c in cells]
        y = range(len(cells))
        ax.barh(list(y), vals, xerr=[lo, hi], color=colors, capsize=2, height=0.7)
        ax.set_yticks(list(y))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_ylim(max(len(cells), 5) - 0.5, -0.5)     # top to bottom, same bar size
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human(v)))
        top = max(v + h for v, h in zip(vals, hi)) or 1
        ax.set_xlim(0, top * 1.35)
        for yi, v, h, c in zip(y, vals, hi, cells):
            r = c.get("vs_baseline")
            text = (f"{v:.1f} us" if latency else human(v)) + (f"  ({ratio(r)})" if r else "")
            ax.text(v + h + top * 0.02, yi, text, va="center", fontsize=6)
        short = scen["title"].split(", ", 1)[-1]
        ax.set_title(f"{scen['id']}: {short}", fontsize=8)
        ax.set_xlabel("round trip p50 in us, lower is better (x = speed-up vs mp.Queue)"
                      if latency else "messages/s, higher is better (x = vs mp.Queue)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    m = doc["machine"]
    fig.suptitle(f"fastmq bench, {doc['date']}: {m['cpus']} CPUs, Python {m['python']} "
                 f"(median of {doc['repeat']}, whiskers min..max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
