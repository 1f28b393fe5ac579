"""Is a process alive? -- for the pure backend's participant and in-flight
tables, which name a process by pid plus its start time (so a reused pid is
not mistaken for the process that died)."""
from __future__ import annotations

import os


def start_time(pid):
    """Process start time in clock ticks (guards against pid reuse), or 0."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19]) & 0xFFFFFFFF
    except (OSError, ValueError, IndexError):
        return 0


def alive(pid, start):
    """True unless process ``pid`` is gone, or is another process than the
    one that started at ``start`` (0: not known, not compared)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start == 0 or start_time(pid) in (0, start)
