#!/usr/bin/env bash
# One call on a lent GPU machine (an H100 or H200 with torch, triton, nvcc, timm and transformers, no
# network), 9 minutes at most, in phases by priority; each phase has its own cap and `timeout -k`, and
# $OUT is rewritten after each one (benchmarks/gpu_out.py pack), so a run cut short returns what it did:
#   gpu_check.log, summary.json (plan, status, durations), rows-<gpu>.tar.gz, profile-<gpu>.tar.gz.
# The device call, what to commit afterwards and the phase plan: DEVELOPERS.md, "GPU checks".
#
#   bash benchmarks/gpu_check.sh                       on the GPU machine (carry .whl: `make gpu-wheels`)
#   GPU_CHECK_PHASES='flex-autotune' bash ...          only these phases (after the build): a second call
#   GPU_CHECK_DRY_RUN=1 bash ...                       CPU mode: the same commands, benchmarks in --smoke
#   GPU_CHECK_STUB=cmd bash ...                        each phase runs `cmd PHASE COMMAND...` instead (tests)
#   GPU_CHECK_PLAN='build 150 65; ...' bash ...        another plan: NAME CAP_S ESTIMATE_S per phase (tests)
#
# GPU_CHECK_WORK (default /tmp/beitfast-gpu-check) holds the rows, the caches (Triton, its autotuning,
# Inductor) and which phases ended well: run again on the same machine, the script resumes after them
# (GPU_CHECK_FRESH=1 starts over). GPU_CHECK_BUDGET_S (default 540) bounds the whole run: a phase starts
# only if its estimate fits in what is left, and runs for at most its cap or what is left.
# Caps and estimates are seconds on an H100 with cold caches; the estimates are not measurements yet.
set -uo pipefail
cd "$(dirname "$0")/.."
# Our top-level kernels/ folder must never shadow Hugging Face's `kernels` package (transformers needs it).
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1

OUT=${OUT:-/tmp/beitfast-gpu-check-out}
WORK=${GPU_CHECK_WORK:-/tmp/beitfast-gpu-check}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
STUB=${GPU_CHECK_STUB:-}
if [[ -n "$STUB" ]]; then MODE=stub; elif [[ "$DRY_RUN" == 1 ]]; then MODE=cpu; else MODE=gpu; fi
# CPU mode runs the same work on a slower machine (the build on two cores): its limits are scaled.
SCALE=${GPU_CHECK_TIME_SCALE:-$([[ $MODE == cpu ]] && echo 8 || echo 1)}
BUDGET_S=$(( ${GPU_CHECK_BUDGET_S:-540} * SCALE ))
RESERVE_S=15  # the last pack and a phase's kill grace
KILL_S=10     # SIGTERM at the limit, SIGKILL this much later
LOG=$OUT/gpu_check.log

[[ "${GPU_CHECK_FRESH:-0}" == 1 ]] && rm -rf "$WORK"
mkdir -p "$OUT" "$WORK/results" "$WORK/junit" "$WORK/state"
date +%s >"$WORK/started"
START=$(date +%s)
# One cache folder for the run: compiled Triton kernels, their autotuning results and Inductor's
# FX-graph and autotune caches are shared by every process (each benchmark variant is one).
export TRITON_CACHE_DIR=$WORK/cache/triton TORCHINDUCTOR_CACHE_DIR=$WORK/cache/inductor
export TRITON_CACHE_AUTOTUNING=1 TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
# Rows carry the commit; .git need not travel, so `make gpu-wheels` writes it beside the wheels.
COMMIT=$(git rev-parse HEAD 2>/dev/null || cat .whl/COMMIT 2>/dev/null || echo unknown)
export BEITFAST_COMMIT=$COMMIT

if [[ $MODE == gpu ]]; then
    DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    if [[ -z "$DEVICE" ]]; then
        echo "gpu_check: nvidia-smi finds no GPU (CPU mode: GPU_CHECK_DRY_RUN=1)"
        exit 2
    fi
else
    DEVICE=cpu
fi
GPU=$(sed -E 's/[^A-Za-z0-9]+/_/g; s/^_+|_+$//g' <<<"$DEVICE")
SMOKE=()
[[ $MODE == cpu ]] && SMOKE=(--smoke)
# The peers' carried wheels, installed by the build phase. In CPU mode they are installed and imported
# there, but the benchmarks run without them, as on any CPU machine: they need a GPU.
[[ $MODE == cpu ]] || export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}

