"""`python -m recipes.demo` (what `make demo` runs)."""

import sys

from .pipeline import main

sys.exit(main())
