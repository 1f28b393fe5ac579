"""A lint of csrc/ for "one place each" and "words that are true".

* Packed words are decoded only through the accessors of csrc/fmq_words.h:
  no other file shifts or masks a participant ident, owner tag, slot stamp or
  free-stack top by hand.
* The waiter handshake is written once (fmq_wait.c/h): nobody else touches a
  wait line's waiter count or calls the futex wait, and no slice length is a
  bare literal.
* One message size limit: FMQ_MAX_MESSAGE, defined once, equal to what a
  32-bit length field records.
* Every atomic of the core names its memory order (no implicit seq_cst), and
  in fmq_lease.c and fmq_recover.c every acquire, release, acq_rel or seq_cst
  carries a [tag] whose pair a header comment of the core explains.
* Comments name only files the repository has.

Each check also runs on a made-up snippet of the thing it forbids, so a
pattern that no longer matches anything would fail here instead of passing
silently.
"""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
# The self-test is a multi-threaded harness over process-private memory, not
# part of the core's shared-memory protocol; it keeps C11's defaults.
HARNESS = {"fmq_selftest.c"}


def _sources() -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(CSRC)):
        if name.endswith((".c", ".h")):
            with open(os.path.join(CSRC, name)) as f:
                out[name] = f.read()
    return out


def _code(src: str) -> str:
    """Source without comments (newlines kept, so line numbers hold)."""
    src = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def _hits(pattern: re.Pattern, text: str) -> list[int]:
    return [text.count("\n", 0, m.start()) + 1 for m in pattern.finditer(text)]


# ---------------------------------------------------------------- packed words

HAND_DECODING = {
    "participant state": r"&\s*0xFFFF(?:u|ull)?\b(?!F)",
    "participant ident bits": r"~\s*0xFFFFull",
    "generation mask": r"\(\s*1u\s*<<\s*FMQ_GEN_BITS\s*\)",
    "tag index/generation shift": r"(?:<<|>>)\s*FMQ_GEN_BITS",
    "slot word shift": r"(?:<<|>>)\s*FMQ_OWNER_BITS",
    "owner mask": r"&\s*FMQ_OWNER_MASK",
    "stamp mask": r"\(\s*1ull\s*<<\s*\(?\s*FMQ_STAMP_BITS",
    "ident field shift": r"\bid\w*\s*>>\s*(?:16|32)\b",
    "free-stack tag": r"\(\s*\(\s*cur\s*>>\s*32\s*\)\s*\+\s*1\s*\)\s*<<\s*32",
}
WORD_HOMES = {"fmq_words.h", "fmq_layout.h"}


def _hand_decoded(sources: dict[str, str]) -> list[str]:
    problems = []
    for name, text in sources.items():
        if name in WORD_HOMES or name in HARNESS:
            continue
        code = _code(text)
        for what, pat in HAND_DECODING.items():
            for line in _hits(re.compile(pat), code):
                problems.append(f"{name}:{line}: {what} decoded by hand")
    return problems


def test_packed_words_are_decoded_only_by_the_accessors():
    problems = _hand_decoded(_sources())
    assert not problems, "use fmq_words.h:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("snippet", [
    "uint32_t gen = (uint32_t)(id >> 16) & ((1u << FMQ_GEN_BITS) - 1);",
    "if ((id & 0xFFFF) == FMQ_PART_ACTIVE)",
    "store(&p->ident, (id & ~0xFFFFull) | FMQ_PART_FREE);",
    "uint32_t idx = owner >> FMQ_GEN_BITS;",
    "uint64_t stamp = w >> FMQ_OWNER_BITS;",
    "uint32_t owner = (uint32_t)(w & FMQ_OWNER_MASK);",
    "next = (s & ((1ull << FMQ_STAMP_BITS) - 1)) << 24;",
    "pid = (uint32_t)(ident >> 32);",
    "want = (((cur >> 32) + 1) << 32) | next;",
])
def test_the_word_check_sees_hand_decoding(snippet):
    assert _hand_decoded({"x.c": "void f(void) {\n" + snippet + "\n}\n"})


# ---------------------------------------------------------------- waiting

def _handshake_problems(sources: dict[str, str]) -> list[str]:
    problems = []
    for name, text in sources.items():
        code = _code(text)
        if name not in ("fmq_wait.c", "fmq_wait.h"):
            for line in _hits(re.compile(r"\bfmq_wait_on\s*\("), code):
                problems.append(f"{name}:{line}: futex wait outside fmq_waitline_sleep")
            if name != "fmq_layout.h":
                for line in _hits(re.compile(r"(?:->|\.)\s*waiters\b"), code):
                    problems.append(f"{name}:{line}: a wait line's waiter count touched")
        if name not in HARNESS:
            for i, ln in enumerate(code.splitlines(), 1):
                if re.search(r"\b100000000ull\b", ln) and not ln.lstrip().startswith("#define"):
                    problems.append(f"{name}:{i}: a bare 100 ms literal (use FMQ_SLICE_NS)")
    return problems


def test_the_waiter_handshake_is_written_once():
    problems = _handshake_problems(_sources())
    assert not problems, "\n  ".join(problems)
    wait_h = _sources()["fmq_wait.h"]
    assert re.search(r"#define FMQ_SLICE_NS\b", wait_h)
    assert "fmq_waitline_wake" in wait_h and "fmq_waitline_sleep" in wait_h