log() { echo "== [$(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }
record() {  # record NAME STATUS [KEY=NUMBER...]: one JSON line per phase event
    local name=$1 status=$2 fields="" kv
    shift 2
    for kv in "$@"; do fields+=", \"${kv%%=*}\": ${kv#*=}"; done
    echo "{\"name\": \"$name\", \"status\": \"$status\"$fields}" >>"$WORK/records.jsonl"
}
pack() {
    python3 benchmarks/gpu_out.py pack --out "$OUT" --work "$WORK" --gpu "$GPU" --device "$DEVICE" \
        --mode "$MODE" --commit "$COMMIT" --budget "$BUDGET_S" 2>&1 | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}

# The plan: NAME CAP_S ESTIMATE_S, by priority. (1) build and correctness, (2) the step table, (3) the op
# benchmarks against their peers, then the one profile, (4) compiled baselines and Flex max-autotune.
PLAN=(
    "build 150 65"
    "correctness 90 45"
    "step-beitfast 120 45"
    "step-hf-sdpa 60 25"
    "step-timm 60 25"
    "op-attention 60 25"
    "op-cross-entropy 75 35"
    "op-patch-embed 60 30"
    "profile 60 25"
    "step-hf-sdpa-compiled 120 60"
    "step-timm-compiled 120 50"
    "flex-autotune 150 90"
)
# Not in the default plan (their estimates do not fit): a second call may name them. attention-model
# measures the read rates the attention work model assumes, profiles our attention kernels at its four
# shapes beside its predictions, and times attention at 512 px (N = 1025) against SDPA with the bias and
# the bias-free flash kernels (compiling the N = 1025 and 1601 tiles is most of its time).
EXTRA=("step-beitfast-compiled 150 80" "attention-model 150 80")
if [[ -n "${GPU_CHECK_PLAN:-}" ]]; then IFS=';' read -r -a PLAN <<<"$GPU_CHECK_PLAN"; EXTRA=(); fi
SELECTED=" ${GPU_CHECK_PHASES:-} "
: >"$WORK/plan.tsv"
for entry in "${PLAN[@]}" "${EXTRA[@]}"; do
    read -r name cap estimate <<<"$entry"
    printf '%s\t%s\t%s\n' "$name" $(( cap * SCALE )) $(( estimate * SCALE )) >>"$WORK/plan.tsv"
done
for name in ${GPU_CHECK_PHASES:-}; do
    if ! cut -f1 "$WORK/plan.tsv" | grep -qx -- "$name"; then
        echo "gpu_check: GPU_CHECK_PHASES: unknown phase '$name'; known: $(cut -f1 "$WORK/plan.tsv" | xargs)"
        exit 2
    fi
done
for entry in "${EXTRA[@]}"; do  # in the plan only when named
    read -r name _ <<<"$entry"
    [[ "$SELECTED" == *" $name "* ]] || sed -i "/^$name\t/d" "$WORK/plan.tsv"
done

# -- the phases' commands -------------------------------------------------------------------------------
PYTEST=(python3 -m pytest -p no:cacheprovider -rfEs)
STEP=benchmarks/test_step_bench.py::test_pretrain_step
build_and_check() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" .whl/*.whl \
            || { echo "BUILD FAILED: the carried wheels (.whl/) do not install"; return 1; }
        PYTHONPATH=$WORK/site python3 -c '
import importlib, pathlib
for wheel in sorted(pathlib.Path(".whl").glob("*.whl")):
    module = importlib.import_module(wheel.name.split("-")[0])
    print("carried:", wheel.name, "imports as", module.__name__)' \
            || { echo "BUILD FAILED: a carried wheel does not import"; return 1; }
    fi
    BEITFAST_CUDA_ARCHS=${BEITFAST_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        python3 -m pip install --no-index --no-deps --no-build-isolation -e . \
        || { echo "BUILD FAILED: pip install -e . (the compiler's errors are above)"; return 1; }
    # Built is not enough: the package must import and the extension load, with its CUDA kernels
    # wherever there is an nvcc to compile them.
    local need=cpu
    if command -v nvcc >/dev/null || [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then need=cuda; fi
    python3 -c '
import sys, torch, triton, beitfast, beitfast.kernels
from beitfast import _ext
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, beitfast.__file__)
why = _ext.missing(None, sys.argv[1])
if why:
    sys.exit(f"BUILD FAILED: {why}")
print("beitfast._C loaded; CUDA kernels:", _ext.has_cuda_ops())' "$need"
}
export -f build_and_check
export WORK
set_command() {  # CMD=(the command of phase $1)
    local phase=$1 bench=("${PYTEST[@]}" "${SMOKE[@]}" --results-dir "$WORK/results"
        --benchmark-json "$WORK/results/benchmark-$1.json" --junitxml "$WORK/junit/$1.xml")
    case $phase in
        build) CMD=(bash -c build_and_check) ;;
        # bf16 forward and backward of the three ops against float64, no host synchronisation in the
        # model's step or the loss, the training loop's loss on real photographs.
        correctness) CMD=("${PYTEST[@]}" --junitxml "$WORK/junit/$phase.xml"
            "tests/test_attention.py::test_triton_gpu_matches_reference[8-12-197-64-bfloat16-beit]"
            "tests/test_attention.py::test_gather_and_fold_on_the_gpu_do_not_synchronise"
            "tests/test_cross_entropy.py::test_gpu_matches_float64[(4, 196, 768, 8192)-torch.bfloat16-triton]"
            "tests/test_cross_entropy.py::test_gpu_matches_float64[(4, 196, 768, 8192)-torch.bfloat16-cuda]"
            "tests/test_cross_entropy.py::test_gpu_no_host_sync_and_invalid_labels_counted"
            "tests/test_patch_embed.py::test_triton_bfloat16[48x32_p16_d40]"
            "tests/test_patch_embed.py::test_cuda_matches_reference[48x32_p16_d40-bf16]"
            "tests/test_patch_embed.py::test_cuda_beit_base_shape_matches_triton"
            "tests/test_model.py::test_pretraining_forward_and_backward_on_the_gpu_do_not_synchronise[off]"
            "tests/test_train.py::test_pretrain_on_gpu_bf16") ;;
        step-*) CMD=("${bench[@]}" "$STEP[${phase#step-}-base-128]") ;;
        op-attention) CMD=("${bench[@]}" benchmarks/test_attention_bench.py -k "beit-b-224 and not flex") ;;
        op-cross-entropy) CMD=("${bench[@]}" benchmarks/test_cross_entropy_bench.py -k "128 and 768") ;;
        op-patch-embed) CMD=("${bench[@]}" benchmarks/test_patch_embed_bench.py -k "224 and autocast"
            benchmarks/test_masking_bench.py::test_masking_cuda) ;;
        # The fused step profiled once: a few steps, unrecorded (the step table is step-beitfast's).
        profile) CMD=(python3 benchmarks/test_step_bench.py --variant beitfast --trials 1 --steps 3
            --profile "$WORK/profile" "${SMOKE[@]}") ;;
        flex-autotune) CMD=("${bench[@]}" benchmarks/test_attention_bench.py -k "flex and beit-b-224") ;;
        attention-model)
            local at512="test_attention and beit-b-512 and not flex and not eager and not xformers"
            CMD=("${bench[@]}" benchmarks/test_attention_bench.py
                -k "work_model or read_rates or ($at512)") ;;
    esac
}

