#!/usr/bin/env bash
# Compile one CUDA source of csrc/ alone, with the flags of the extension build (a syntax and type
# check; nothing runs). usage: csrc/nvcc_check.sh csrc/file.cu [arch, default 90a]
set -euo pipefail
cd "$(dirname "$0")/.."
V=${VENV:-$HOME/.cache/beitfast/venv-$(sha256sum requirements-lock.txt | cut -c1-12)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
read -r SITE ABI INCLUDES < <("$V/bin/python" - <<'PY'
import site, sysconfig, torch
from torch.utils.cpp_extension import include_paths
dirs = include_paths() + [sysconfig.get_paths()["include"]]
print(site.getsitepackages()[0], int(torch._C._GLIBCXX_USE_CXX11_ABI), " ".join("-I" + d for d in dirs))
PY
)
arch=${2:-90a}
# shellcheck disable=SC2086
"$CUDA_HOME/bin/nvcc" -c "$1" -o "/tmp/$(basename "$1").o" -std=c++20 -O3 $INCLUDES \
    -I"$SITE/nvidia/cu13/include" -diag-suppress 3189 -gencode "arch=compute_$arch,code=sm_$arch" \
    -D_GLIBCXX_USE_CXX11_ABI="$ABI" --expt-relaxed-constexpr -Xcompiler -fPIC -DTORCH_EXTENSION_NAME=_C \
    -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ \
    -U__CUDA_NO_HALF2_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__
echo "compiled $1 for sm_$arch"
