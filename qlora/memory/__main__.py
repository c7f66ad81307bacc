"""`python -m qlora.memory RECIPE.py [...]`: the memory report (qlora/memory/report.py)."""

import sys

from qlora.memory.report import main

sys.exit(main())
