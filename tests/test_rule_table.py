"""The kernels' table of rules (src/rule_table.py) and the Python specification of each
rule (ch8fast.rules) describe the same state: for every optimizer and every option that
changes its state, the state names Python keeps are the table's columns for the kernel rule
it runs, in the kernel's order. The table makes the compiled glue (codes, dispatch,
columns, catch-up, scalars), so this is what keeps the two sides one definition."""

import itertools
import os
import sys

import pytest

import ch8fast
from ch8fast._isa import K

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "src"))
rule_table = pytest.importorskip("rule_table")

FLAGS = {"FLAG_CENTERED": "centered", "FLAG_AMSGRAD": "amsgrad"}
OPTIONS = {"momentum": [0.0, 0.9], "centered": [False, True], "amsgrad": [False, True],
           "nesterov": [False, True]}
CLASSES = [ch8fast.SGD, ch8fast.AdaGrad, ch8fast.RMSProp, ch8fast.Adam, ch8fast.AdamW,
           ch8fast.AdaDelta, ch8fast.Lion, ch8fast.ADOPT, ch8fast.AdEMAMix]


def _layouts(cls):
    rule = cls.rule
    names = [k for k in OPTIONS if k in rule.hyper]
    for values in itertools.product(*(OPTIONS[k] for k in names)):
        for convention in rule.profiles:
            h = dict(rule.defaults(), **dict(zip(names, values)), convention=convention)
            if h.get("nesterov") and not h.get("momentum"):
                continue
            yield h


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_python_state_names_are_the_table_columns(cls):
    table = {r.name: r for r in rule_table.RULES}
    seen = 0
    for h in _layouts(cls):
        names = cls.rule.state(h)
        kernel = table[cls.rule.kernel(names)]
        cols = [c.name for c in kernel.columns
                if c.when is None or h.get(FLAGS[c.when])]
        got = ["velocity" if n == "momentum_buffer" else n for n in names]
        assert got == cols, (h, names, cols)
        seen += 1
    assert seen


def test_the_compiled_rules_are_the_table():
    assert list(K.RULES) == [r.name for r in rule_table.RULES]
    assert list(K.RULES.values()) == list(range(len(rule_table.RULES)))
    fields = set(K.Scalars("sgd").kernel_values())
    assert fields == {s.name for s in rule_table.SCALARS} | {"gscale", "clip", "flags"}


@pytest.mark.parametrize("rule", rule_table.RULES, ids=[r.name for r in rule_table.RULES])
def test_a_table_missing_a_column_is_refused(rule):
    """The column count each rule needs comes from the table: a table with one state array
    too few is refused before any kernel runs."""
    import numpy as np
    n_state = rule_table.columns(rule) - 2
    if n_state == 0:
        pytest.skip("no state")
    w = np.zeros(4)
    states = [[np.zeros(4)] for _ in range(n_state - 1)]
    table = K.Table([w], states, [0], K.Guard([w] + [s[0] for s in states]))
    engine = K.Engine([table], [0], [K.Scalars(rule.name)], [0], [0.0])
    engine.bind([np.ones(4)])
    with pytest.raises(ValueError, match="needs more state arrays"):
        engine.run(K.GradPlan(), 0)
    assert (w == 0).all()
