#!/usr/bin/env bash
# The wheels the GPU image lacks, fetched here (with a network) into one gitignored folder that a GPU command
# carries along; benchmarks/gpu.sh installs the ones missing there, offline (docs/gpu.md).
#   bash benchmarks/gpu_wheels.sh [FOLDER]        (default .whl)
# For the image's Python 3.12 on manylinux x86_64 (torch 2.11 on CUDA 13.0, transformers 5.17, peft 0.21):
#   FOLDER/          what every item may import: bitsandbytes cut to the CUDA 13.0 library the image loads (43 MB
#                    with every CUDA and ROCm version, 3.9 MB cut: benchmarks/wheels.py), liger-kernel (issue 24's
#                    fused norm, SwiGLU, RoPE and loss; pure Python and Triton, 0.9 MB), datasets with the
#                    dependencies the image does not have (pandas, dill, multiprocess, xxhash), gguf, and pytest
#                    (0.4 MB with pluggy and iniconfig; installed only where the image lacks it)
#   FOLDER/unsloth/  Unsloth's stack of benchmarks/throughput.py, installed into a site of its own (it pins
#                    datasets < 5, trl <= 1.15): unsloth cut of its web UI (28.6 MB -> 2.2 MB), unsloth-zoo, trl,
#                    torchao, datasets 4.8 (trl 1.15 needs >= 4.7), and what the image lacks of their imports. Left
#                    out: xformers (Unsloth falls back to SDPA without it; its wheel alone exceeds the limit),
#                    hf_transfer and diffusers
#                    (not imported to train).
# The versions are those the CPU tests pass with (Unsloth's: the ones it pins). The script fails if all the wheels
# come to more than 60 MB: a call carries 64 MiB, the checkout included.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-.whl}
python=${PYTHON:-python3}
wheels=(bitsandbytes==0.50.2 datasets==5.2.0 pandas==3.1.1 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
        gguf==0.19.0 liger-kernel==0.8.5 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1)
unsloth=(unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 torchao==0.18.0 datasets==4.8.5
         cut-cross-entropy==25.1.1 msgspec==0.23.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
         typing-inspection==0.4.5 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0
         structlog==26.1.0 json5==0.17.3 nest-asyncio==1.6.0)
download() {  # FOLDER WHEEL...
  local into=$1
  shift
  # manylinux_2_24 too: bitsandbytes and pandas are tagged with it, and pip would skip them without it.
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$into" "$@"
}
mkdir -p "$folder/unsloth"
rm -f "$folder"/*.whl "$folder"/unsloth/*.whl
download "$folder" "${wheels[@]}"
download "$folder/unsloth" "${unsloth[@]}"
"$python" benchmarks/wheels.py "$folder"/bitsandbytes-*.whl --drop 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' \
  --drop 'bitsandbytes/libbitsandbytes_cuda132.so' --drop 'bitsandbytes/libbitsandbytes_rocm*.so'
"$python" benchmarks/wheels.py "$folder"/unsloth/unsloth-2*.whl --drop 'studio/*'
bytes=$(cat "$folder"/*.whl "$folder"/unsloth/*.whl | wc -c)
echo "$folder: $(ls "$folder"/*.whl | wc -l) wheels, unsloth/: $(ls "$folder"/unsloth/*.whl | wc -l) wheels," \
  "$((bytes / 1000000)) MB in all ($bytes bytes)"
if [ "$bytes" -gt 60000000 ]; then
  echo "error: the wheels in $folder come to more than 60 MB: drop one from the lists in $0" >&2
  exit 1
fi
