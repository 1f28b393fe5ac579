"""The C core's files are layered: each calls only files below it.

The order is written once, in LAYERS below (fmq_internal.h draws the same
picture for readers). The check reads csrc/*.c as text: it finds every
function a file defines (not static), then every call a file makes to a
function another file defines -- directly, or through a static inline helper
of a header -- and fails on any call to a file on the same layer or above.
Where a lower layer needs a higher one it calls through ``r->up`` (the
upcall table fmq_region.c fills), which is no call to another file's name.

A new C file must be given a layer here before it may call anything.
"""
from __future__ import annotations

import os
import re

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

# Bottom first. A file may call files on lower lines only.
LAYERS: list[tuple[str, ...]] = [
    ("fmq_base.c",),                  # errors, clock, crash points
    ("fmq_wait.c", "fmq_mac.c"),      # futex shim + waiter handshake; MAC
    ("fmq_live.c",),                  # participants: who is alive
    ("fmq_pool.c",),                  # blocks and segment memory
    ("fmq_ring.c",),                  # the slot ring
    ("fmq_lease.c",),                 # in-flight entries
    ("fmq_recover.c",),               # crash recovery
    ("fmq_region.c",),                # open/create/close, fork handler
    ("fmq_selftest.c",),              # the C self-test
]

# Where the extern data of the core lives: only that file or a file above
# it may name it.
DATA = {"fmq_crash_spec": "fmq_base.c", "fmq_fork_generation": "fmq_base.c"}

_DEF = re.compile(
    r"^(?!static\b)[A-Za-z_][\w \t\*]*?\b(fmq_\w+)\s*\([^;{}]*\)\s*\{", re.M)
_INLINE = re.compile(r"^static\s+inline\b[^;{}(]*?\b(fmq_\w+)\s*\([^;{}]*\)\s*\{", re.M)
_CALL = re.compile(r"\b(fmq_\w+)\s*\(")


def _strip(src: str) -> str:
    """Source without comments and string literals (newlines kept)."""
    src = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), src, flags=re.S)
    src = re.sub(r"//[^\n]*", "", src)
    return re.sub(r'"(?:\\.|[^"\\\n])*"', '""', src)


def _body_at(src: str, brace: int) -> str:
    """The text of the block whose opening brace is at index brace."""
    depth = 0
    for i in range(brace, len(src)):
        if src[i] == "{":
            depth += 1
        elif src[i] == "}":
            depth -= 1
            if depth == 0:
                return src[brace:i + 1]
    return src[brace:]


def layer_violations(sources: dict[str, str], headers: dict[str, str],
                     layers: list[tuple[str, ...]]) -> list[str]:
    """Every call (file -> function of another file) that goes sideways or up."""
    rank = {f: i for i, group in enumerate(layers) for f in group}
    problems = [f"{f}: no layer in LAYERS" for f in sorted(sources) if f not in rank]
    code = {f: _strip(s) for f, s in sources.items()}
    owner: dict[str, str] = {}
    for f, s in code.items():
        for m in _DEF.finditer(s):
            owner[m.group(1)] = f
    # static inline helpers of the headers: what out-of-line functions they call
    inline_calls: dict[str, set[str]] = {}
    for h in headers.values():
        hs = _strip(h)
        for m in _INLINE.finditer(hs):
            body = _body_at(hs, hs.index("{", m.end() - 1))
            inline_calls[m.group(1)] = set(_CALL.findall(body))
    for f, s in sorted(code.items()):
        if f not in rank:
            continue
        called = set(_CALL.findall(s))
        for name in list(called):
            called |= inline_calls.get(name, set())
        for name in sorted(called):
            g = owner.get(name)
            if g is None or g == f or g not in rank:
                continue
            if rank[g] >= rank[f]:
                problems.append(f"{f} calls {name} of {g}: "
                                f"{'same layer' if rank[g] == rank[f] else 'upward'}")
        for name, home in DATA.items():
            if home != f and re.search(rf"\b{name}\b", s) and rank[home] >= rank[f]:
                problems.append(f"{f} uses {name} of {home}: upward")
    return problems


def _read(ext: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(CSRC)):
        if name.endswith(ext):
            with open(os.path.join(CSRC, name)) as f:
                out[name] = f.read()
    return out


def test_c_files_call_only_lower_layers():
    sources = _read(".c")
    assert set(sources) >= {"fmq_ring.c", "fmq_pool.c", "fmq_lease.c", "fmq_recover.c",
                            "fmq_live.c", "fmq_region.c"}
    problems = layer_violations(sources, _read(".h"), LAYERS)
    assert not problems, "calls against the layer order:\n  " + "\n  ".join(problems)


def test_every_layer_exists():
    """A layer naming a file that is gone would hide a renamed one."""
    sources = _read(".c")
    missing = [f for group in LAYERS for f in group if f not in sources]
    assert not missing, f"LAYERS names files csrc/ lacks: {missing}"


@pytest.mark.parametrize("case", ["upward", "sideways", "via-inline", "unplaced"])
def test_the_check_sees_each_kind_of_wrong_call(case):
    """The checker itself, on small made-up sources: each kind of call it must
    refuse is refused, and the allowed downward call is not."""
    layers = [("low.c",), ("mid.c", "side.c"), ("top.c",)]
    sources = {
        "low.c": "int fmq_low(void) { return 0; }\n",
        "mid.c": "/* fmq_top() in a comment is no call */\n"
                 "int fmq_mid(void) { return fmq_low(); }\n",
        "side.c": "int fmq_side(void) { return 1; }\n",
        "top.c": "int fmq_top(void) { return fmq_mid() + fmq_low(); }\n",
    }
    headers: dict[str, str] = {}
    assert layer_violations(sources, headers, layers) == []
    if case == "upward":
        sources["low.c"] += "static int f(void) { return fmq_top(); }\n"
        expect = "low.c calls fmq_top of top.c: upward"
    elif case == "sideways":
        sources["mid.c"] += "static int f(void) { return fmq_side(); }\n"
        expect = "mid.c calls fmq_side of side.c: same layer"
    elif case == "via-inline":
        headers["x.h"] = "static inline int fmq_helper(int a) {\n    return fmq_mid() + a;\n}\n"
        sources["low.c"] += "static int f(void) { return fmq_helper(1); }\n"
        expect = "low.c calls fmq_mid of mid.c: upward"
    else:
        sources["new.c"] = "int fmq_new(void) { return fmq_low(); }\n"
        expect = "new.c: no layer in LAYERS"
    assert expect in layer_violations(sources, headers, layers)
