"""`python -m recipes.demo` (what `make demo` runs)."""

import sys

from .stages import main

sys.exit(main())
