"""`python -m qlora.memory RECIPE.py [...]`: the memory report (qlora/report/memory.py)."""

import sys

from qlora.report.memory import main

sys.exit(main())
