#!/usr/bin/env bash
# One command for a borrowed GPU (docs/gpu.md), from the repository root:
#   bash benchmarks/gpu.sh OUT --part 1        (then 2, 3, 4; each at most 9 minutes)
#   bash benchmarks/gpu.sh OUT --size tiny --part all     (the same plumbing on the CPU)
# The parts, the four files written to OUT and the options: benchmarks/gpu.py. Python: python3, or $PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu.py "$@"
