"""`python -m titan_mem.config CONFIG [overrides]`: validate a config (exit 2 with one line if it is bad)."""

import sys

from titan_mem.config.loader import main

sys.exit(main())