@pytest.mark.parametrize("snippet", [
    "atomic_fetch_add_explicit(&wl->waiters, 1, memory_order_seq_cst);",
    "rc = fmq_wait_on(&wl->epoch, epoch, slice);",
    "uint64_t slice = 100000000ull;",
])
def test_the_handshake_check_sees_a_second_copy(snippet):
    assert _handshake_problems({"fmq_lease.c": "void f(void) {\n" + snippet + "\n}\n"})


# ---------------------------------------------------------------- one limit

def test_one_max_message_size_matching_the_length_fields():
    sources = _sources()
    defs = [(n, m.group(1)) for n, t in sources.items()
            for m in re.finditer(r"^#define\s+FMQ_MAX_MESSAGE\s+(\S+)", t, re.M)]
    assert defs == [("fmq_layout.h", "0xFFFFFFFFull")], defs
    layout = sources["fmq_layout.h"]
    assert re.search(r"_Static_assert\(FMQ_MAX_MESSAGE == \(uint32_t\)-1", layout)
    for name, text in sources.items():
        code = _code(text)
        assert not re.search(r"\bnbytes\s*>\s*UINT32_MAX\b", code), name
        assert not re.search(r"max_message_size\s*>\s*(?!FMQ_MAX_MESSAGE\b)\(?1ull", code), name


# ---------------------------------------------------------------- memory orders

_IMPLICIT = re.compile(
    r"\batomic_(?:load|store|exchange|fetch_[a-z]+|compare_exchange_(?:strong|weak))\s*\(")


def test_every_atomic_of_the_core_names_its_order():
    problems = []
    for name, text in _sources().items():
        if name in HARNESS:
            continue
        for line in _hits(_IMPLICIT, _code(text)):
            problems.append(f"{name}:{line}")
    assert not problems, "implicit seq_cst (use the _explicit form and say why):\n  " + \
        "\n  ".join(problems)


_ORDER = re.compile(r"memory_order_(acquire|release|acq_rel|seq_cst)")
_TAG = re.compile(r"\[([ARS])-([a-z]+)\]")


def _unlabelled(text: str) -> list[int]:
    """Lines whose non-relaxed order has no [X-tag] in its statement, or in
    the comment lines just above the statement."""
    lines = text.splitlines()
    bad = []
    for i, ln in enumerate(lines):
        if not _ORDER.search(_code(ln)):
            continue
        # the statement: back to the line after the previous ';', '{' or '}'
        start = i
        while start > 0 and not re.search(r"[;{}]\s*(/\*.*\*/)?\s*$", _code(lines[start - 1])):
            start -= 1
        end = i
        while end < len(lines) - 1 and not re.search(r"[;{]\s*(/\*.*\*/)?\s*$",
                                                      _code(lines[end])):
            end += 1
        above = start
        while above > 0 and lines[above - 1].lstrip().startswith(("/*", "*")):
            above -= 1
        if not _TAG.search("\n".join(lines[above:end + 1])):
            bad.append(i + 1)
    return bad


def _header(text: str) -> str:
    return text[: text.find("*/")] if text.lstrip().startswith("/*") else ""


@pytest.mark.parametrize("name", ["fmq_lease.c", "fmq_recover.c"])
def test_memory_orders_carry_their_partner_tag(name):
    sources = _sources()
    text = sources[name]
    bad = _unlabelled(text)
    assert not bad, f"{name}: orders without an [A-/R-/S-] tag on lines {bad}"
    explained = "".join(_header(t) for t in sources.values())
    unknown = sorted({m.group(0) for m in _TAG.finditer(text)} -
                     {m.group(0) for m in _TAG.finditer(explained)})
    assert not unknown, f"{name}: tags no header comment explains: {unknown}"


def test_the_tag_check_sees_a_bare_order():
    text = ("void f(void) {\n"
            "    uint64_t w = atomic_load_explicit(&e->word, memory_order_acquire);\n"
            "    /* [A-mine] */\n"
            "    uint64_t v = atomic_load_explicit(&e->word, memory_order_acquire);\n"
            "    atomic_store_explicit(&e->word, v,\n"
            "                          memory_order_release);   /* [R-free] */\n"
            "}\n")
    assert _unlabelled(text) == [2]


# ---------------------------------------------------------------- true words

def test_comments_name_only_files_the_repository_has():
    problems = []
    for name, text in _sources().items():
        for m in re.finditer(r"\b((?:tests|model|src|benchmarks)/[\w./-]+\.\w+)", text):
            if not os.path.exists(os.path.join(ROOT, m.group(1))):
                problems.append(f"{name}: {m.group(1)}")
        for m in re.finditer(r"\b(fmq_\w+\.[ch])\b", text):
            if not os.path.exists(os.path.join(CSRC, m.group(1))):
                problems.append(f"{name}: {m.group(1)}")
        for m in re.finditer(r"\b(API\.md|DESIGN\.md|[Ii]ssue\s*#?\d+)", text):
            problems.append(f"{name}: {m.group(1)} (not part of this repository)")
    assert not problems, "\n  ".join(problems)
