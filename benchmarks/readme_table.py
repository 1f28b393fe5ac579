"""Print the README's "Benchmarks" tables (Markdown) from a ``fastmq bench --json`` file.

    PYTHONPATH=src python benchmarks/readme_table.py benchmarks/results/bench.json

Prints: the main table (one row per scenario, one column per peer, with each
scenario's harness ceiling), the message-size sweep (MB/s), the producer x
consumer scaling sweep (msg/s) and the memory of one queue -- all from the one
run in the file, with its date, machine and load.
"""
from __future__ import annotations

import json
import sys

from fastmq._bench import report


def _sweep(doc, sweep):
    scens, cols, rows = report.sweep_matrix(doc, sweep)
    if len(scens) < 2:
        return []
    size = sweep == "size"
    out = ["| peer | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    ceil = []
    for s in scens:
        c = doc.get("ceilings", {}).get(s["id"])
        if not c:
            ceil.append("-")
        elif size:
            ceil.append(report.rate_text(c["msgs_per_s"] * s["size"]))
        else:
            ceil.append(report.human(c["msgs_per_s"]))
    out.append("| *harness ceiling* | " + " | ".join(f"*{c}*" for c in ceil) + " |")

    def value(m):
        return report.rate_text(m["bytes_per_s"]) if size else report.human(m["msgs_per_s"])
    for label, row in rows:
        vals = [report.sweep_cell(c, value, failed=str) for c in row]
        name = f"**{label}**" if label.startswith("fastmq") else label
        out.append(f"| {name} | " + " | ".join(vals) + " |")
    return out


def _memory(doc):
    cells = [c for c in doc["cells"] if c["scenario"] == "memory" and c["status"] == "ok"]
    if not cells:
        return []
    out = ["| peer | RSS, new | /dev/shm mapped, new | RSS after 4096 msgs | /dev/shm mapped after |",
           "|---|---:|---:|---:|---:|"]
    for c in cells:
        m = c["median"]
        out.append(f"| {c['label']} | {report.nbytes(m['rss_created'])} | "
                   f"{report.nbytes(m['shm_created'])} | {report.nbytes(m['rss_used'])} | "
                   f"{report.nbytes(m['shm_used'])} |")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "benchmarks/results/bench.json"
    with open(path) as f:
        doc = json.load(f)
    m = doc["machine"]
    print(f"From `{doc['command']}` on {doc['date']}: {m['cpus']} CPUs ({m['cpu']}), "
          f"Python {m['python']}, fastmq {m['fastmq']} ({m['backend']}); load average "
          f"{m.get('loadavg_1min_at_start')} at start, {m.get('loadavg_1min_at_end', '?')} at "
          f"end; median of {doc['repeat']} runs. Every message verified. *Harness ceiling* = "
          "the same loops with a no-op queue; ~ = within 2x of it. Bold = fastmq, with its "
          "ratio to the best other peer.")
    print()
    print(report.markdown_table(doc))
    for title, lines in (("Message-size sweep (1 producer x 1 consumer, raw bytes)",
                          _sweep(doc, "size")),
                         ("Producer x consumer scaling (64 B raw bytes, msg/s)",
                          _sweep(doc, "scaling")),
                         ("Memory of one queue (64 B messages, bound 1024)", _memory(doc))):
        if lines:
            print()
            print(f"**{title}**")
            print()
            print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
