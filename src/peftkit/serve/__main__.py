"""``python -m peftkit.serve``: the same as ``peftkit serve``."""

import sys

from .command import main

sys.exit(main())
