"""What the MAC of ``authkey=`` costs by itself, per compression function.

Times ``fmq_mac_oneshot`` (the tag of one message, from the keyed state) in
a C loop without the GIL, for each compression this CPU runs, so the
figures hold none of the per-message Python or queue work around it: the
floor of what a key adds to each side of a put/get. The best of several
repeats is reported (the least disturbed by other processes).

    python benchmarks/mac_speed.py [--sizes 64,1024,1048576] [--repeats 20]

Compare with ``benchmarks/auth_cost.py`` (the whole put/get, keyed and not).
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from fastmq._core import _mac_path, _mac_select, _mac_time  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,1024,1048576")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    best = _mac_path()
    print(f"compression chosen by the CPU: {best}")
    try:
        for path in ("portable", "avx2", "avx512"):
            try:
                _mac_select(path)
            except ValueError:
                print(f"  {path:8} (this CPU cannot run it)")
                continue
            cells = []
            for size in sizes:
                n = max(1, (1 << 22) // max(size, 128))     # ~4 MiB hashed per repeat
                t = min(_mac_time(size, n) for _ in range(args.repeats))
                cells.append(f"{size:>8} B {t / n * 1e9:10.1f} ns/tag {size * n / t / 1e9:6.2f} GB/s")
            print(f"  {path:8} " + "  ".join(cells))
    finally:
        _mac_select(None)


if __name__ == "__main__":
    main()