run_phase() {  # run_phase NAME CAP ESTIMATE; fails when the phase ran and did not end well
    local name=$1 cap=$2 estimate=$3
    if [[ -n "${GPU_CHECK_PHASES:-}" && $name != build && "$SELECTED" != *" $name "* ]]; then
        record "$name" "not selected"
        return
    fi
    if [[ -f "$WORK/state/$name.ok" ]]; then
        log "$name: done in an earlier run on this machine (GPU_CHECK_FRESH=1 reruns it)"
        record "$name" "done earlier"
        return
    fi
    local left=$(( BUDGET_S - ($(date +%s) - START) - RESERVE_S ))
    if (( left < estimate )); then
        log "$name: skipped, $left s left and it needs about $estimate s"
        record "$name" "skipped: no time" left_s=$left
        pack || CONTRACT_BROKEN=1
        return
    fi
    local limit=$(( cap < left - KILL_S ? cap : left - KILL_S ))
    set_command "$name"
    [[ -n "$STUB" ]] && CMD=($STUB "$name" "${CMD[@]}")
    log "$name: limit $limit s (cap $cap s, estimate $estimate s): ${CMD[*]}"
    record "$name" running limit_s=$limit
    local began status
    began=$(date +%s)
    timeout -k $KILL_S $limit "${CMD[@]}" </dev/null 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - began )) verdict=ok
    case $status in
        0) touch "$WORK/state/$name.ok" ;;
        124|137) verdict=timeout ;;
        *) verdict=failed ;;
    esac
    log "$name: $verdict (exit $status) after $took s"
    record "$name" "$verdict" exit_code=$status duration_s=$took limit_s=$limit
    pack || CONTRACT_BROKEN=1
    [[ $verdict == ok ]]
}

log "gpu_check: mode $MODE, device $DEVICE, commit $COMMIT, budget $BUDGET_S s, work $WORK, out $OUT"
if [[ $MODE != stub ]]; then
    [[ $MODE == gpu ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
          'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"
fi
CONTRACT_BROKEN=0
FAILED=0
pack || CONTRACT_BROKEN=1
while IFS=$'\t' read -r name cap estimate; do
    run_phase "$name" "$cap" "$estimate" || FAILED=1
    if [[ $name == build && ! -f "$WORK/state/build.ok" ]]; then
        log "build did not succeed: stopping, nothing after it can run (see BUILD FAILED above)"
        for rest in $(cut -f1 "$WORK/plan.tsv"); do
            [[ $rest == build ]] || record "$rest" "not run: build failed"
        done
        pack
        exit 1
    fi
done <"$WORK/plan.tsv"
log "done in $(( $(date +%s) - START )) s"
pack || CONTRACT_BROKEN=1
(( CONTRACT_BROKEN )) && { log "\$OUT broke its contract (summary.json, contract)"; exit 1; }
exit $FAILED
