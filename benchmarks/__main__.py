"""``python -m benchmarks``: run the side-by-side benchmarks (see README.md)."""

import sys

from .runner import main

sys.exit(main())
