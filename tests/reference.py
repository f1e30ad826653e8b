"""The tests' oracle: the update rules in plain NumPy, from ch8fast.apps.reference (which
the benchmark times too). Tests import it as ``import reference as R``."""
from ch8fast.apps.reference import *  # noqa: F401,F403
from ch8fast.apps.reference import __all__  # noqa: F401
