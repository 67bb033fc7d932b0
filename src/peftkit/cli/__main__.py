"""``python -m peftkit.cli``: what torchrun launches (``torchrun ... -m peftkit.cli train ...``)."""

import sys

from . import main

sys.exit(main())
