"""``python -m ch8fast.apps.bench``."""
import sys

from .command import main

sys.exit(main())
