"""``python -m peftkit``: the same as the ``peftkit`` script."""

import sys

from .cli import main

sys.exit(main())
