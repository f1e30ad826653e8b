"""``python -m ch8fast``: the command line of the applications (:mod:`ch8fast.apps.cli`)."""
import sys

from ch8fast.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
