#!/usr/bin/env bash
# One call on a lent GPU machine: build, GPU tests (bf16 included), benchmarks, results.
# The machine has torch + triton + nvcc + timm + transformers but no internet; peers that are pure
# Python (liger-kernel, cut-cross-entropy) travel as wheels in .whl/ (see DEVELOPERS.md).
#   device run: bash benchmarks/gpu_check.sh        (carry: .whl)
# Results land in benchmarks/results/ and, when $OUT is set, are copied there to come back.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/beitfast-gpu-check}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/log"; }

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/log"

log "build"
start=$(date +%s)
BEITFAST_CUDA_ARCHS=${BEITFAST_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -20 | tee -a "$OUT/log"
log "build took $(( $(date +%s) - start )) s"

log "tests (GPU: triton kernels compiled, CUDA backends, bf16)"
python3 -m pytest tests -q -p no:cacheprovider 2>&1 | tail -40 | tee -a "$OUT/log"

log "benchmarks"
python3 -m pytest benchmarks -q -p no:cacheprovider ${BENCH_ARGS:-} 2>&1 | tail -60 | tee -a "$OUT/log"

cp -r benchmarks/results "$OUT/" 2>/dev/null || true
log "done"
