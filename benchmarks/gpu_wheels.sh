#!/usr/bin/env bash
# The wheels the GPU image lacks, fetched here (with a network) into one gitignored folder that a GPU command
# carries along; benchmarks/gpu.sh installs the ones missing there, offline (README: "Measuring on a GPU").
#   bash benchmarks/gpu_wheels.sh [FOLDER]        (default .whl)
# For the image's Python 3.12 on manylinux x86_64: bitsandbytes (one wheel with the kernels of every CUDA version,
# 13.0 included: 43 MB of the 60 MB the folder may hold), datasets with the dependencies the image does not have
# (pandas, dill, multiprocess, xxhash), and gguf. The versions are those the CPU tests pass with. The folder holds
# exactly these wheels; the script fails if they come to more than 60 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-.whl}
wheels=(bitsandbytes==0.50.2 datasets==5.2.0 pandas==3.1.1 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
        gguf==0.19.0)
mkdir -p "$folder"
rm -f "$folder"/*.whl
# manylinux_2_24 too: bitsandbytes and pandas are tagged with it, and pip would skip them without it.
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$folder" "${wheels[@]}"
bytes=$(cat "$folder"/*.whl | wc -c)
echo "$folder: $(ls "$folder"/*.whl | wc -l) wheels, $((bytes / 1000000)) MB ($bytes bytes)"
if [ "$bytes" -gt 60000000 ]; then
  echo "error: the wheels in $folder come to more than 60 MB: drop one from the list in $0" >&2
  exit 1
fi
