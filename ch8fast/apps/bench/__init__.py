"""The benchmark: the cost of one optimizer step, against the memory-bandwidth limit and
against other ways of computing the same update.

    ch8fast bench [--rules adam,sgd] [--sizes 1e3,16e6] [--layouts 100x1e4] ...
    python -m ch8fast.apps.bench ...

Every case (rule, dtype, layout, thread count) times these contenders on arrays of the
same sizes, each updating its own parameters and state from the same gradient values:

* ``ch8fast``: ``opt.step(grads)``, the public call, Python overhead included;
* ``roofline``: the traffic-matched copy kernel (:class:`ch8fast.roofline.Roofline`):
  it reads every column once and writes every column but the gradient once, with the
  update's threads and chunking. Its time is the floor a
  single-pass update can reach at the machine's memory (or cache) bandwidth;
* ``flat`` (many-tensor layouts only): ``ch8fast`` on ONE array of the same total size;
* ``numpy``: a careful in-place NumPy update (``out=``, preallocated temporaries, no
  allocation per step);
* ``reference``: the tests' reference rules (:mod:`ch8fast.apps.reference`), the book's
  formulas written with NumPy temporaries;
* ``torch_fused`` / ``torch_foreach``: ``torch.optim`` with ``fused=True`` /
  ``foreach=True`` on tensors of the same sizes (where torch has the rule).

Timing: the contenders are timed round-robin, one sample each per round (the order
rotated every round), so that the noise of a shared machine hits them all alike. A sample
runs enough steps to last ``--min-time`` (small arrays: thousands of steps), and reports the
time per step. Times are medians over the rounds; every ratio is the median over rounds of
the ratio within the round.

The package: :mod:`~ch8fast.apps.bench.peers` (the cases and the contenders),
:mod:`~ch8fast.apps.bench.timing` (the round-robin timing and the ratios),
:mod:`~ch8fast.apps.bench.report` (the table and the figure) and
:mod:`~ch8fast.apps.bench.command` (the command line).
"""

from .command import DEFAULT_LAYOUTS, DEFAULT_RULES, DEFAULT_SIZES, build_parser, main
from .peers import (
                    CASES,
                    CONTENDERS,
                    PEERS,
                    RULES,
                    NumpyOptimizer,
                    hyperparameters,
                    make_contenders,
                    reference_optimizer,
                    state_names,
)
from .report import COLUMNS, WITHHELD_NOTE, fmt_time, header, machine_info, markdown, plot
from .timing import measure, ratio, run_case

__all__ = ["CASES", "RULES", "PEERS", "CONTENDERS", "DEFAULT_RULES", "DEFAULT_SIZES",
           "DEFAULT_LAYOUTS", "COLUMNS", "WITHHELD_NOTE", "hyperparameters", "state_names",
           "NumpyOptimizer", "reference_optimizer", "make_contenders", "measure", "ratio",
           "run_case", "machine_info", "header", "markdown", "plot", "fmt_time",
           "build_parser", "main"]
