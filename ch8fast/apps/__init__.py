"""The applications built on ch8fast, apart from the library.

* :mod:`ch8fast.apps.demo`: ``ch8fast demo``, every optimizer of the chapter on one small
  network and the embedded handwritten digits (:mod:`ch8fast.apps.data`);
* :mod:`ch8fast.apps.tour`: ``ch8fast tour``, the chapter's claims, and those of three
  later papers, measured;
* :mod:`ch8fast.apps.bench`: ``ch8fast bench``, the cost of one step against the memory
  bandwidth limit, in-place NumPy, the reference rules and torch.optim;
* :mod:`ch8fast.apps.mlp`: the NumPy multilayer perceptron that the demo and the tour train;
* :mod:`ch8fast.apps.reference`: the update rules in plain NumPy, as the book writes them
  (the oracle of the tests and a contender of the benchmark);
* :mod:`ch8fast.apps.cli`: the ``ch8fast`` command.

The library (``ch8fast`` and its modules) never imports this package; the applications
use only the library's public interface.
"""
