"""The protocol model (model/fastmq.pml) stays true to the C core.

spin itself runs in CI (model/check.sh); these checks need no model checker:

* every state, phase and pin constant the model uses has the value of its
  FMQ_* twin in csrc/fmq_layout.h;
* every model step ("model: <step>" comments) is implemented by a C function
  that names the same step, and every step named in csrc/ exists in the model.
"""
from __future__ import annotations

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODEL = os.path.join(REPO, "model", "fastmq.pml")
CSRC = os.path.join(REPO, "csrc")

STEP = re.compile(r"model: ([a-z_]+\.[a-z_]+)")


def _defines(text: str, prefix: str) -> dict[str, int]:
    out = {}
    for m in re.finditer(rf"^#define ({prefix}[A-Z_]+)\s+(\d+)u?\b", text, re.M):
        out[m.group(1)] = int(m.group(2))
    return out


def _model() -> str:
    with open(MODEL) as f:
        return f.read()


def _layout() -> str:
    with open(os.path.join(CSRC, "fmq_layout.h")) as f:
        return f.read()


def _c_steps() -> dict[str, list[str]]:
    steps: dict[str, list[str]] = {}
    for name in sorted(os.listdir(CSRC)):
        if name.endswith((".c", ".h")):
            with open(os.path.join(CSRC, name)) as f:
                for step in STEP.findall(f.read()):
                    steps.setdefault(step, []).append(name)
    return steps


def test_model_constants_match_the_layout_header():
    model, layout = _model(), _layout()
    pairs = [("PH_", "FMQ_PH_"), ("LS_", "FMQ_LS_"), ("PIN_", "FMQ_PIN_")]
    checked = 0
    for mprefix, cprefix in pairs:
        mdefs = _defines(model, mprefix)
        cdefs = _defines(layout, cprefix)
        assert mdefs, f"no {mprefix}* constants found in the model"
        for name, value in mdefs.items():
            twin = "FMQ_" + name
            assert twin in cdefs, f"model constant {name} has no {twin} in fmq_layout.h"
            assert cdefs[twin] == value, (
                f"model {name} = {value} but fmq_layout.h {twin} = {cdefs[twin]}")
            checked += 1
        missing = sorted(set(n[len("FMQ_"):] for n in cdefs) - set(mdefs))
        assert not missing, f"fmq_layout.h states the model does not know: {missing}"
    assert checked >= 14


def test_every_model_step_is_implemented_and_named_in_c():
    model_steps = set(STEP.findall(_model()))
    c_steps = _c_steps()
    assert len(model_steps) >= 20
    unimplemented = sorted(model_steps - set(c_steps))
    assert not unimplemented, f"model steps no C function names: {unimplemented}"
    unmodelled = sorted(set(c_steps) - model_steps)
    assert not unmodelled, f"C comments name steps the model lacks: {unmodelled}"
    twice = {s: f for s, f in c_steps.items() if len(f) > 1}
    assert not twice, f"a step must have one implementation: {twice}"


def test_model_slot_word_rules_match_the_ring():
    """The model's stamp arithmetic (stamp = 4*lap + phase, next lap = +4) is
    the one fmq_layout.h documents."""
    layout = _layout()
    assert "stamp = 4 * lap + phase" in layout
    model = _model()
    assert "#define LAP4(t) (((t) / NSLOT) * 4)" in model
