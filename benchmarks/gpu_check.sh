#!/usr/bin/env bash
# One call on a lent GPU machine, under 8 minutes: build, the step benchmark (one process per variant,
# BEiT-B batch 128, profiled), the op benchmarks at BEiT-B sizes while time remains, the README
# table, and benchmarks/results/ copied to $OUT.
#   device run: bash benchmarks/gpu_check.sh        (carry: .whl)
# The machine has torch + triton + nvcc + timm + transformers but no internet; pure-Python peers
# (liger-kernel, cut-cross-entropy, torchao) travel as wheels in .whl/ (see DEVELOPERS.md).
# BUDGET_S (default 470) bounds the whole run: a phase that would start too late is skipped and
# logged, never cut half way. GPU_CHECK_TESTS=1 also runs the GPU tests (they need more time).
# STEP_VARIANTS (space-separated) replaces the step variants after beitfast, beitfast-jpeg and beitfast-fp8; OPS=0
# skips the op benchmarks: a second call can measure what the first had no time for.
# Not run yet on a GPU: the phase durations below are estimates, not measurements.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/beitfast-gpu-check}
BUDGET_S=${BUDGET_S:-470}
START=$(date +%s)
mkdir -p "$OUT"
log() { echo "== [$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/log"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# run_phase NAME NEEDED_S COMMAND...: runs COMMAND under the remaining time if NEEDED_S remain.
run_phase() {
    local name=$1 needed=$2
    shift 2
    if (( $(left) < needed )); then
        log "skipped $name: $(left) s left, it needs about $needed s"
        return
    fi
    log "$name"
    timeout --signal=INT "$(left)" "$@" 2>&1 | tail -40 | tee -a "$OUT/log"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/log"

log "build"
BEITFAST_CUDA_ARCHS=${BEITFAST_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -20 | tee -a "$OUT/log"

# Profiles (traces of tens of MB) go to $OUT, not into the results to commit.
BENCH="python3 -m pytest -q -p no:cacheprovider --profile --profile-dir $OUT/profiles --benchmark-json"
STEP="benchmarks/test_step_bench.py::test_pretrain_step"
# The fast path, fed real JPEGs and with fp8 in one session (the real-JPEG rate and the fp8 loss curve are
# compared with the synthetic bf16 step's), then each baseline eager and compiled, then our other variants.
if [[ -z "${STEP_VARIANTS:-}" ]]; then
    run_phase "step beitfast, beitfast-jpeg, beitfast-fp8" 170 $BENCH "$OUT/step-beitfast.benchmark.json" \
        "$STEP[beitfast-base-128]" "$STEP[beitfast-jpeg-base-128]" "$STEP[beitfast-fp8-base-128]"
fi
for variant in ${STEP_VARIANTS:-hf-sdpa hf-sdpa-compiled timm timm-compiled beitfast-unfused beitfast-compiled}; do
    run_phase "step $variant" 60 $BENCH "$OUT/step-$variant.benchmark.json" "$STEP[$variant-base-128]"
done
if [[ "${OPS:-1}" == 1 ]]; then
    run_phase "patch embedding" 30 $BENCH "$OUT/patch_embed.benchmark.json" \
        benchmarks/test_patch_embed_bench.py -k "224 and autocast"
    run_phase "cross-entropy" 40 $BENCH "$OUT/cross_entropy.benchmark.json" \
        benchmarks/test_cross_entropy_bench.py -k "128 and 768"
    run_phase "attention" 40 $BENCH "$OUT/attention.benchmark.json" benchmarks/test_attention_bench.py -k "beit-b-224"
    run_phase "masking" 20 $BENCH "$OUT/masking.benchmark.json" benchmarks/test_masking_bench.py
fi
if [[ "${GPU_CHECK_TESTS:-0}" == 1 ]]; then
    run_phase "tests (GPU: triton kernels compiled, CUDA backends, bf16)" 120 python3 -m pytest tests -q -p no:cacheprovider
fi

python3 benchmarks/make_tables.py 2>&1 | tee -a "$OUT/log"
cp README.md "$OUT/"
cp -r benchmarks/results "$OUT/" 2>/dev/null || true
log "done"
